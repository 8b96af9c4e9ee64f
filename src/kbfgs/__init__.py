"""kbfgs: Kronecker-factored quasi-Newton optimizers (K-BFGS, K-BFGS(L)) for PyTorch.

Implements Ren, Bahamou and Goldfarb, "Kronecker-factored Quasi-Newton Methods for Deep
Learning" (Algorithm 2), the 2020 variants for ablation, and the KFAC baseline (Algorithm 5).
"""

from .optim import KBFGS, KFAC, make_optimizer

__version__ = "0.1.0"

__all__ = ["KBFGS", "KFAC", "__version__", "make_optimizer"]
