"""``kbfgs-plus``: K-BFGS's curvature with the step size of Adam (layer-wise norm grafting).

Not in the paper. The direction of every Kronecker layer is K-BFGS's ``P = H_G BUF_W H_A``
(Algorithm 2, unchanged: the same H_A, H_G, damping and curvature pairs); only its length is
replaced, layer by layer, by the length of the step Adam would take on that layer:

    D = m_hat / (sqrt(v_hat) + eps),   P <- P * ||D||_F / ||P||_F,

with ``m_hat`` the bias-corrected average of the gradients (read from K-BFGS's own momentum
buffer, ``m = (1 - beta1) buf``, ``beta1 = momentum``) and ``v_hat`` Adam's bias-corrected
second moment (``beta2``). This is the grafting of Shampoo (Agarwal et al. 2020; Gupta et al.
2018): the preconditioner chooses the direction, a diagonal method the per-layer step size.
``lr`` is therefore in Adam's units (about 1e-3 to 1e-2), and the step no longer depends on the
scale of H_A and H_G, so one setting trains every problem here (docs/results.md, "kbfgs-plus").
Every other parameter (biases of non-Kronecker modules, BatchNorm, embeddings...) gets Adam
with the same ``lr``. The decay is decoupled as in K-BFGS: ``W <- (1 - lr wd) W``.

Cost over K-BFGS: one extra ``p``-sized buffer (``exp_avg_sq``) per parameter and a few
element-wise operations per step; no host synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..capture import KroneckerLayer
from .base import momentum_buffers
from .kbfgs import KBFGS, KBFGSLayerState
from .validation import check_number

__all__ = ["KBFGSPlus", "adam_direction", "graft"]


def adam_direction(buf: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, step: int,
                   eps: float) -> Tensor:
    """Adam's step direction ``m_hat / (sqrt(v_hat) + eps)`` from a heavy-ball momentum buffer
    ``buf = beta1 buf + g`` (so ``m = (1 - beta1) buf`` is Adam's first moment) and Adam's
    second moment ``exp_avg_sq``, both after ``step`` updates (bias-corrected)."""
    m_hat = buf * ((1.0 - beta1) / (1.0 - beta1 ** step)) if beta1 > 0 else buf
    denom = (exp_avg_sq / (1.0 - beta2 ** step)).sqrt_().add_(eps)
    return m_hat / denom


def graft(P: Tensor, norm: Tensor) -> Tensor:
    """``P`` rescaled in place to the Frobenius norm ``norm`` (a 0-dim tensor; no host sync).
    A zero ``P`` stays zero."""
    scale = norm / torch.linalg.vector_norm(P).clamp_min(torch.finfo(P.dtype).tiny)
    return P.mul_(scale.to(P.dtype))


class KBFGSPlus(KBFGS):
    """K-BFGS (or K-BFGS(L) with ``history``) whose per-layer step length is Adam's.

    Args: as :class:`kbfgs.KBFGS`, with ``lr`` in Adam's units (default 3e-3), curvature
    every ``update_freq = 3`` steps (the grafted step does not need it more often:
    docs/results.md, "kbfgs-plus"), and
        beta2: decay of Adam's second moment (0.999).
        eps: Adam's epsilon (1e-8).
    ``momentum`` is Adam's beta1 as well as K-BFGS's momentum. See the module docstring and
    docs/api.md ("kbfgs-plus").
    """

    def __init__(self, model: nn.Module, lr: float = 3e-3, damping: float = 1.0,
                 momentum: float = 0.9, update_freq: int = 3, weight_decay: float = 0.0,
                 history: int | None = None, *, beta2: float = 0.999, eps: float = 1e-8,
                 **kwargs: Any) -> None:
        check_number("beta2", beta2, 0.0, high=1.0)
        if not beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
        check_number("eps", eps, 0.0, strict=True)
        self.beta2 = float(beta2)
        self.eps = float(eps)
        super().__init__(model, lr, damping, momentum, update_freq, weight_decay, history,
                         **kwargs)

    def _second_moment(self, p: Tensor) -> tuple[Tensor, int]:
        """Update Adam's second moment of ``p`` with ``p.grad``; returns it and its count."""
        st = self.state[p]
        if "exp_avg_sq" not in st:
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["adam_step"] = 0
        st["adam_step"] = int(st["adam_step"]) + 1
        v = st["exp_avg_sq"]
        g = p.grad
        assert g is not None
        v.mul_(self.beta2).addcmul_(g, g, value=1.0 - self.beta2)
        return v, st["adam_step"]

    def _precondition(self, layer: KroneckerLayer, st: KBFGSLayerState) -> Tensor:
        P = super()._precondition(layer, st)
        beta1 = self.param_groups[0]["momentum"]
        sq = torch.zeros((), dtype=torch.float32, device=P.device)
        for view, p in zip(layer.helper.split_matrix(st.buf), layer.helper.params()):
            if p.grad is None:
                continue
            v, k = self._second_moment(p)
            d = adam_direction(view.reshape(p.shape), v, beta1, self.beta2, k, self.eps)
            sq = sq + d.float().pow(2).sum()
        return graft(P, sq.sqrt())

    def _update_others(self, others: list[Tensor], group: dict[str, Any]) -> None:
        """Adam (decoupled decay) on every parameter that is not preconditioned, with the
        momentum buffer as Adam's first moment."""
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p, buf in zip(others, momentum_buffers(self.state, others)):
            assert p.grad is not None  # others hold only parameters with a gradient
            buf.mul_(mom).add_(p.grad)
            v, k = self._second_moment(p)
            d = adam_direction(buf, v, mom, self.beta2, k, self.eps)
            if wd != 0:
                p.mul_(1.0 - lr * wd)
            p.add_(d.to(p.dtype), alpha=-lr)
