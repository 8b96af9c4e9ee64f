"""Pure tensor math of the paper: BFGS inverse update, the damping schemes, compact L-BFGS.

Every function here is free of module state and hooks, so tests can call it directly. All
functions are written without host synchronisation (no ``.item()``): a rejected pair is
turned into a no-op with ``torch.where``, which keeps them cheap on accelerators.

Notation follows the paper: ``H`` approximates an inverse Hessian factor, ``(s, y)`` is a
curvature pair, ``H y`` the action of ``H`` on ``y``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

Operator = Tensor | Callable[[Tensor], Tensor]

__all__ = [
    "apply_operator",
    "bfgs_update",
    "condition_number",
    "damped_spd_inverse",
    "double_damping",
    "dpdlm",
    "dpidlm",
    "lbfgs_apply",
    "lbfgs_compact_factors",
    "lbfgs_dense",
    "pair_is_valid",
]


def apply_operator(H: Operator, x: Tensor) -> Tensor:
    """``H @ x`` for a dense matrix or a callable operator (e.g. the L-BFGS product)."""
    if callable(H) and not isinstance(H, Tensor):
        return H(x)
    return H @ x


def pair_is_valid(s: Tensor, y: Tensor) -> Tensor:
    """0-dim bool tensor: ``s^T y > 0`` and every entry finite (docs/api.md)."""
    sy = torch.dot(s, y)
    return (sy > 0) & torch.isfinite(sy) & torch.isfinite(s).all() & torch.isfinite(y).all()


def bfgs_update(H: Tensor, s: Tensor, y: Tensor, *, inplace: bool = False) -> tuple[Tensor, Tensor]:
    """BFGS update (11) of an inverse approximation ``H`` with the pair ``(s, y)``.

    ``H+ = (I - rho s y^T) H (I - rho y s^T) + rho s s^T`` with ``rho = 1 / s^T y``, computed in
    the rank-two form ``H+ = H - rho (s u^T + u s^T) + rho (1 + rho y^T u) s s^T``, ``u = H y``:
    O(n^2), no n x n matrix product. ``H`` must be symmetric. The pair is first scaled by
    ``1 / ||s||`` (the update is invariant under a common scaling of ``s`` and ``y``).

    Returns ``(H+, applied)`` where ``applied`` is a 0-dim bool tensor. A pair with ``s^T y <= 0``
    or a non-finite entry is not applied: ``H+`` equals ``H`` exactly.
    """
    # The update is invariant under (s, y) -> (c s, c y); scaling by 1/||s|| keeps rho and rho^2
    # in range for the tiny pairs met in practice (e.g. a conv followed by BatchNorm).
    scale = torch.linalg.vector_norm(s)
    scale = torch.where(scale > 0, 1.0 / scale, torch.zeros_like(scale))
    s, y = s * scale, y * scale
    ok = pair_is_valid(s, y)
    zero = torch.zeros((), dtype=H.dtype, device=H.device)
    s = torch.where(ok, s, zero)
    y = torch.where(ok, y, zero)
    sy = torch.dot(s, y)
    rho = torch.where(ok, 1.0 / torch.where(ok, sy, torch.ones_like(sy)), zero)
    u = H @ y
    c = rho * (1.0 + rho * torch.dot(y, u))
    # H+ = H + s w^T + w s^T with w = (c / 2) s - rho u: one rank-two product, in place
    # (a single pass over H).
    w = 0.5 * c * s - rho * u
    out = H if inplace else H.clone()
    out.addmm_(torch.stack([s, w], dim=1), torch.stack([w, s], dim=0))
    return out, ok


def _powell(s: Tensor, y: Tensor, Hy: Tensor, mu1: float) -> tuple[Tensor, Tensor]:
    """Powell's damping on H (lines 2-7 of Algorithm 1): returns ``(s~, theta1)``."""
    sy = torch.dot(s, y)
    yHy = torch.dot(y, Hy)
    damp = sy < mu1 * yHy
    denom = torch.where(damp, yHy - sy, torch.ones_like(yHy))
    theta = torch.where(damp, (1.0 - mu1) * yHy / denom, torch.ones_like(yHy))
    return theta * s + (1.0 - theta) * Hy, theta


def _check_mu1(mu1: float) -> None:
    if not 0.0 < mu1 < 1.0:
        raise ValueError(f"mu1 must be in (0, 1), got {mu1}")


def dpdlm(s: Tensor, y: Tensor, H: Operator, mu1: float, mu2: float
          ) -> tuple[Tensor, Tensor, Tensor]:
    """D_P D_LM (Algorithm 1): Powell's damping on ``H``, then Levenberg-Marquardt damping.

    Guarantees ``s~^T y >= mu1 y^T H y`` and ``s~^T y~ >= mu2 ||s~||^2``.
    Returns ``(s~, y~, theta1)``.
    """
    _check_mu1(mu1)
    if not mu2 > 0.0:
        raise ValueError(f"mu2 must be > 0, got {mu2}")
    s_t, theta = _powell(s, y, apply_operator(H, y), mu1)
    return s_t, y + mu2 * s_t, theta


def dpidlm(s: Tensor, y: Tensor, mu1: float, mu2: float) -> tuple[Tensor, Tensor, Tensor]:
    """D_P(I) D_LM (Algorithm 4): Algorithm 1 with ``H`` replaced by ``I / mu2``.

    Satisfies Lemma 5.1: ``s~^T s~ / s~^T y~ <= 1/mu2`` and
    ``y~^T y~ / s~^T y~ <= 1/mu3`` with ``mu3 = mu1 / (mu2 (1 + 2 mu1))``.
    """
    _check_mu1(mu1)
    if not mu2 > 0.0:
        raise ValueError(f"mu2 must be > 0, got {mu2}")
    s_t, theta = _powell(s, y, y / mu2, mu1)
    return s_t, y + mu2 * s_t, theta


def double_damping(
    s: Tensor, y: Tensor, H: Operator, mu1: float, mu2: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The double damping of Goldfarb et al. (2020) (K-BFGS-20; docs/api.md).

    Powell's damping on ``H`` with ``mu1``, then, with ``mu2`` in (0, 1]: if
    ``s^T y < mu2 s^T s``, ``y <- theta2 y + (1 - theta2) s`` with
    ``theta2 = (1 - mu2) s^T s / (s^T s - s^T y)``. Returns ``(s~, y~, theta1, theta2)``.
    """
    _check_mu1(mu1)
    if not 0.0 < mu2 <= 1.0:
        raise ValueError(
            f"double damping needs mu2 = lambda_G in (0, 1], got {mu2}; "
            "use damping_rule='dpdlm' or a smaller damping"
        )
    s_t, theta1 = _powell(s, y, apply_operator(H, y), mu1)
    ss = torch.dot(s_t, s_t)
    sy = torch.dot(s_t, y)
    damp = sy < mu2 * ss
    denom = torch.where(damp, ss - sy, torch.ones_like(ss))
    theta2 = torch.where(damp, (1.0 - mu2) * ss / denom, torch.ones_like(ss))
    return s_t, theta2 * y + (1.0 - theta2) * s_t, theta1, theta2


def lbfgs_compact_factors(S: Tensor, Y: Tensor, gamma: float) -> tuple[Tensor, Tensor]:
    """Compact representation (Byrd, Nocedal and Schnabel 1994, Theorem 2.2) of L-BFGS.

    ``S`` and ``Y`` are ``n x k`` with the pairs as columns, oldest first; ``H_0 = gamma I``.
    Returns ``(U, M)`` with ``U = [S, Y]`` (``n x 2k``) and ``M`` (``2k x 2k``) such that

        H = gamma I + U M U^T,
        M = [[R^-T (D + gamma Y^T Y) R^-1, -gamma R^-T], [-gamma R^-1, 0]],

    ``R`` the upper triangle of ``S^T Y`` and ``D`` its diagonal. ``H`` equals ``k`` sequential
    BFGS updates (11) of ``gamma I`` with the pairs in order.
    """
    k = S.shape[1]
    SY = S.mT @ Y
    R = torch.triu(SY)
    D = torch.diag(torch.diagonal(SY))
    eye = torch.eye(k, dtype=S.dtype, device=S.device)
    Rinv = torch.linalg.solve_triangular(R, eye, upper=True)
    top_left = Rinv.mT @ (D + gamma * (Y.mT @ Y)) @ Rinv
    M = torch.zeros(2 * k, 2 * k, dtype=S.dtype, device=S.device)
    M[:k, :k] = top_left
    M[:k, k:] = -gamma * Rinv.mT
    M[k:, :k] = -gamma * Rinv
    return torch.cat([S, Y], dim=1), M


def lbfgs_apply(U: Tensor, M: Tensor, gamma: float, X: Tensor) -> Tensor:
    """``H X`` for the compact L-BFGS operator ``H = gamma I + U M U^T``; ``X`` is ``n`` or
    ``n x c``.

    Three matrix products on the whole matrix ``X`` (no per-column two-loop recursion).
    """
    if U.shape[1] == 0:
        return gamma * X
    return torch.addmm(gamma * X, U, M @ (U.mT @ X)) if X.dim() == 2 else (
        gamma * X + U @ (M @ (U.mT @ X))
    )


def lbfgs_dense(U: Tensor, M: Tensor, gamma: float, n: int) -> Tensor:
    """The dense ``n x n`` matrix of the compact operator (diagnostics only)."""
    eye = torch.eye(n, dtype=M.dtype, device=M.device)
    return lbfgs_apply(U, M, gamma, eye)


def damped_spd_inverse(M: Tensor, damping: float | Tensor) -> tuple[Tensor, bool]:
    """``(M + damping I)^-1`` for a symmetric positive semi-definite ``M`` and ``damping > 0``.

    The damped inverses of the paper: Algorithm 3's ``H_A = (A + lambda_A I)^-1`` (and the warm
    start of Algorithm 2 line 3), Algorithm 5 line 19's ``(Omega + pi sqrt(lambda) I)^-1`` and
    ``(Gamma + sqrt(lambda) / pi I)^-1``. By Cholesky; when the factorisation fails (``damping``
    below rounding level relative to ``M``), by the eigenvalues of the symmetrised matrix
    clamped to ``damping``, their exact lower bound. Returns ``(inverse, used_the_fallback)``.
    One host synchronisation (the Cholesky status), as a raising Cholesky has.
    """
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    D = M + damping * eye
    L, info = torch.linalg.cholesky_ex(D)
    if int(info) == 0:
        return torch.cholesky_inverse(L), False
    ev, V = torch.linalg.eigh(0.5 * (D + D.mT))
    return (V / ev.clamp_min(damping)) @ V.mT, True


def condition_number(H: Tensor) -> float:
    """Condition number of a symmetric positive definite matrix: the ratio of its largest to
    its smallest eigenvalue (in float64); ``inf`` when the smallest is not positive."""
    ev = torch.linalg.eigvalsh(H.double())
    lo = float(ev[0])
    return float("inf") if lo <= 0 else float(ev[-1]) / lo
