"""One factory for every method: the paper's (Section 6, Appendix D; docs/api.md) and the peers.

``make_optimizer(name, model, **hp)`` returns an optimizer that is driven exactly like the
others: ``loss = opt.step(closure)`` with ``closure()`` zeroing the gradients, running the
forward pass, computing the batch-MEAN loss, calling ``backward`` and returning the loss.

This module is the method registry of the library: name -> constructor, the hyper-parameters it
takes, a one-line description and the title tables print. The first-order baselines are in
:mod:`kbfgs.optim.first_order`, the peers (Muon, SOAP, Shampoo) in :mod:`kbfgs.optim.peers`;
the paper's tuned values (Tables 6 and 8) are experiment data, in
:mod:`kbfgs.experiments.paper`.

Every method skips a step whose loss or gradient is not finite (parameters and state
unchanged), so that all obey the same reliability contract.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..distributed import unwrap_model
from .first_order import SGDM, DecoupledAdam
from .kbfgs import KBFGS
from .kbfgs_plus import KBFGSPlus
from .kfac import KFAC
from .peers import MuonAdamW, make_shampoo, make_soap

__all__ = [
    "OPTIMIZER_NAMES",
    "PEER_NAMES",
    "describe",
    "make_optimizer",
    "title",
    "valid_hps",
]


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

_KBFGS_HPS = ("lr", "damping", "momentum", "update_freq", "weight_decay", "loss_reduction",
              "check_finite")
_KFAC_HPS = ("lr", "damping", "momentum", "stat_freq", "inv_freq", "weight_decay", "likelihood",
             "loss_reduction", "beta", "seed", "check_finite")
_ADAM_HPS = ("lr", "damping", "weight_decay", "check_finite")
_SGDM_HPS = ("lr", "momentum", "weight_decay", "check_finite")
_MUON_HPS = ("lr", "adamw_lr", "momentum", "weight_decay", "betas", "eps", "ns_steps",
             "ns_dtype", "hidden_only", "adjust_lr", "check_finite")
_SOAP_HPS = ("lr", "weight_decay", "betas", "precondition_frequency", "check_finite")
_SHAMPOO_HPS = ("lr", "weight_decay", "betas", "preconditioning_compute_steps",
                "start_preconditioning_step", "block_size", "check_finite")

_KBFGS_20 = {"damping_rule": "dd", "hessian_action": "moving_average", "damping_split": "sqrt"}


@dataclass(frozen=True)
class _Method:
    title: str
    description: str
    build: Callable[..., torch.optim.Optimizer]
    hps: tuple[str, ...]
    required: tuple[str, ...] = ("lr", "damping")
    defaults: dict[str, Any] = field(default_factory=dict)


def _kbfgs(**fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    return lambda model, **hp: KBFGS(model, **fixed, **hp)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in unwrap_model(model).parameters() if p.requires_grad]


_METHODS: dict[str, _Method] = {
    "kbfgs": _Method(
        "K-BFGS",
        "K-BFGS (Algorithm 2): dense BFGS H_G, D_P D_LM damping, minibatched Hessian action, "
        "spatial damping split", _kbfgs(history=None), _KBFGS_HPS),
    "kbfgs-l": _Method(
        "K-BFGS(L)",
        "K-BFGS(L) (Algorithm 2): L-BFGS H_G with `history` pairs (default 100), otherwise as "
        "kbfgs", _kbfgs(), _KBFGS_HPS + ("history",), defaults={"history": 100}),
    "kbfgs-20": _Method(
        "K-BFGS-20",
        "K-BFGS-20 (Goldfarb et al. 2020): double damping, moving-average Hessian action, "
        "sqrt(lambda) split, dense BFGS H_G", _kbfgs(history=None, **_KBFGS_20), _KBFGS_HPS),
    "kbfgs-l-20": _Method(
        "K-BFGS(L)-20",
        "K-BFGS(L)-20 (Goldfarb et al. 2020): as kbfgs-20 with L-BFGS H_G (history 100)",
        _kbfgs(**_KBFGS_20), _KBFGS_HPS + ("history",), defaults={"history": 100}),
    "kbfgs-no-dpdlm": _Method(
        "K-BFGS (#1 off)",
        "K-BFGS with improvement #1 off (Table 7 '#1 off'): 2020 double damping instead of "
        "D_P D_LM, otherwise as kbfgs", _kbfgs(history=None, damping_rule="dd"), _KBFGS_HPS),
    "kbfgs-no-minibatch": _Method(
        "K-BFGS (#2 off)",
        "K-BFGS with improvement #2 off (Table 7 '#2 off'): moving-average Hessian action "
        "instead of the minibatched one, otherwise as kbfgs",
        _kbfgs(history=None, hessian_action="moving_average"), _KBFGS_HPS),
    "kbfgs-plus": _Method(
        "K-BFGS+",
        "kbfgs-plus (not in the paper): K-BFGS's direction with Adam's per-layer step length "
        "(norm grafting), Adam on the other parameters; lr in Adam's units",
        lambda model, **hp: KBFGSPlus(model, **hp),
        _KBFGS_HPS + ("history", "beta2", "eps", "graft", "nesterov", "init_H_A",
                      "fisher_G", "closure_free"),
        required=()),  # lr, damping: KBFGSPlus's own defaults
    "kfac": _Method(
        "KFAC",
        "KFAC (Algorithm 5): Omega/Gamma moving averages with sampled targets every stat_freq "
        "steps, pi-split damped inverses every inv_freq steps",
        lambda model, **hp: KFAC(model, **hp), _KFAC_HPS),
    "adam": _Method(
        "Adam",
        "Adam (Kingma & Ba 2014): betas (0.9, 0.999), eps = damping, decoupled weight decay "
        "(torch.optim.AdamW)",
        lambda model, **hp: DecoupledAdam(_trainable(model), **hp), _ADAM_HPS),
    "sgd-m": _Method(
        "SGD-m",
        "SGD with momentum: buf = momentum buf + g (momentum 0.9, no dampening), "
        "W -= lr (buf + wd W) (decoupled weight decay)",
        lambda model, **hp: SGDM(_trainable(model), **hp), _SGDM_HPS, required=("lr",)),
    "muon": _Method(
        "Muon",
        "Muon (torch.optim.Muon's update, momentum 0.95 Nesterov, 5 Newton-Schulz steps, "
        "float32 on CPU) on the hidden Linear/Conv weights (conv as (out, in*kh*kw)), AdamW "
        "(0.9, 0.95) on the rest; one lr (RMS matched to AdamW)",
        lambda model, **hp: MuonAdamW(model, **hp), _MUON_HPS, required=("lr",)),
    "soap": _Method(
        "SOAP",
        "SOAP (Vyas et al. 2024; pytorch-optimizer): Adam in Shampoo's eigenbasis, betas "
        "(0.95, 0.95), eigenbasis every 10 steps",
        make_soap, _SOAP_HPS, required=("lr",)),
    "shampoo": _Method(
        "Shampoo",
        "Shampoo (Anil et al. 2020; pytorch-optimizer ScalableShampoo): 512-blocks, inverse "
        "roots by SVD every 20 steps, RMSProp grafting, Nesterov momentum 0.9",
        make_shampoo, _SHAMPOO_HPS, required=("lr",)),
}

OPTIMIZER_NAMES: tuple[str, ...] = tuple(_METHODS)
#: the methods that are not the paper's (docs/api.md, "Peers")
PEER_NAMES: tuple[str, ...] = ("muon", "soap", "shampoo")


def _method(name: str) -> _Method:
    if name not in _METHODS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    return _METHODS[name]


def describe(name: str) -> str:
    """A one-line description of the method ``name``."""
    return _method(name).description


def title(name: str) -> str:
    """The method's name as tables print it ("K-BFGS(L)", "Muon")."""
    return _method(name).title


def valid_hps(name: str) -> tuple[str, ...]:
    """The hyper-parameters ``make_optimizer(name, ...)`` accepts (``lr`` always required;
    ``damping`` required by the K-BFGS family, KFAC and Adam)."""
    return _method(name).hps


def make_optimizer(name: str, model: nn.Module, **hp: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (one of :data:`OPTIMIZER_NAMES`) for ``model``.

    Hyper-parameters by method (see :func:`valid_hps`): ``lr`` is required; ``damping``
    (lambda, Adam's eps) too for the K-BFGS family, ``kfac`` and ``adam``; ``momentum`` (0.9),
    ``weight_decay`` (0, decoupled) for the paper's methods; ``update_freq`` for the K-BFGS
    family; ``history`` (100) for ``kbfgs-l`` and ``kbfgs-l-20``; ``stat_freq`` (1),
    ``inv_freq`` (20), ``likelihood``, ``beta``, ``seed`` for ``kfac``; ``loss_reduction`` for
    the Kronecker methods; the peers' own (``muon``: :class:`~kbfgs.optim.peers.MuonAdamW`;
    ``soap``, ``shampoo``: :func:`~kbfgs.optim.peers.make_soap`,
    :func:`~kbfgs.optim.peers.make_shampoo`, which need ``pip install 'kbfgs[peers]'``);
    ``check_finite`` for all. A name's fixed choices (history None for ``kbfgs``, the 2020
    switches of ``kbfgs-20``...) cannot be overridden: build ``kbfgs.KBFGS`` directly for other
    combinations. Unknown names and hyper-parameters a method does not take raise ValueError
    listing the valid ones.
    """
    method = _method(name)
    bad = sorted(set(hp) - set(method.hps))
    if bad:
        raise ValueError(f"optimizer {name!r} does not take {', '.join(map(repr, bad))}; valid "
                         f"hyper-parameters: {', '.join(method.hps)}")
    missing = [k for k in method.required if k not in hp]
    if missing:
        raise ValueError(f"optimizer {name!r} needs {', '.join(map(repr, missing))}; valid "
                         f"hyper-parameters: {', '.join(method.hps)}")
    return method.build(model, **{**method.defaults, **hp})
