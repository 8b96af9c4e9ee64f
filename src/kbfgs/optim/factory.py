"""One factory for every method the paper compares (spec sections 1, 4, 5; Appendix D).

``make_optimizer(name, model, **hp)`` returns an optimizer that is driven exactly like the
others: ``loss = opt.step(closure)`` with ``closure()`` zeroing the gradients, running the
forward pass, computing the batch-MEAN loss, calling ``backward`` and returning the loss.

The first-order baselines follow Appendix D.1 / D.3 of the paper:

* ``adam``: Adam of Kingma & Ba with betas (0.9, 0.999), bias correction, ``eps`` = the
  ``damping`` hyper-parameter, and *decoupled* weight decay ``W -= lr (p + wd W)`` (the paper's
  D.3 modification), which is what ``torch.optim.AdamW`` computes.
* ``sgd-m``: ``buf = momentum buf + g`` (no dampening, momentum 0.9), then
  ``W -= lr (buf + wd W)`` (decoupled weight decay; ``torch.optim.SGD`` couples it, so
  :class:`SGDM` implements the update itself).

Both skip a step whose loss or gradient is not finite (parameters and state unchanged), like
the Kronecker-factored optimizers, so that every method obeys the same reliability contract.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .base import all_finite
from .kbfgs import KBFGS
from .kfac import KFAC

__all__ = [
    "OPTIMIZER_NAMES",
    "PAPER_HPS",
    "SGDM",
    "DecoupledAdam",
    "describe",
    "make_optimizer",
    "valid_hps",
]


# ---------------------------------------------------------------------------------------------
# First-order baselines
# ---------------------------------------------------------------------------------------------


def _all_finite(loss: Any, params: Iterable[Tensor]) -> bool:
    return all_finite(loss, [p.grad for p in params if p.grad is not None])


class _SkipNonFinite:
    """Mixin: run the closure, skip a non-finite step, count steps (kept in ``state_dict``)."""

    check_finite: bool
    steps: int
    skipped_steps: int

    def _run_closure(self, closure: Callable[[], Any] | None) -> tuple[Any, bool]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]  # type: ignore[attr-defined]
        if self.check_finite and not _all_finite(loss, params):
            self.skipped_steps += 1
            if self.skipped_steps == 1:
                warnings.warn(f"{type(self).__name__}: non-finite loss or gradient at step "
                              f"{self.steps + 1}; the step is skipped and the optimizer state is "
                              "unchanged (counted in stats()['skipped_steps'])",
                              RuntimeWarning, stacklevel=3)
            return loss, False
        return loss, True

    def stats(self, condition: bool = True) -> dict[str, Any]:
        return {"steps": self.steps, "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]
        sd["counters"] = {"steps": self.steps, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        counters = sd.pop("counters", None)
        super().load_state_dict(sd)  # type: ignore[misc]
        if counters is not None:
            self.steps = int(counters["steps"])
            self.skipped_steps = int(counters["skipped_steps"])


def _check_number(name: str, value: Any, low: float, *, strict: bool = False,
                  high: float | None = None) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > low if strict else value >= low) and (high is None or value < high)
    if not ok:
        rng = f"> {low}" if strict else f">= {low}"
        if high is not None:
            rng = f"in [{low}, {high})"
        raise ValueError(f"{name} must be a number {rng}, got {value!r}")


class SGDM(_SkipNonFinite, torch.optim.Optimizer):
    """SGD with momentum as in the paper: ``buf = momentum buf + g`` (no dampening),
    ``W -= lr (buf + weight_decay W)`` (decoupled weight decay, Appendix D.3)."""

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, check_finite: bool = True) -> None:
        _check_number("lr", lr, 0.0)
        _check_number("momentum", momentum, 0.0, high=1.0)
        _check_number("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self.check_finite = bool(check_finite)
        self.steps = 0
        self.skipped_steps = 0

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss, ok = self._run_closure(closure)
        if ok:
            self._update()
            self.steps += 1
        return loss

    @torch.no_grad()
    def _update(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = []
            for p in params:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, [p.grad for p in params])
            wd = group["weight_decay"]
            steps = torch._foreach_add(bufs, params, alpha=wd) if wd != 0 else bufs
            torch._foreach_add_(params, steps, alpha=-group["lr"])


class DecoupledAdam(_SkipNonFinite, torch.optim.AdamW):
    """Adam (Kingma & Ba) with ``eps = damping`` and decoupled weight decay
    ``W -= lr (p + weight_decay W)``: ``torch.optim.AdamW`` with the non-finite skip."""

    def __init__(self, params: Iterable[Any], lr: float, damping: float,
                 weight_decay: float = 0.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 check_finite: bool = True) -> None:
        _check_number("lr", lr, 0.0)
        _check_number("damping", damping, 0.0, strict=True)
        _check_number("weight_decay", weight_decay, 0.0)
        super().__init__(params, lr=lr, betas=betas, eps=damping, weight_decay=weight_decay)
        self.check_finite = bool(check_finite)
        self.steps = 0
        self.skipped_steps = 0

    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        loss, ok = self._run_closure(closure)
        if ok:
            super().step()
            self.steps += 1
        return loss


# ---------------------------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------------------------

_KBFGS_HPS = ("lr", "damping", "momentum", "update_freq", "weight_decay", "loss_reduction",
              "check_finite")
_KFAC_HPS = ("lr", "damping", "momentum", "stat_freq", "inv_freq", "weight_decay", "likelihood",
             "loss_reduction", "beta", "seed", "check_finite")
_ADAM_HPS = ("lr", "damping", "weight_decay", "check_finite")
_SGDM_HPS = ("lr", "momentum", "weight_decay", "check_finite")

_KBFGS_20 = {"damping_rule": "dd", "hessian_action": "moving_average", "damping_split": "sqrt"}


@dataclass(frozen=True)
class _Method:
    description: str
    build: Callable[..., torch.optim.Optimizer]
    hps: tuple[str, ...]
    required: tuple[str, ...] = ("lr", "damping")
    defaults: dict[str, Any] = field(default_factory=dict)


def _kbfgs(**fixed: Any) -> Callable[..., torch.optim.Optimizer]:
    return lambda model, **hp: KBFGS(model, **fixed, **hp)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


_METHODS: dict[str, _Method] = {
    "kbfgs": _Method(
        "K-BFGS (Algorithm 2): dense BFGS H_G, D_P D_LM damping, minibatched Hessian action, "
        "spatial damping split", _kbfgs(history=None), _KBFGS_HPS),
    "kbfgs-l": _Method(
        "K-BFGS(L) (Algorithm 2): L-BFGS H_G with `history` pairs (default 100), otherwise as "
        "kbfgs", _kbfgs(), _KBFGS_HPS + ("history",), defaults={"history": 100}),
    "kbfgs-20": _Method(
        "K-BFGS-20 (Goldfarb et al. 2020): double damping, moving-average Hessian action, "
        "sqrt(lambda) split, dense BFGS H_G", _kbfgs(history=None, **_KBFGS_20), _KBFGS_HPS),
    "kbfgs-l-20": _Method(
        "K-BFGS(L)-20 (Goldfarb et al. 2020): as kbfgs-20 with L-BFGS H_G (history 100)",
        _kbfgs(**_KBFGS_20), _KBFGS_HPS + ("history",), defaults={"history": 100}),
    "kbfgs-no-dpdlm": _Method(
        "K-BFGS with improvement #1 off (Table 7 '#1 off'): 2020 double damping instead of "
        "D_P D_LM, otherwise as kbfgs", _kbfgs(history=None, damping_rule="dd"), _KBFGS_HPS),
    "kbfgs-no-minibatch": _Method(
        "K-BFGS with improvement #2 off (Table 7 '#2 off'): moving-average Hessian action "
        "instead of the minibatched one, otherwise as kbfgs",
        _kbfgs(history=None, hessian_action="moving_average"), _KBFGS_HPS),
    "kfac": _Method(
        "KFAC (Algorithm 5): Omega/Gamma moving averages with sampled targets every stat_freq "
        "steps, pi-split damped inverses every inv_freq steps",
        lambda model, **hp: KFAC(model, **hp), _KFAC_HPS),
    "adam": _Method(
        "Adam (Kingma & Ba 2014): betas (0.9, 0.999), eps = damping, decoupled weight decay "
        "(torch.optim.AdamW)",
        lambda model, **hp: DecoupledAdam(_trainable(model), **hp), _ADAM_HPS),
    "sgd-m": _Method(
        "SGD with momentum: buf = momentum buf + g (momentum 0.9, no dampening), "
        "W -= lr (buf + wd W) (decoupled weight decay)",
        lambda model, **hp: SGDM(_trainable(model), **hp), _SGDM_HPS, required=("lr",)),
}

OPTIMIZER_NAMES: tuple[str, ...] = tuple(_METHODS)


def _method(name: str) -> _Method:
    if name not in _METHODS:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(OPTIMIZER_NAMES)}")
    return _METHODS[name]


def describe(name: str) -> str:
    """A one-line description of the method ``name``."""
    return _method(name).description


def valid_hps(name: str) -> tuple[str, ...]:
    """The hyper-parameters ``make_optimizer(name, ...)`` accepts (``lr`` always required;
    ``damping`` required except for ``sgd-m``)."""
    return _method(name).hps


def make_optimizer(name: str, model: nn.Module, **hp: Any) -> torch.optim.Optimizer:
    """Build the optimizer ``name`` (one of :data:`OPTIMIZER_NAMES`) for ``model``.

    Hyper-parameters by method (see :func:`valid_hps`): ``lr`` and ``damping`` (lambda, Adam's
    eps; not taken by ``sgd-m``) are required; ``momentum`` (0.9), ``weight_decay`` (0,
    decoupled) for all; ``update_freq`` for the K-BFGS family; ``history`` (100) for
    ``kbfgs-l`` and ``kbfgs-l-20``; ``stat_freq`` (1), ``inv_freq`` (20), ``likelihood``,
    ``beta``, ``seed`` for ``kfac``; ``loss_reduction`` for the Kronecker methods;
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


# ---------------------------------------------------------------------------------------------
# The paper's tuned values (for reference; they do not transfer blindly, see spec section 7)
# ---------------------------------------------------------------------------------------------

def _ae(lr_d: dict[str, tuple[float, float | None]], likelihood: str
        ) -> dict[str, tuple[str, dict[str, Any]]]:
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    names = {"K-BFGS": ("kbfgs", {}), "K-BFGS-T20": ("kbfgs", {"update_freq": 20}),
             "K-BFGS(L)": ("kbfgs-l", {}), "K-BFGS-20": ("kbfgs-20", {}),
             "K-BFGS(L)-20": ("kbfgs-l-20", {}),
             "KFAC": ("kfac", {"stat_freq": 1, "inv_freq": 20, "likelihood": likelihood}),
             "Adam": ("adam", {}), "SGD-m": ("sgd-m", {})}
    for label, (lr, damping) in lr_d.items():
        name, extra = names[label]
        hp: dict[str, Any] = {"lr": lr, **extra}
        if damping is not None:
            hp["damping"] = damping
        out[label] = (name, hp)
    return out


def _cnn(vals: dict[str, tuple[float, float, float | None]]
         ) -> dict[str, tuple[str, dict[str, Any]]]:
    names = {"K-BFGS": ("kbfgs", {"update_freq": 20}), "K-BFGS(L)": ("kbfgs-l", {"update_freq": 20}),
             "KFAC": ("kfac", {"stat_freq": 10, "inv_freq": 100, "likelihood": "categorical"}),
             "Adam": ("adam", {}), "SGD-m": ("sgd-m", {})}
    out: dict[str, tuple[str, dict[str, Any]]] = {}
    for label, (lr, wd, damping) in vals.items():
        name, extra = names[label]
        hp: dict[str, Any] = {"lr": lr, "weight_decay": wd, **extra}
        if damping is not None:
            hp["damping"] = damping
        out[label] = (name, hp)
    return out


#: ``PAPER_HPS[problem][label] = (name, hp)``: Table 6 (autoencoders: lr, damping; KFAC with
#: T_1 = 1, T_2 = 20; "K-BFGS-T20" is the dagger column, T = 20) and Table 8 (CNNs: lr,
#: weight decay, damping; K-BFGS with T = 20, KFAC with T_1 = 10, T_2 = 100).
PAPER_HPS: dict[str, dict[str, tuple[str, dict[str, Any]]]] = {
    "mnist": _ae({"K-BFGS": (0.03, 0.3), "K-BFGS-T20": (0.3, 30), "K-BFGS(L)": (0.03, 0.3),
                  "K-BFGS-20": (0.01, 0.1), "K-BFGS(L)-20": (0.003, 0.1), "KFAC": (0.3, 10),
                  "Adam": (1e-4, 1e-4), "SGD-m": (0.003, None)}, "bernoulli"),
    "faces": _ae({"K-BFGS": (0.03, 1), "K-BFGS-T20": (0.03, 3), "K-BFGS(L)": (0.03, 1),
                  "K-BFGS-20": (0.01, 0.3), "K-BFGS(L)-20": (0.01, 0.3), "KFAC": (0.03, 0.1),
                  "Adam": (1e-4, 1e-4), "SGD-m": (0.001, None)}, "gaussian"),
    "curves": _ae({"K-BFGS": (0.03, 0.3), "K-BFGS-T20": (0.3, 30), "K-BFGS(L)": (0.1, 3),
                   "K-BFGS-20": (0.01, 0.03), "K-BFGS(L)-20": (0.003, 0.03), "KFAC": (0.3, 10),
                   "Adam": (1e-3, 1e-3), "SGD-m": (0.003, None)}, "bernoulli"),
    "vgg16-cifar10": _cnn({"K-BFGS": (30, 1e-5, 1e4), "K-BFGS(L)": (1, 1e-3, 100),
                           "KFAC": (0.01, 0.1, 10), "Adam": (0.003, 0.1, 0.1),
                           "SGD-m": (0.003, 0.1, None)}),
    "resnet32-cifar10": _cnn({"K-BFGS": (100, 1e-5, 1e3), "K-BFGS(L)": (1e3, 1e-6, 1e4),
                              "KFAC": (0.01, 0.1, 0.01), "Adam": (0.003, 0.1, 0.01),
                              "SGD-m": (0.03, 0.01, None)}),
    "vgg16-cifar100": _cnn({"K-BFGS": (0.1, 0.01, 10), "K-BFGS(L)": (0.3, 0.001, 100),
                            "KFAC": (0.01, 0.1, 1), "Adam": (3e-4, 1, 0.01),
                            "SGD-m": (0.003, 0.1, None)}),
    "resnet32-cifar100": _cnn({"K-BFGS": (1e3, 1e-6, 1e4), "K-BFGS(L)": (10, 1e-4, 100),
                               "KFAC": (0.01, 0.1, 0.001), "Adam": (0.01, 0.1, 0.01),
                               "SGD-m": (0.03, 0.01, None)}),
}
