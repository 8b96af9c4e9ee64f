"""K-BFGS and K-BFGS(L) (Algorithm 2), with the 2020 variants of spec section 4.

The optimizer owns state and the order of operations; the math comes from ``kbfgs.linalg``
(BFGS update, damping, compact L-BFGS) and ``kbfgs.layers`` (per-layer vectors), the vectors
from ``kbfgs.capture`` (hooks that exist only during a curvature pass).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from .. import distributed, linalg
from ..capture import KroneckerLayer, LayerRecord
from .base import KroneckerOptimizer, aligned_copy, two_sided_product

__all__ = ["KBFGS"]

_DAMPING_RULES = ("dpdlm", "dd", "dpidlm")
_HESSIAN_ACTIONS = ("minibatch", "moving_average", "exact")
_SPLITS = ("spatial", "sqrt")


class KBFGS(KroneckerOptimizer):
    """K-BFGS / K-BFGS(L) of Ren, Bahamou and Goldfarb (Algorithm 2).

    Args:
        model: the ``nn.Module`` to train (or a ``DistributedDataParallel`` wrapping it). Every
            ``nn.Linear`` / ``nn.Conv2d`` with a trainable weight is a Kronecker layer; every
            other trainable parameter gets momentum SGD with learning rate ``lr / damping``.
        lr: learning rate alpha (``param_groups[0]["lr"]`` is read every step).
        damping: the single damping hyper-parameter lambda.
        momentum: beta of the momentum ``buf = momentum * buf + grad`` (in [0, 1)).
        update_freq: curvature update frequency T (first update at step T).
        weight_decay: decoupled weight decay gamma: ``W -= lr * (p + gamma W)``.
        history: ``None`` for dense BFGS on H_G (K-BFGS), or the number of L-BFGS pairs
            (K-BFGS(L), the paper uses 100).
        loss_reduction: ``"mean"`` (the closure returns the batch mean) or ``"sum"``.
        damping_rule: ``"dpdlm"`` (Algorithm 1), ``"dd"`` (double damping of the 2020 method) or
            ``"dpidlm"`` (Algorithm 4, the convergence-theory variant).
        hessian_action: ``"minibatch"`` (eq. 15), ``"moving_average"`` (2020: explicit A with a
            moving average) or ``"exact"`` (Algorithm 3: ``H_A = (A_minibatch + lambda_A I)^-1``).
        damping_split: ``"spatial"`` (Algorithm 2 line 2) or ``"sqrt"`` (2020: sqrt(lambda) both).
        mu1: Powell damping constant (0.2).
        beta: decay of the moving averages of s_G, y_G (and of A for ``moving_average``) (0.9).
        check_finite: skip a step whose loss or gradient is not finite (one host sync a step).
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        momentum: float = 0.9,
        update_freq: int = 1,
        weight_decay: float = 0.0,
        history: Optional[int] = None,
        *,
        loss_reduction: str = "mean",
        damping_rule: str = "dpdlm",
        hessian_action: str = "minibatch",
        damping_split: str = "spatial",
        mu1: float = 0.2,
        beta: float = 0.9,
        check_finite: bool = True,
    ) -> None:
        if history is not None and (isinstance(history, bool) or int(history) != history
                                    or history < 1):
            raise ValueError(f"history must be None or an integer >= 1, got {history!r}")
        _check_choice("damping_rule", damping_rule, _DAMPING_RULES)
        _check_choice("hessian_action", hessian_action, _HESSIAN_ACTIONS)
        _check_choice("damping_split", damping_split, _SPLITS)
        if not 0.0 < mu1 < 1.0:
            raise ValueError(f"mu1 must be in (0, 1), got {mu1}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must be in [0, 1), got {beta}")
        self.history = None if history is None else int(history)
        self.damping_rule = damping_rule
        self.hessian_action = hessian_action
        self.damping_split = damping_split
        self.mu1 = float(mu1)
        self.beta = float(beta)
        super().__init__(
            model,
            dict(lr=lr, damping=damping, momentum=momentum, weight_decay=weight_decay),
            update_freq=update_freq,
            update_freq_name="update_freq",
            loss_reduction=loss_reduction,
            check_finite=check_finite,
        )
        for layer in self.layers:  # conv layers with the spatial split are checked at first use
            if not (layer.helper.is_conv and damping_split == "spatial"):
                self._check_dd(layer, 1)

    def _check_dd(self, layer: KroneckerLayer, locations: int) -> None:
        if self.damping_rule != "dd":
            return
        lam_G = self._lambdas(layer, locations)[1]
        if not 0.0 < lam_G <= 1.0:
            raise ValueError(
                f"damping_rule='dd' needs mu2 = lambda_G in (0, 1], but layer '{layer.name}' has "
                f"lambda_G = {lam_G:.4g} (damping={self.param_groups[0]['damping']}); use a "
                "damping <= 1 or damping_rule='dpdlm'")

    # ------------------------------------------------------------------ step
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:  # type: ignore[override]
        """One iteration of Algorithm 2. ``closure`` zeroes the gradients, runs the forward pass,
        computes the batch-mean loss, calls ``backward`` and returns the loss. On curvature
        iterations (k % update_freq == 0) it is called a second time on the same minibatch
        after the parameter update (same random numbers, no parameter gradients, module buffers
        restored). Returns the loss of the first call."""
        closure = self._require_closure(closure)
        k = self.steps + 1
        curvature = k % self.update_freq == 0
        first = any(layer.name not in self.layer_state for layer in self.layers)
        t0 = time.perf_counter()
        group = distributed.process_group(self.model) if curvature else None
        if curvature:
            self._save_rng()
            ctx = self.capture.record("pre", s_A_fn=self._s_A_by_name,
                                      need_A=self._needs_explicit_A(),
                                      defer_A_s=group is not None)
        elif first:
            ctx = self.capture.record("probe")
        else:
            ctx = contextlib.nullcontext({})
        known = set(self.layer_state)
        with ctx as pre, distributed.exact_A_s(self.model, pre, self.capture,
                                               self._s_A_by_name, group):
            loss = closure()
        self.times["forward_backward"] += time.perf_counter() - t0
        if self.check_finite and not self._all_finite(loss):
            for name in set(self.layer_state) - known:  # created lazily in this pass
                del self.layer_state[name]
            return self._skip_step(loss)
        self._take_step(pre, k)
        if curvature and self.layers:
            t1 = time.perf_counter()
            with self._extra_pass(), self.capture.record(
                    "post", make_output_require_grad=True) as post:
                closure()
            self._check_records(post)
            t2 = time.perf_counter()
            self.times["extra_pass"] += t2 - t1
            with torch.no_grad():
                distributed.reduce_curvature(pre, post, group)
                self._curvature_update(pre, post)
            self.curvature_updates += 1
            self.times["curvature"] += time.perf_counter() - t2
        return loss

    def _s_A_by_name(self, name: str, rec: LayerRecord) -> Optional[Tensor]:
        layer = next(ly for ly in self.layers if ly.name == name)
        return self._s_A(layer, rec)

    # ------------------------------------------------------------------ layer state
    def _other_lr_scale(self, group: dict) -> float:
        return 1.0 / group["damping"]

    def _lambdas(self, layer: KroneckerLayer, locations: int) -> tuple[float, float]:
        from ..layers import damping_split

        return damping_split(self.param_groups[0]["damping"], locations, layer.helper.is_conv,
                             self.damping_split)

    def _init_layer(self, layer: KroneckerLayer, locations: int, A0: Optional[Tensor] = None) -> dict:
        self._check_dd(layer, locations)
        rows, cols = layer.helper.dims(layer.module)
        dtype, device = self._curvature_dtype(layer.module), layer.module.weight.device
        lam_A, lam_G = self._lambdas(layer, locations)
        st = self.layer_state.get(layer.name)
        if st is None:
            st = {
                "locations": locations,
                "buf": aligned_copy(torch.zeros(rows, cols, dtype=layer.module.weight.dtype,
                                                device=device)),
                "s_G": torch.zeros(rows, dtype=dtype, device=device),
                "y_G": torch.zeros(rows, dtype=dtype, device=device),
                "skipped_A": torch.zeros((), dtype=torch.int64, device=device),
                "skipped_G": torch.zeros((), dtype=torch.int64, device=device),
                "theta": torch.ones((), dtype=dtype, device=device),
            }
            if self.history is None:
                st["H_G"] = aligned_copy(torch.eye(rows, dtype=dtype, device=device) / lam_G)
            else:
                st["S"] = torch.zeros(rows, 0, dtype=dtype, device=device)
                st["Y"] = torch.zeros(rows, 0, dtype=dtype, device=device)
            self.layer_state[layer.name] = st
        st["locations"] = locations
        eye = torch.eye(cols, dtype=dtype, device=device)
        if A0 is None:
            st["H_A"] = aligned_copy(eye / lam_A)
        else:
            st["H_A"] = aligned_copy(torch.cholesky_inverse(torch.linalg.cholesky(A0 + lam_A * eye)))
        if self.hessian_action == "moving_average":
            st["A"] = torch.zeros_like(eye) if A0 is None else A0.clone()
        return st

    # ------------------------------------------------------------------ the step
    def _precondition(self, layer: KroneckerLayer, st: dict) -> Tensor:
        return two_sided_product(self._H_G_operator(layer, st), st["buf"], st["H_A"],
                                 self._scratch)

    def _lbfgs_factors(self, layer: KroneckerLayer, st: dict) -> tuple[Tensor, Tensor, float]:
        gamma = 1.0 / self._lambdas(layer, st["locations"])[1]
        cache = st.get("_lbfgs")
        if cache is None or cache[2] != gamma:
            U, M = linalg.lbfgs_compact_factors(st["S"], st["Y"], gamma)
            cache = (U, M, gamma)
            st["_lbfgs"] = cache
        return cache

    def _H_G_operator(self, layer: KroneckerLayer, st: dict):
        if self.history is None:
            return st["H_G"]
        U, M, gamma = self._lbfgs_factors(layer, st)
        return lambda x: linalg.lbfgs_apply(U, M, gamma, x)

    def _needs_explicit_A(self) -> bool:
        return self.hessian_action in ("moving_average", "exact")

    def _s_A(self, layer: KroneckerLayer, rec: LayerRecord) -> Optional[Tensor]:
        st = self.layer_state.get(layer.name)
        if st is None:
            st = self._init_layer(layer, rec.locations)
        if self.hessian_action == "exact":
            return None
        return st["H_A"] @ rec.a_bar

    def _curvature_update(self, pre: dict[str, LayerRecord], post: dict[str, LayerRecord]) -> None:
        beta = self.beta
        pending = []
        for layer in self.layers:
            r0, r1 = pre.get(layer.name), post.get(layer.name)
            st = self.layer_state.get(layer.name)
            if st is None or r0 is None or r1 is None or r0.h_bar is None or r1.h_bar is None \
                    or r0.Dh_bar is None or r1.Dh_bar is None:
                continue
            lam_A, lam_G = self._lambdas(layer, st["locations"])
            # ---- H_A
            if self.hessian_action == "exact":
                eye = torch.eye(r0.A.shape[0], dtype=r0.A.dtype, device=r0.A.device)
                st["H_A"].copy_(torch.cholesky_inverse(torch.linalg.cholesky(r0.A + lam_A * eye)))
            else:
                s_A = r0.s_A
                if self.hessian_action == "moving_average":
                    st["A"].mul_(beta).add_(r0.A, alpha=1.0 - beta)
                    y_A = st["A"] @ s_A + lam_A * s_A
                else:
                    y_A = r0.A_s + lam_A * s_A
                _, ok = linalg.bfgs_update(st["H_A"], s_A, y_A, inplace=True)
                st["skipped_A"] += (~ok).long()
            # ---- s_G, y_G moving averages (kept unchanged if the new vectors are not finite)
            s_new = beta * st["s_G"] + (1.0 - beta) * (r1.h_bar - r0.h_bar)
            y_new = beta * st["y_G"] + (1.0 - beta) * (r1.Dh_bar - r0.Dh_bar)
            fin = torch.isfinite(s_new).all() & torch.isfinite(y_new).all()
            st["s_G"] = torch.where(fin, s_new, st["s_G"])
            st["y_G"] = torch.where(fin, y_new, st["y_G"])
            s, y = st["s_G"], st["y_G"]
            H = self._H_G_operator(layer, st)
            if self.damping_rule == "dpdlm":
                s_t, y_t, theta = linalg.dpdlm(s, y, H, self.mu1, lam_G)
            elif self.damping_rule == "dpidlm":
                s_t, y_t, theta = linalg.dpidlm(s, y, self.mu1, lam_G)
            else:
                s_t, y_t, theta, _ = linalg.double_damping(s, y, H, self.mu1, lam_G)
            st["theta"] = theta
            # a non-finite extra pass forms no pair: the zero pair is skipped and counted
            s_t = torch.where(fin, s_t, torch.zeros_like(s_t))
            y_t = torch.where(fin, y_t, torch.zeros_like(y_t))
            if self.history is None:
                _, ok = linalg.bfgs_update(st["H_G"], s_t, y_t, inplace=True)
                st["skipped_G"] += (~ok).long()
            else:
                pending.append((st, s_t, y_t, linalg.pair_is_valid(s_t, y_t)))
        if pending:  # L-BFGS: the pair list changes shape, so one host sync for all layers
            oks = torch.stack([p[3] for p in pending]).tolist()
            for (st, s_t, y_t, _), ok in zip(pending, oks):
                if not ok:
                    st["skipped_G"] += 1
                    continue
                # BFGS is invariant under (s, y) -> (s, y) / ||s||: store unit-norm s
                c = 1.0 / torch.linalg.vector_norm(s_t)
                S = torch.cat([st["S"], (c * s_t)[:, None]], dim=1)[:, -self.history:]
                Y = torch.cat([st["Y"], (c * y_t)[:, None]], dim=1)[:, -self.history:]
                st["S"], st["Y"] = S.contiguous(), Y.contiguous()
                st.pop("_lbfgs", None)

    # ------------------------------------------------------------------ diagnostics
    def _layer_stats(self, layer: KroneckerLayer, st: dict, condition: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "skipped_A": int(st["skipped_A"]),
            "skipped_G": int(st["skipped_G"]),
            "theta": float(st["theta"]),
        }
        if self.history is not None:
            out["pairs"] = int(st["S"].shape[1])
        if condition:
            out["cond_H_A"] = _cond(st["H_A"])
            if self.history is None:
                out["cond_H_G"] = _cond(st["H_G"])
            else:
                U, M, gamma = self._lbfgs_factors(layer, st)
                out["cond_H_G"] = _cond(linalg.lbfgs_dense(U, M, gamma, st["S"].shape[0]))
        return out


def _cond(H: Tensor) -> float:
    """Condition number of a symmetric positive definite matrix (eigenvalue ratio)."""
    ev = torch.linalg.eigvalsh(H.double())
    lo = float(ev[0])
    return float("inf") if lo <= 0 else float(ev[-1]) / lo


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
