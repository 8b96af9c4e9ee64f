"""Named problems of the paper's Section 6: data, model, loss and the paper's defaults.

A *problem* bundles a data set, a model, a loss and, per *method*, the hyper-parameters the
paper selected (Table 6 for the autoencoders, Table 8 for the CNNs), the update frequencies of
Section 6 and the budget (fixed process time for the autoencoders, Section 6.1; epochs with a
step learning-rate decay for the CNNs, Section 6.2). The grids of Appendix D.2 / D.3 are here
too.

Methods (the rows of Tables 3, 4 and 7)::

    kbfgs               K-BFGS (Algorithm 2), dense BFGS for H_G
    kbfgs-t20           K-BFGS with curvature update frequency T = 20 (the dagger row of Table 3)
    kbfgs-l             K-BFGS(L), L-BFGS with 100 pairs for H_G
    kbfgs-20            K-BFGS of Goldfarb et al. (2020) (docs/api.md)
    kbfgs-l-20          K-BFGS(L) of Goldfarb et al. (2020)
    kbfgs-no-dpdlm      Table 7, improvement #1 off (double damping instead of D_P D_LM)
    kbfgs-no-minibatch  Table 7, improvement #2 off (moving-average A instead of minibatch A s)
    kfac                KFAC (Algorithm 5)
    adam                Adam (epsilon is the damping)
    sgd-m               SGD with momentum 0.9

Where the paper gives no values (Fashion-MNIST problems, the Table 7 ablation variants) the
defaults below say where they come from (``Problem.hp_notes``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..optim.factory import PEER_NAMES
from ..optim.factory import title as optimizer_title
from ..optim.kbfgs_plus import KBFGSPlus
from . import models as _models
from . import paper

__all__ = [
    "METHODS",
    "METHOD_FACTORY",
    "METHOD_HPS",
    "METHOD_TITLES",
    "PEERS",
    "PROBLEM_NAMES",
    "RUNNER_METHODS",
    "Problem",
    "RunnerMethod",
    "get_problem",
    "loss_fn",
    "method_hp_keys",
]

# --------------------------------------------------------------------------------------------
# Methods
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerMethod:
    """A method of the runner: the ``kbfgs.make_optimizer`` name it builds, the
    hyper-parameters the runner sets and records (a subset of the optimizer's), the title
    tables print when it is not the optimizer's own (``kbfgs.optim.factory.title``), and
    whether its runs warm-start the optimizer by default (off the clock, Appendix D.1: the
    paper's K-BFGS and KFAC; kbfgs-plus, compared with the peers at equal process time, does
    not, so that every computation it makes is on the clock)."""

    optimizer: str
    hps: tuple[str, ...]
    title: str | None = None
    warm_start: bool = True


_KRON = ("lr", "damping", "weight_decay", "momentum", "update_freq")
_PLUS = _KRON + ("beta2", "graft", "nesterov", "init_H_A", "fisher_G", "closure_free")
_KFAC = ("lr", "damping", "weight_decay", "momentum", "stat_freq", "inv_freq", "likelihood")

#: The runner's methods, in the tables' order (Table 3, and Table 7 for the ablation
#: variants), then the peers.
RUNNER_METHODS: dict[str, RunnerMethod] = {
    "kbfgs": RunnerMethod("kbfgs", _KRON),
    "kbfgs-t20": RunnerMethod("kbfgs", _KRON, "K-BFGS \u2020 (T=20)"),
    "kbfgs-no-dpdlm": RunnerMethod("kbfgs-no-dpdlm", _KRON),
    "kbfgs-no-minibatch": RunnerMethod("kbfgs-no-minibatch", _KRON),
    "kbfgs-l": RunnerMethod("kbfgs-l", _KRON + ("history",)),
    "kbfgs-20": RunnerMethod("kbfgs-20", _KRON),
    "kbfgs-l-20": RunnerMethod("kbfgs-l-20", _KRON + ("history",)),
    "kfac": RunnerMethod("kfac", _KFAC),
    "adam": RunnerMethod("adam", ("lr", "damping", "weight_decay")),
    "sgd-m": RunnerMethod("sgd-m", ("lr", "weight_decay", "momentum")),
    "kbfgs-plus": RunnerMethod("kbfgs-plus", _PLUS, warm_start=False),
    "kbfgs-plus-extra": RunnerMethod("kbfgs-plus", _PLUS, "K-BFGS+ (extra pass)",
                                     warm_start=False),
    "muon": RunnerMethod("muon", ("lr", "weight_decay", "momentum")),
    "soap": RunnerMethod("soap", ("lr", "weight_decay")),
    "shampoo": RunnerMethod("shampoo", ("lr", "weight_decay")),
}

#: method name -> name passed to ``kbfgs.make_optimizer``.
METHOD_FACTORY: dict[str, str] = {m: r.optimizer for m, r in RUNNER_METHODS.items()}
METHODS: tuple[str, ...] = tuple(RUNNER_METHODS)
#: the methods that are not the paper's
PEERS: tuple[str, ...] = tuple(m for m in METHODS if m in PEER_NAMES)
#: Names as the paper's tables print them.
METHOD_TITLES: dict[str, str] = {m: r.title or optimizer_title(r.optimizer)
                                 for m, r in RUNNER_METHODS.items()}
#: hyper-parameters each method takes (and that ``kbfgs run`` records).
METHOD_HPS: dict[str, tuple[str, ...]] = {m: r.hps for m, r in RUNNER_METHODS.items()}


def method_hp_keys(method: str) -> tuple[str, ...]:
    """Hyper-parameter names of ``method`` (ValueError listing the valid methods otherwise)."""
    check_method(method)
    return METHOD_HPS[method]


def check_method(method: str) -> None:
    if method not in METHOD_FACTORY:
        raise ValueError(f"unknown method {method!r}; valid methods: {', '.join(METHODS)}")


# --------------------------------------------------------------------------------------------
# Losses
# --------------------------------------------------------------------------------------------


def loss_fn(kind: str) -> Callable[[Tensor, Tensor], Tensor]:
    """The batch-mean loss of a problem (Table 5; docs/api.md, 'Deviations from the paper').

    ``bce``: binary cross entropy with logits summed over pixels, mean over the batch;
    ``half_mse``: half the squared error summed over pixels, mean over the batch;
    ``ce``: cross entropy, mean over the batch.
    """
    if kind == "bce":
        return lambda out, target: F.binary_cross_entropy_with_logits(
            out, target, reduction="sum") / out.shape[0]
    if kind == "half_mse":
        return lambda out, target: 0.5 * (out - target).square().sum() / out.shape[0]
    if kind == "ce":
        return lambda out, target: F.cross_entropy(out, target)
    raise ValueError(f"unknown loss {kind!r}; valid: bce, half_mse, ce")


_LIKELIHOOD = {"bce": "bernoulli", "half_mse": "gaussian", "ce": "categorical"}


# --------------------------------------------------------------------------------------------
# Problems
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """A named problem: data set, model, loss and the paper's defaults per method."""

    name: str
    dataset: str
    model: str
    loss: str  # "bce", "half_mse" or "ce"
    batch_size: int
    #: method -> default hyper-parameters (lr, damping, weight_decay, update_freq, ...)
    hps: dict[str, dict[str, Any]]
    #: method -> where the defaults come from, when not simply the paper's table
    hp_notes: dict[str, str] = field(default_factory=dict)
    #: the paper's table the defaults come from
    source: str = ""
    classifier: bool = False
    image_shape: tuple[int, int, int] | None = None  # (C, H, W) for CNNs
    num_classes: int = 0
    augment: bool = False
    #: autoencoders: the fixed process-time budget of Section 6.1 (seconds)
    time_budget: float | None = None
    #: CNNs: method family -> (epochs, decay every, decay factor) of Section 6.2
    schedule: dict[str, tuple[int, int, float]] = field(default_factory=dict)
    #: training samples used for the logged training loss (None: the full training set)
    eval_subset: int | None = None
    #: grids of Appendix D.2 / D.3: method family -> {hp: values}
    grids: dict[str, dict[str, tuple[float, ...]]] = field(default_factory=dict)
    description: str = ""

    @property
    def criterion(self) -> str:
        """The paper's selection criterion: smallest training loss (autoencoders, Section
        6.1) or largest validation accuracy (CNNs, Section 6.2)."""
        return "max_val_acc" if self.classifier else "min_train_loss"

    @property
    def likelihood(self) -> str:
        return _LIKELIHOOD[self.loss]

    def methods(self) -> tuple[str, ...]:
        return tuple(self.hps)

    def defaults(self, method: str) -> dict[str, Any]:
        """The default hyper-parameters of ``method`` on this problem (a copy)."""
        check_method(method)
        if method not in self.hps:
            raise ValueError(f"problem {self.name!r} has no defaults for method {method!r}; "
                             f"methods with defaults: {', '.join(self.hps)} (pass every "
                             "hyper-parameter explicitly to use another one)")
        return dict(self.hps[method])

    def schedule_for(self, method: str) -> tuple[int, int, float] | None:
        """(epochs, decay every, factor) of Section 6.2 for ``method``, None for autoencoders."""
        if not self.schedule:
            return None
        return self.schedule["first_order" if method in ("adam", "sgd-m") else "second_order"]

    def grid(self, method: str) -> dict[str, tuple[float, ...]]:
        """The Appendix D grid for ``method`` on this problem."""
        check_method(method)
        if method in self.grids:
            return dict(self.grids[method])
        family = "kbfgs" if method.startswith("kbfgs") else method
        if family not in self.grids:
            raise ValueError(f"problem {self.name!r} has no grid for method {method!r}; give "
                             "the values to try (e.g. --lr 1e-3 3e-3)")
        return dict(self.grids[family])

    def build_model(self) -> nn.Module:
        if self.image_shape is None:
            return _models.build_model(self.model)
        c, h, _ = self.image_shape
        return _models.build_model(self.model, in_channels=c, num_classes=self.num_classes,
                                   image_size=h)


# (lr, damping) per autoencoder data set: Table 6 (paper.TABLE6) and Fashion-MNIST.
_TABLE6 = {
    **paper.TABLE6,
    # Not in the paper. K-BFGS and Adam: docs/results.md (the MNIST values of Table 6 diverge
    # on Fashion-MNIST). The others: chosen for stability, see _FMNIST_NOTES.
    "fashion-mnist": {"kbfgs": (0.03, 1), "kbfgs-t20": (0.3, 30), "kbfgs-l": (0.03, 1),
                      "kbfgs-20": (0.01, 0.3), "kbfgs-l-20": (0.003, 0.1), "kfac": (0.1, 30),
                      "adam": (1e-4, 1e-4), "sgd-m": (0.001, None)},
}
_FMNIST_NOTES = {
    # Checked with `kbfgs grid --problem fmnist-ae --time-budget 40` (1 seed, see
    # docs/results.md): Table 6's MNIST value, and one damping step up where it diverged.
    "kbfgs": "project choice (docs/results.md); Table 6's MNIST (0.03, 0.3) diverges "
             "(NaN at step ~28)",
    "kbfgs-t20": "Table 6 MNIST value (stable; damping 100 was worse)",
    "kbfgs-l": "Table 6 MNIST lr, damping 1: (0.03, 0.3) diverges (NaN at step ~30)",
    "kbfgs-20": "Table 6 MNIST lr, damping 0.3: (0.01, 0.1) diverges (NaN at step ~35)",
    "kbfgs-l-20": "Table 6 MNIST value (stable; damping 0.3 was worse)",
    "kbfgs-no-dpdlm": "K-BFGS's value (the paper does not list Table 7's)",
    "kbfgs-no-minibatch": "K-BFGS's value (the paper does not list Table 7's)",
    "kfac": "best of lr {0.3, 0.1, 0.03, 0.01} x damping {10, 30} in 40 s checks: Table 6's "
            "MNIST (0.3, 10) diverges (NaN at step ~14), so do (0.3, 30) and (0.1, 10)",
    "adam": "Table 6 MNIST value",
    "sgd-m": "0.001: lower loss than Table 6 MNIST's 0.003 in a 40 s check (docs/results.md: "
             "0.003 reaches NaN in epoch 3)",
}
_ABLATION_NOTE = "K-BFGS's Table 6 value (the paper does not list the Table 7 variants' values)"

# The peers (not in the paper): defaults from a learning-rate grid on fmnist-ae, the same
# budget for every peer (docs/results.md, "Peers: Muon, SOAP, Shampoo").
_PEER_LRS = (3e-4, 1e-3, 3e-3, 0.01, 0.03)
_PEER_AE_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "muon": {"lr": _PEER_LRS},
    "soap": {"lr": _PEER_LRS},
    "shampoo": {"lr": (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01)},
}


def _peer_hps(method: str, lr: float) -> dict[str, Any]:
    """A peer's runner hyper-parameters at ``lr``: no weight decay (as the paper's methods on
    the autoencoders), and Muon's momentum 0.95 (its authors' value)."""
    return {"lr": lr, "weight_decay": 0.0, **({"momentum": 0.95} if method == "muon" else {})}


def _peer_note(method: str, text: str) -> str:
    """``text``, and for Muon the dtype of its Newton-Schulz iteration here."""
    return text + ("; Newton-Schulz in float32 on CPU" if method == "muon" else "")


_PEER_FMNIST: dict[str, dict[str, Any]] = {
    m: _peer_hps(m, lr) for m, lr in {"muon": 0.01, "soap": 0.01, "shampoo": 3e-5}.items()}
_PEER_FMNIST_NOTES = {
    "muon": "best lr of a 25 s grid on fmnist-ae (docs/results.md); Newton-Schulz in float32 "
            "on CPU (torch's bfloat16 on CUDA)",
    "soap": "best lr of a 25 s grid on fmnist-ae (docs/results.md)",
    "shampoo": "best lr of a 25 s grid on fmnist-ae (docs/results.md; 1e-4 ties it); small "
               "because the RMSProp graft has no bias correction",
}


def _reused(where: str) -> dict[str, str]:
    return {m: _peer_note(m, f"the fmnist-ae grid's value (not tuned on {where})")
            for m in _PEER_FMNIST}


#: curves-ae: the best of a 120 s grid (seed 1) on curves-ae itself, the same lrs for every
#: method and kbfgs-plus (3e-3, 5e-3, 0.01, 0.02; Shampoo 1e-5 to 3e-4), docs/results.md
_PEER_CURVES: dict[str, dict[str, Any]] = {
    m: _peer_hps(m, lr) for m, lr in {"muon": 5e-3, "soap": 5e-3, "shampoo": 1e-4}.items()}
_PEER_CURVES_NOTES = {m: _peer_note(m, "best lr of a 120 s grid on curves-ae (docs/results.md)")
                      for m in _PEER_CURVES}

#: data set -> (peer defaults, notes): a grid per problem; mnist-ae reuses the fmnist-ae grid's
#: values (same model) until it has its own
_PEER_DEFAULTS: dict[str, tuple[dict[str, dict[str, Any]], dict[str, str]]] = {
    "fashion-mnist": (_PEER_FMNIST, _PEER_FMNIST_NOTES),
    "mnist": (_PEER_FMNIST, _reused("MNIST; same model")),
    "curves": (_PEER_CURVES, _PEER_CURVES_NOTES),
}
# kbfgs-plus (not in the paper): ONE setting for every problem (docs/results.md,
# "kbfgs-plus"); the CNNs keep K-BFGS's T = 20 of Section 6.2 (step time) and its decay per step
PLUS = "kbfgs-plus"
#: kbfgs-plus with Algorithm 2's extra pass on the same minibatch (``closure_free=False``), the
#: ablation of the default, which takes the "+" measurement from the next iteration's pass
PLUS_EXTRA = "kbfgs-plus-extra"
#: KBFGSPlus's own defaults, spelled out here because every result records its hyper-parameters
_PLUS_HPS: dict[str, Any] = {
    k: inspect.signature(KBFGSPlus).parameters[k].default
    for k in RUNNER_METHODS[PLUS].hps}
_PLUS_NOTE = "the one kbfgs-plus setting (docs/results.md, \"kbfgs-plus\")"
_PLUS_GRID: dict[str, tuple[float, ...]] = {"lr": (3e-3, 5e-3, 0.01, 0.02),
                                             "damping": (0.3, 1.0, 3.0)}
_AE_GRIDS = {**paper.AE_GRIDS, **_PEER_AE_GRIDS, PLUS: _PLUS_GRID, PLUS_EXTRA: _PLUS_GRID}

_AE_TABLE5 = {"mnist": "mnist_autoencoder", "fashion-mnist": "mnist_autoencoder",
              "faces": "faces_autoencoder", "curves": "curves_autoencoder"}


def _ae_hps(dataset: str, loss: str) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    table = _TABLE6[dataset]
    hps: dict[str, dict[str, Any]] = {}
    notes: dict[str, str] = {}
    for method in METHODS:
        if method in PEERS or method in (PLUS, PLUS_EXTRA):
            continue
        key = method
        if method in ("kbfgs-no-dpdlm", "kbfgs-no-minibatch"):
            key = "kbfgs"
            notes[method] = _ABLATION_NOTE
        lr, damping = table[key]
        hps[method] = paper.table6_hps(method, lr, damping, _LIKELIHOOD[loss])
    if dataset == "fashion-mnist":
        notes = dict(_FMNIST_NOTES)
    peer_hps, peer_notes = _PEER_DEFAULTS.get(dataset, ({}, {}))
    hps.update({m: dict(hp) for m, hp in peer_hps.items()})
    notes.update(peer_notes)
    hps[PLUS] = dict(_PLUS_HPS)
    notes[PLUS] = _PLUS_NOTE
    hps[PLUS_EXTRA] = {**hps[PLUS], "closure_free": False}
    notes[PLUS_EXTRA] = _PLUS_NOTE + "; the extra pass of Algorithm 2 (ablation)"
    return hps, notes


#: kbfgs-plus on the CNNs: the best of the same 1-epoch grid as the peers' (1e-3, 3e-3, 0.01,
#: extended to 0.03 as 0.01 was its edge), docs/results.md; 5e-3 on the autoencoders
_PLUS_CNN_LR = 0.01
#: the peers on the CNNs: the best validation accuracy of a 1-epoch lr grid on resnet32-fmnist
#: (docs/results.md), with K-BFGS's decoupled decay per step (``lr * weight_decay``)
_PEER_CNN_LR = {"muon": 3e-3, "soap": 3e-3, "shampoo": 1e-4}
_PEER_CNN_NOTES = {m: _peer_note(m, "best lr of a 1-epoch grid on resnet32-fmnist "
                                     "(docs/results.md); decay per step lr * weight_decay as "
                                     "K-BFGS's Table 8 value")
                   for m in _PEER_CNN_LR}


def _cnn_hps(table: dict[str, tuple[Any, Any, Any]]) -> dict[str, dict[str, Any]]:
    hps = {method: paper.table8_hps(method, *entry) for method, entry in table.items()}
    kb = hps["kbfgs"]
    # the same decoupled decay per step as K-BFGS's Table 8 setting: lr * wd unchanged
    per_step = kb["lr"] * kb.get("weight_decay", 0.0)
    hps[PLUS] = {**_PLUS_HPS, "lr": _PLUS_CNN_LR, "weight_decay": per_step / _PLUS_CNN_LR,
                 "update_freq": kb.get("update_freq", 20)}
    hps[PLUS_EXTRA] = {**hps[PLUS], "closure_free": False}
    for m, lr in _PEER_CNN_LR.items():
        hps[m] = {**_peer_hps(m, lr), "weight_decay": per_step / lr}
    return hps


def _autoencoder(name: str, dataset: str, loss: str, budget: float, description: str,
                 eval_subset: int | None = None) -> Problem:
    hps, notes = _ae_hps(dataset, loss)
    source = ("Table 6 (MNIST, FACES, CURVES)" if dataset != "fashion-mnist"
              else "not in the paper: docs/results.md and the notes per method")
    return Problem(name=name, dataset=dataset, model=_AE_TABLE5[dataset], loss=loss,
                   batch_size=1000, hps=hps, hp_notes=notes, source=source,
                   time_budget=budget, eval_subset=eval_subset, grids=_AE_GRIDS,
                   description=description)


_SECOND_ORDER_SCHEDULE = paper.SECOND_ORDER_SCHEDULE  # Section 6.2: K-BFGS, K-BFGS(L), KFAC
_FIRST_ORDER_SCHEDULE = paper.FIRST_ORDER_SCHEDULE  # Section 6.2: SGD-m, Adam


def _cnn(name: str, dataset: str, model: str, image_shape: tuple[int, int, int],
         num_classes: int, table: dict, source: str, notes: dict[str, str] | None = None,
         description: str = "") -> Problem:
    notes = dict(notes or {})
    notes[PLUS] = (f"the kbfgs-plus setting with lr {_PLUS_CNN_LR:g}, the best of a 1-epoch grid "
                   "on resnet32-fmnist" + ("" if name == "resnet32-fmnist" else " (not tuned here)")
                   + ", and K-BFGS's T = 20 and decay per step (docs/results.md)")
    for m, note in _PEER_CNN_NOTES.items():
        notes[m] = note if name == "resnet32-fmnist" else _peer_note(
            m, "the resnet32-fmnist grid's value (not tuned here)")
    return Problem(name=name, dataset=dataset, model=model, loss="ce", batch_size=128,
                   hps=_cnn_hps(table), hp_notes=notes, source=source, classifier=True,
                   image_shape=image_shape, num_classes=num_classes, augment=True,
                   schedule={"second_order": _SECOND_ORDER_SCHEDULE,
                             "first_order": _FIRST_ORDER_SCHEDULE},
                   eval_subset=10_000, grids=paper.CNN_GRIDS, description=description)


_PROBLEMS: dict[str, Problem] = {}


def _register(p: Problem) -> None:
    _PROBLEMS[p.name] = p


_register(_autoencoder("mnist-ae", "mnist", "bce", 500.0,
                       "MNIST autoencoder of Table 5, BCE with logits, batch 1000 "
                       "(paper: 500 s)", eval_subset=10_000))
_register(_autoencoder("faces-ae", "faces", "half_mse", 2000.0,
                       "FACES autoencoder of Table 5, half squared error, batch 1000 "
                       "(paper: 2000 s)", eval_subset=10_000))
_register(_autoencoder("curves-ae", "curves", "bce", 500.0,
                       "CURVES autoencoder of Table 5, BCE with logits, batch 1000 "
                       "(paper: 500 s)"))
_register(_autoencoder("fmnist-ae", "fashion-mnist", "bce", 500.0,
                       "MNIST autoencoder of Table 5 on Fashion-MNIST, BCE with logits, "
                       "batch 1000 (default 500 s as MNIST)", eval_subset=10_000))
_TITLES = {"vgg16": "VGG16-BN", "resnet32": "ResNet32"}
for _model, _mname in (("vgg16_bn", "vgg16"), ("resnet32", "resnet32")):
    for _classes in (10, 100):
        _pname = f"{_mname}-cifar{_classes}"
        _register(_cnn(_pname, f"cifar{_classes}", _model, (3, 32, 32), _classes,
                       paper.TABLE8[_pname], "Table 8",
                       description=f"{_TITLES[_mname]} on CIFAR-{_classes}, batch 128, "
                                   "random crop + flip, Section 6.2 epochs and lr decay"))
_FMNIST_CNN_NOTE = ("not in the paper: ResNet32-CIFAR10 value of Table 8 (not tuned on "
                    "Fashion-MNIST)")
_register(_cnn("resnet32-fmnist", "fashion-mnist", "resnet32", (1, 28, 28), 10,
               paper.TABLE8["resnet32-cifar10"],
               "not in the paper: Table 8 ResNet32-CIFAR10 values",
               notes={m: _FMNIST_CNN_NOTE for m in paper.TABLE8["resnet32-cifar10"]},
               description="ResNet32 on Fashion-MNIST (1x28x28), batch 128, random crop "
                           "(padding 4) + flip, Section 6.2 epochs and lr decay"))

PROBLEM_NAMES: tuple[str, ...] = tuple(_PROBLEMS)


def get_problem(name: str) -> Problem:
    """The problem called ``name`` (ValueError listing the valid names otherwise)."""
    if name not in _PROBLEMS:
        raise ValueError(f"unknown problem {name!r}; valid problems: {', '.join(PROBLEM_NAMES)}")
    return _PROBLEMS[name]


def problems() -> Sequence[Problem]:
    return tuple(_PROBLEMS.values())


def prepare_inputs(problem: Problem, x: Tensor) -> Tensor:
    """Reshape flattened images to (N, C, H, W) for CNN problems (no-op otherwise)."""
    if problem.image_shape is None or x.ndim == 4:
        return x
    return x.reshape(x.shape[0], *problem.image_shape)


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
