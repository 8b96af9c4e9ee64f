"""The numbers the paper reports in Section 6 (Tables 3 and 4) and Appendix D.2.1 (Table 7).

Ren, Bahamou and Goldfarb, "Kronecker-factored Quasi-Newton Methods for Deep Learning". Every
value is a mean over 5 random seeds with the best hyper-parameters of the paper's grid search
(Tables 6 and 8), on the paper's machine (8 Xeon Gold 6248 CPUs and one V100 GPU). ``kbfgs
report`` prints them next to ours, marked as the paper's, with the paper's data set and budget;
``kbfgs reproduce`` runs the rows of these tables (:data:`REPRODUCE_ROWS`).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "AE_PROBLEMS",
    "CNN_PROBLEMS",
    "PAPER_MACHINE",
    "PAPER_SEEDS",
    "REPRODUCE_ROWS",
    "TABLE3",
    "TABLE3_METHODS",
    "TABLE4",
    "TABLE4_METHODS",
    "TABLE7",
    "TABLE7_IMPROVEMENTS",
    "TABLE7_METHODS",
    "PaperValue",
    "paper_budget",
    "paper_data",
    "paper_value",
]

PAPER_SEEDS = 5
PAPER_MACHINE = "8 Xeon Gold 6248 CPUs, one Nvidia V100 GPU"

#: Section 6.1 (Table 3, Table 7) and Section 6.2 (Table 4) problems, in the tables' order
AE_PROBLEMS: tuple[str, ...] = ("mnist-ae", "faces-ae", "curves-ae")
CNN_PROBLEMS: tuple[str, ...] = ("vgg16-cifar10", "resnet32-cifar10", "vgg16-cifar100",
                                 "resnet32-cifar100")

#: Table 3 rows (the dagger row is ``kbfgs-t20``: curvature update frequency T = 20)
TABLE3_METHODS: tuple[str, ...] = ("kbfgs", "kbfgs-t20", "kbfgs-l", "kbfgs-20", "kbfgs-l-20",
                                   "kfac", "adam", "sgd-m")
#: Table 4 rows (K-BFGS(L) is left out of Table 4 by the paper, footnote 2)
TABLE4_METHODS: tuple[str, ...] = ("kbfgs", "kfac", "adam", "sgd-m")
#: Table 7 rows (Appendix D.2.1)
TABLE7_METHODS: tuple[str, ...] = ("kbfgs", "kbfgs-no-dpdlm", "kbfgs-no-minibatch", "kbfgs-20")
#: Table 7: (improvement #1 D_P D_LM, improvement #2 minibatch Hessian-action BFGS) per row
TABLE7_IMPROVEMENTS: dict[str, tuple[bool, bool]] = {
    "kbfgs": (True, True),
    "kbfgs-no-dpdlm": (False, True),
    "kbfgs-no-minibatch": (True, False),
    "kbfgs-20": (False, False),
}

#: Table 3: final training loss, method -> problem -> value
TABLE3: dict[str, dict[str, float]] = {
    "kbfgs": {"mnist-ae": 51.60, "faces-ae": 5.00, "curves-ae": 55.46},
    "kbfgs-t20": {"mnist-ae": 52.01, "faces-ae": 4.62, "curves-ae": 55.06},
    "kbfgs-l": {"mnist-ae": 51.53, "faces-ae": 4.83, "curves-ae": 55.31},
    "kbfgs-20": {"mnist-ae": 52.38, "faces-ae": 5.46, "curves-ae": 56.00},
    "kbfgs-l-20": {"mnist-ae": 54.27, "faces-ae": 4.92, "curves-ae": 55.94},
    "kfac": {"mnist-ae": 51.33, "faces-ae": 4.75, "curves-ae": 54.84},
    "adam": {"mnist-ae": 52.76, "faces-ae": 5.33, "curves-ae": 55.24},
    "sgd-m": {"mnist-ae": 54.75, "faces-ae": 6.47, "curves-ae": 55.97},
}

#: Table 4: final validation accuracy (%), method -> problem -> value
TABLE4: dict[str, dict[str, float]] = {
    "kbfgs": {"vgg16-cifar10": 94.28, "resnet32-cifar10": 93.45, "vgg16-cifar100": 75.65,
              "resnet32-cifar100": 71.46},
    "kfac": {"vgg16-cifar10": 94.44, "resnet32-cifar10": 93.44, "vgg16-cifar100": 76.32,
             "resnet32-cifar100": 71.92},
    "adam": {"vgg16-cifar10": 94.28, "resnet32-cifar10": 93.35, "vgg16-cifar100": 75.64,
             "resnet32-cifar100": 70.35},
    "sgd-m": {"vgg16-cifar10": 94.14, "resnet32-cifar10": 93.13, "vgg16-cifar100": 75.41,
              "resnet32-cifar100": 70.18},
}

#: Table 7: final training loss, method -> problem -> value (K-BFGS and K-BFGS-20 as Table 3)
TABLE7: dict[str, dict[str, float]] = {
    "kbfgs": {"mnist-ae": 51.60, "faces-ae": 5.00, "curves-ae": 55.46},
    "kbfgs-no-dpdlm": {"mnist-ae": 51.92, "faces-ae": 5.39, "curves-ae": 55.86},
    "kbfgs-no-minibatch": {"mnist-ae": 51.45, "faces-ae": 5.26, "curves-ae": 55.88},
    "kbfgs-20": {"mnist-ae": 52.38, "faces-ae": 5.46, "curves-ae": 56.00},
}

#: what ``kbfgs reproduce`` runs: problem -> methods (Table 3 and Table 7 rows for the
#: autoencoders, Table 4 rows for the CNNs)
REPRODUCE_ROWS: dict[str, tuple[str, ...]] = {
    **{p: TABLE3_METHODS + tuple(m for m in TABLE7_METHODS if m not in TABLE3_METHODS)
       for p in AE_PROBLEMS},
    **{p: TABLE4_METHODS for p in CNN_PROBLEMS},
}

_PAPER_DATA = {
    "mnist-ae": "MNIST (LeCun et al., 1998), 60,000 training images",
    "faces-ae": "FACES (Hinton & Salakhutdinov, 2006)",
    "curves-ae": "CURVES (Hinton & Salakhutdinov, 2006), 20,000 training images",
    "vgg16-cifar10": "CIFAR-10, 50,000 training / 10,000 validation images, crop + flip",
    "resnet32-cifar10": "CIFAR-10, 50,000 training / 10,000 validation images, crop + flip",
    "vgg16-cifar100": "CIFAR-100, 50,000 training / 10,000 validation images, crop + flip",
    "resnet32-cifar100": "CIFAR-100, 50,000 training / 10,000 validation images, crop + flip",
}


@dataclass(frozen=True)
class PaperValue:
    """One number of the paper: ``value`` from ``table`` (e.g. "Table 3")."""

    value: float
    table: str
    metric: str  # "train_loss" or "val_acc" (in %)


def paper_value(problem: str, method: str) -> PaperValue | None:
    """The paper's number for (problem, method), or None where the paper has none."""
    if method in TABLE3 and problem in TABLE3[method]:
        return PaperValue(TABLE3[method][problem], "Table 3", "train_loss")
    if method in TABLE7 and problem in TABLE7[method]:
        return PaperValue(TABLE7[method][problem], "Table 7", "train_loss")
    if method in TABLE4 and problem in TABLE4[method]:
        return PaperValue(TABLE4[method][problem], "Table 4", "val_acc")
    return None


def paper_data(problem: str) -> str:
    """The data set the paper used for ``problem`` ('' for problems not in the paper)."""
    return _PAPER_DATA.get(problem, "")


def paper_budget(problem: str, method: str) -> str:
    """The paper's budget for ``method`` on ``problem`` (Section 6.1 / 6.2, as the problem's
    defaults hold it; '' for problems not in the paper)."""
    from .problems import get_problem

    if problem not in _PAPER_DATA:
        return ""
    p = get_problem(problem)
    sched = p.schedule_for(method)
    if sched is not None:
        epochs, every, factor = sched
        return f"{epochs} epochs, lr x{factor:g} every {every}"
    return f"{p.time_budget:g} s process time (paper's machine: V100 GPU)"
