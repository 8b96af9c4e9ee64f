"""Optimizers: K-BFGS / K-BFGS(L) and the baselines."""

from .factory import make_optimizer
from .kbfgs import KBFGS
from .kfac import KFAC

__all__ = ["KBFGS", "KFAC", "make_optimizer"]
