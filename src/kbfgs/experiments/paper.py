"""The paper's numbers, written once: Tables 6 and 8, Section 6's update frequencies and
schedules, and the grids of Appendix D.2 / D.3.

Keys are the runner's method names (``kbfgs-t20`` is Table 3's dagger row, K-BFGS with T = 20).
:mod:`kbfgs.experiments.problems` builds every problem's defaults from these tables and the
benchmarks (``bench/``) read them through the problems; nothing else restates them.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AE_GRIDS",
    "AE_KFAC_FREQS",
    "CNN_GRIDS",
    "CNN_KBFGS_UPDATE_FREQ",
    "CNN_KFAC_FREQS",
    "FIRST_ORDER_SCHEDULE",
    "SECOND_ORDER_SCHEDULE",
    "TABLE6",
    "TABLE8",
    "ae_update_freq",
    "table6_hps",
    "table8_hps",
]

#: Table 6: ``TABLE6[dataset][method] = (lr, damping)``; damping None for SGD-m (no damping).
#: Adam's damping is its epsilon.
TABLE6: dict[str, dict[str, tuple[float, float | None]]] = {
    "mnist": {"kbfgs": (0.03, 0.3), "kbfgs-t20": (0.3, 30), "kbfgs-l": (0.03, 0.3),
              "kbfgs-20": (0.01, 0.1), "kbfgs-l-20": (0.003, 0.1), "kfac": (0.3, 10),
              "adam": (1e-4, 1e-4), "sgd-m": (0.003, None)},
    "faces": {"kbfgs": (0.03, 1), "kbfgs-t20": (0.03, 3), "kbfgs-l": (0.03, 1),
              "kbfgs-20": (0.01, 0.3), "kbfgs-l-20": (0.01, 0.3), "kfac": (0.03, 0.1),
              "adam": (1e-4, 1e-4), "sgd-m": (0.001, None)},
    "curves": {"kbfgs": (0.03, 0.3), "kbfgs-t20": (0.3, 30), "kbfgs-l": (0.1, 3),
               "kbfgs-20": (0.01, 0.03), "kbfgs-l-20": (0.003, 0.03), "kfac": (0.3, 10),
               "adam": (1e-3, 1e-3), "sgd-m": (0.003, None)},
}

#: Table 8: ``TABLE8[problem][method] = (lr, weight decay, damping)``; damping None for SGD-m.
TABLE8: dict[str, dict[str, tuple[float, float, float | None]]] = {
    "vgg16-cifar10": {"kbfgs": (30, 1e-5, 1e4), "kbfgs-l": (1, 1e-3, 100),
                      "kfac": (0.01, 0.1, 10), "adam": (0.003, 0.1, 0.1),
                      "sgd-m": (0.003, 0.1, None)},
    "resnet32-cifar10": {"kbfgs": (100, 1e-5, 1e3), "kbfgs-l": (1e3, 1e-6, 1e4),
                         "kfac": (0.01, 0.1, 0.01), "adam": (0.003, 0.1, 0.01),
                         "sgd-m": (0.03, 0.01, None)},
    "vgg16-cifar100": {"kbfgs": (0.1, 0.01, 10), "kbfgs-l": (0.3, 0.001, 100),
                       "kfac": (0.01, 0.1, 1), "adam": (3e-4, 1, 0.01),
                       "sgd-m": (0.003, 0.1, None)},
    "resnet32-cifar100": {"kbfgs": (1e3, 1e-6, 1e4), "kbfgs-l": (10, 1e-4, 100),
                          "kfac": (0.01, 0.1, 0.001), "adam": (0.01, 0.1, 0.01),
                          "sgd-m": (0.03, 0.01, None)},
}

#: Section 6.1: KFAC on the autoencoders with (T1, T2) = (1, 20).
AE_KFAC_FREQS = (1, 20)
#: Section 6.2: KFAC on the CNNs with (T1, T2) = (10, 100) (as Zhang et al. 2019).
CNN_KFAC_FREQS = (10, 100)
#: Section 6.2: K-BFGS and K-BFGS(L) on the CNNs with T = 20.
CNN_KBFGS_UPDATE_FREQ = 20
#: Section 6.2: (epochs, decay every, decay factor) of K-BFGS, K-BFGS(L) and KFAC ...
SECOND_ORDER_SCHEDULE = (150, 50, 0.1)
#: ... and of SGD-m and Adam.
FIRST_ORDER_SCHEDULE = (200, 60, 0.1)
#: L-BFGS pairs of K-BFGS(L) (Section 6).
HISTORY = 100


def ae_update_freq(method: str) -> int:
    """Section 6.1: T = 1 for every Kronecker quasi-Newton method, T = 20 for the dagger row."""
    return 20 if method == "kbfgs-t20" else 1


# Appendix D.2 grids (autoencoders).
_AE_LRS = (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0)
AE_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "kbfgs": {"lr": _AE_LRS, "damping": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)},
    "kfac": {"lr": _AE_LRS, "damping": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)},
    "adam": {"lr": _AE_LRS, "damping": (1e-8, 1e-4, 1e-3, 0.01, 0.1)},
    "sgd-m": {"lr": _AE_LRS},
}

# Appendix D.3 grids (CNNs).
CNN_GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "kbfgs": {"lr": (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1e3, 3e3),
              "weight_decay": (1e-7, 1e-6, 1e-5, 1e-4, 1e-3, 0.01, 0.1),
              "damping": (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)},
    "kfac": {"lr": (1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3), "weight_decay": (0.001, 0.01, 0.1, 1.0),
             "damping": (1e-4, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)},
    "adam": {"lr": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1),
             "weight_decay": (0.01, 0.1, 1.0, 10.0), "damping": (1e-8, 1e-4, 0.01, 0.1, 1.0)},
    "sgd-m": {"lr": (3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3),
              "weight_decay": (1e-3, 0.01, 0.1, 1.0)},
}


def table6_hps(method: str, lr: float, damping: float | None, likelihood: str
               ) -> dict[str, Any]:
    """A Table 6 entry as the runner's hyper-parameters, with Section 6.1's settings
    (momentum 0.9, no weight decay, the update frequencies, 100 L-BFGS pairs)."""
    hp: dict[str, Any] = {"lr": lr}
    if damping is not None:
        hp["damping"] = damping
    if method == "sgd-m":
        hp.update(weight_decay=0.0, momentum=0.9)
    elif method == "adam":
        hp.update(weight_decay=0.0)
    elif method == "kfac":
        hp.update(weight_decay=0.0, momentum=0.9, stat_freq=AE_KFAC_FREQS[0],
                  inv_freq=AE_KFAC_FREQS[1], likelihood=likelihood)
    else:
        hp.update(weight_decay=0.0, momentum=0.9, update_freq=ae_update_freq(method))
        if method in ("kbfgs-l", "kbfgs-l-20"):
            hp["history"] = HISTORY
    return hp


def table8_hps(method: str, lr: float, weight_decay: float, damping: float | None
               ) -> dict[str, Any]:
    """A Table 8 entry as the runner's hyper-parameters, with Section 6.2's settings."""
    hp: dict[str, Any] = {"lr": float(lr), "weight_decay": float(weight_decay)}
    if damping is not None:
        hp["damping"] = float(damping)
    if method == "sgd-m":
        hp["momentum"] = 0.9
    elif method == "kfac":
        hp.update(momentum=0.9, stat_freq=CNN_KFAC_FREQS[0], inv_freq=CNN_KFAC_FREQS[1],
                  likelihood="categorical")
    elif method.startswith("kbfgs"):
        hp.update(momentum=0.9, update_freq=CNN_KBFGS_UPDATE_FREQ)
        if method == "kbfgs-l":
            hp["history"] = HISTORY
    return hp
