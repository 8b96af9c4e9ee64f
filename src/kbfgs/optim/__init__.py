"""Optimizers: K-BFGS / K-BFGS(L) and the baselines."""

from .kbfgs import KBFGS

__all__ = ["KBFGS"]
