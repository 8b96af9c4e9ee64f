"""K-BFGS and K-BFGS(L) (Algorithm 2), with the 2020 variants (Goldfarb et al. 2020).

The optimizer owns the state (:class:`KBFGSLayerState`, :class:`DenseLayerState`,
:class:`LimitedLayerState`) and the order of operations; each step of Algorithm 2's curvature
update is a small pure function below citing its line; the math comes from ``kbfgs.linalg``
(BFGS update, damping, compact L-BFGS, damped inverse) and ``kbfgs.layers`` (per-layer
vectors), the vectors from ``kbfgs.capture`` (hooks that exist only during a curvature pass).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import distributed, linalg
from ..capture import KroneckerLayer, LayerRecord, autocast_off, reduce_kbfgs_records
from ..layers import damping_split as _damping_split
from .base import (
    DEFAULT_MAX_FACTOR_DIM,
    KroneckerOptimizer,
    aligned_copy,
    layer_fields_from_dict,
    two_sided_product,
)
from .validation import check_choice, check_int, check_number

__all__ = [
    "DAMPING_RULES",
    "KBFGS",
    "DenseLayerState",
    "KBFGSLayerState",
    "LimitedLayerState",
    "average_pair",
    "lbfgs_push",
    "mask_pair",
    "rounding_level_pair",
    "y_A_minibatch",
    "y_A_moving_average",
]

_HESSIAN_ACTIONS = ("minibatch", "moving_average", "exact")
_SPLITS = ("spatial", "sqrt")


# ---------------------------------------------------------------------------------------------
# The steps of Algorithm 2's curvature update (pure functions)
# ---------------------------------------------------------------------------------------------


def y_A_minibatch(A_s: Tensor, s_A: Tensor, lam_A: float) -> Tensor:
    """Algorithm 2 line 16 (eq. 15): ``y_A = A s_A + lambda_A s_A``, ``A s_A`` from the hooks."""
    return A_s + lam_A * s_A


def y_A_moving_average(A_avg: Tensor, A_mb: Tensor, s_A: Tensor, lam_A: float,
                       beta: float) -> Tensor:
    """The 2020 variant of line 16: ``A = beta A + (1 - beta) A_minibatch`` (``A_avg`` updated
    in place), then ``y_A = A s_A + lambda_A s_A``."""
    A_avg.mul_(beta).add_(A_mb, alpha=1.0 - beta)
    return A_avg @ s_A + lam_A * s_A


def average_pair(s_G: Tensor, y_G: Tensor, h: Tensor, h_plus: Tensor, Dh: Tensor,
                 Dh_plus: Tensor, beta: float) -> tuple[Tensor, Tensor, Tensor]:
    """Algorithm 2 line 19: ``s_G = beta s_G + (1 - beta)(h_bar+ - h_bar)``,
    ``y_G = beta y_G + (1 - beta)(Dh_bar+ - Dh_bar)``.

    Returns ``(s_G, y_G, finite)``: when a new average is not finite (a diverging extra pass),
    both are kept unchanged and ``finite`` (0-dim bool) is false."""
    s_new = beta * s_G + (1.0 - beta) * (h_plus - h)
    y_new = beta * y_G + (1.0 - beta) * (Dh_plus - Dh)
    fin = torch.isfinite(s_new).all() & torch.isfinite(y_new).all()
    return torch.where(fin, s_new, s_G), torch.where(fin, y_new, y_G), fin


def _dpdlm(s: Tensor, y: Tensor, H: linalg.Operator, mu1: float, mu2: float
           ) -> tuple[Tensor, Tensor, Tensor]:
    return linalg.dpdlm(s, y, H, mu1, mu2)


def _double_damping(s: Tensor, y: Tensor, H: linalg.Operator, mu1: float, mu2: float
                    ) -> tuple[Tensor, Tensor, Tensor]:
    s_t, y_t, theta, _ = linalg.double_damping(s, y, H, mu1, mu2)
    return s_t, y_t, theta


def _dpidlm(s: Tensor, y: Tensor, H: linalg.Operator, mu1: float, mu2: float
            ) -> tuple[Tensor, Tensor, Tensor]:
    return linalg.dpidlm(s, y, mu1, mu2)


#: Algorithm 2 line 20: ``(s~_G, y~_G, theta1) = rule(s_G, y_G, H_G, mu1, mu2 = lambda_G)``.
#: ``"dpdlm"``: D_P D_LM (Algorithm 1); ``"dd"``: the double damping of Goldfarb et al. (2020);
#: ``"dpidlm"``: D_P(I) D_LM (Algorithm 4, ``H`` replaced by ``I / mu2``).
DAMPING_RULES: dict[str, Callable[..., tuple[Tensor, Tensor, Tensor]]] = {
    "dpdlm": _dpdlm,
    "dd": _double_damping,
    "dpidlm": _dpidlm,
}


#: ``y_G`` is at rounding level when ``||y_G||_1 <= ROUNDING_EPS * eps * scale`` (``eps`` of the
#: curvature dtype, ``scale`` the moving average of ``E_n[mean_t |Dh_t|]`` summed over outputs)
ROUNDING_EPS = 16.0


def rounding_level_pair(y_G: Tensor, Dh_scale: Tensor) -> Tensor:
    """Whether ``y_G`` is rounding noise (0-dim bool): ``||y_G||_1 <= 16 eps * Dh_scale``.

    A layer whose output feeds a BatchNorm (in training mode) has ``Dh_bar = 0`` in exact
    arithmetic (the normalisation removes every per-channel shift), so ``y_G = 0`` and, from
    ``H_G = I / lambda_G``, D_P D_LM forms the pair ``(s_G, lambda_G s_G)`` that leaves ``H_G``
    unchanged. In floating point ``Dh_bar`` is rounding noise of about ``eps`` times the sum of
    ``|Dh|`` (measured: 0.1 eps), which would move ``H_G`` by O(1) in random directions; such
    a pair is skipped (``stats()["layers"][name]["skipped_G_rounding"]``), as exact arithmetic
    does. Pairs of other layers are many orders of magnitude above this level."""
    eps = torch.finfo(y_G.dtype).eps
    return torch.linalg.vector_norm(y_G, 1) <= (ROUNDING_EPS * eps) * Dh_scale


def mask_pair(s: Tensor, y: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
    """The pair itself, or zeros when ``finite`` is false: a non-finite extra pass forms no
    pair (the zero pair is then rejected by the update and counted as skipped)."""
    return (torch.where(finite, s, torch.zeros_like(s)),
            torch.where(finite, y, torch.zeros_like(y)))


def lbfgs_push(S: Tensor, Y: Tensor, s: Tensor, y: Tensor, history: int) -> tuple[Tensor, Tensor]:
    """Algorithm 2 line 21 with L-BFGS: append the pair as the newest columns of ``S``, ``Y``
    and keep the last ``history``. BFGS is invariant under ``(s, y) -> (s, y) / ||s||``, so the
    stored ``s`` has unit norm."""
    c = 1.0 / torch.linalg.vector_norm(s)
    S = torch.cat([S, (c * s)[:, None]], dim=1)[:, -history:]
    Y = torch.cat([Y, (c * y)[:, None]], dim=1)[:, -history:]
    return S.contiguous(), Y.contiguous()


# ---------------------------------------------------------------------------------------------
# Per-layer state
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class KBFGSLayerState:
    """Per-layer state of K-BFGS (``(rows, cols)`` the layer's ``W`` shape)."""

    #: ``|T|``, the number of output locations (sets lambda_A, lambda_G)
    locations: int
    #: momentum of the gradient, ``(rows, cols)`` in the parameters' dtype
    buf: Tensor
    #: ``H_A``, ``(cols, cols)``
    H_A: Tensor
    #: moving averages ``s_G``, ``y_G`` (line 19), ``(rows,)``
    s_G: Tensor
    y_G: Tensor
    #: pairs rejected by the BFGS update of H_A / H_G (int64 counters)
    skipped_A: Tensor
    skipped_G: Tensor
    #: Powell's theta1 of the last damping
    theta: Tensor
    #: the moving average of A (``hessian_action="moving_average"`` only), ``(cols, cols)``
    A: Tensor | None = None
    #: pairs of H_G skipped because ``y_G`` was at rounding level (:func:`rounding_level_pair`)
    skipped_G_rounding: Tensor | None = None
    #: moving average (line 19's beta) of the scale of ``Dh`` (``E_n[mean_t |Dh_t|]`` summed
    #: over the outputs, both passes): what ``y_G`` is compared with
    Dh_scale: Tensor | None = None
    #: kbfgs-plus with ``fisher_G`` only: moving average (line 19's beta) of KFAC's
    #: ``Gamma = E[Dh Dh^T]`` over both passes of each H_G pair of a layer whose pairs are at
    #: rounding level, ``(rows, rows)``
    Gamma: Tensor | None = None
    #: the left factor that then replaces H_G, ``(I + Gamma / delta)^-1/2`` (not saved)
    H_G_fisher: Tensor | None = None

    #: fields not saved by :meth:`to_state_dict`
    _transient: ClassVar[tuple[str, ...]] = ("H_G_fisher",)

    def to_state_dict(self) -> dict[str, Any]:
        """The saved form: ``{field: value}`` without ``None`` and cached fields."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in self._transient and getattr(self, f.name) is not None}

    @classmethod
    def shapes(cls, rows: int, cols: int) -> dict[str, tuple[int | None, ...]]:
        """The shape of each tensor field for a layer whose ``W`` is ``rows x cols``."""
        return {"buf": (rows, cols), "H_A": (cols, cols), "s_G": (rows,), "y_G": (rows,),
                "skipped_A": (), "skipped_G": (), "theta": (), "A": (cols, cols),
                "skipped_G_rounding": (), "Dh_scale": (), "Gamma": (rows, rows)}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any], device: torch.device, *, layer: str = "?",
                        rows: int | None = None, cols: int | None = None,
                        dtype: torch.dtype | None = None,
                        param_dtype: torch.dtype | None = None) -> KBFGSLayerState:
        """The inverse of :meth:`to_state_dict`, validated: every key present, none unknown,
        and (given ``rows``, ``cols``) every shape; a mismatch is a ValueError naming ``layer``.
        Tensors are copied to ``device`` with aligned rows, floating ones cast to ``dtype``
        (the momentum ``buf`` to ``param_dtype``) when given."""
        shapes = {} if rows is None or cols is None else cls.shapes(rows, cols)
        return cls(**layer_fields_from_dict(cls, d, layer=layer, shapes=shapes, device=device,
                                            dtype=dtype, param_dtype=param_dtype,
                                            transient=cls._transient))


@dataclass(kw_only=True)
class DenseLayerState(KBFGSLayerState):
    """K-BFGS: ``H_G`` dense, ``(rows, rows)``."""

    H_G: Tensor

    @classmethod
    def shapes(cls, rows: int, cols: int) -> dict[str, tuple[int | None, ...]]:
        return {**super().shapes(rows, cols), "H_G": (rows, rows)}


@dataclass(kw_only=True)
class LimitedLayerState(KBFGSLayerState):
    """K-BFGS(L): the last pairs as columns of ``S``, ``Y`` (``(rows, k)``, oldest first) and
    the cached compact factors ``(U, M, gamma)`` of H_G (not saved)."""

    S: Tensor
    Y: Tensor
    lbfgs: tuple[Tensor, Tensor, float] | None = None

    _transient: ClassVar[tuple[str, ...]] = ("lbfgs", "H_G_fisher")

    @classmethod
    def shapes(cls, rows: int, cols: int) -> dict[str, tuple[int | None, ...]]:
        return {**super().shapes(rows, cols), "S": (rows, None), "Y": (rows, None)}


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
        skip_layers: module names (a name covers the modules below it) and/or module types
            whose Linear / Conv2d layers are not Kronecker layers but other parameters.
        max_factor_dim: size guard: a layer whose dense curvature factor would have more rows
            than this (H_A or H_G, K-BFGS(L): H_A only; KFAC: Omega or Gamma) is updated as
            other parameters, with a warning stating the memory it would need (default 8192;
            ``None``: no limit). ``memory_usage()`` gives the bytes of state by part.
    """

    _kind = "KBFGS"

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        momentum: float = 0.9,
        update_freq: int = 1,
        weight_decay: float = 0.0,
        history: int | None = None,
        *,
        loss_reduction: str = "mean",
        damping_rule: str = "dpdlm",
        hessian_action: str = "minibatch",
        damping_split: str = "spatial",
        mu1: float = 0.2,
        beta: float = 0.9,
        check_finite: bool = True,
        skip_layers: Iterable[str | type[nn.Module]] | None = None,
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
        grad_scaler: Any = None,
    ) -> None:
        check_int("history", history, 1, allow_none=True)
        check_choice("damping_rule", damping_rule, DAMPING_RULES)
        check_choice("hessian_action", hessian_action, _HESSIAN_ACTIONS)
        check_choice("damping_split", damping_split, _SPLITS)
        check_number("mu1", mu1, 0.0, strict=True, high=1.0)
        check_number("beta", beta, 0.0, high=1.0)
        self.history = None if history is None else int(history)
        self.damping_rule = damping_rule
        self.hessian_action = hessian_action
        self.damping_split = damping_split
        self.mu1 = float(mu1)
        self.beta = float(beta)
        super().__init__(
            model,
            {"lr": lr, "damping": damping, "momentum": momentum, "weight_decay": weight_decay},
            update_freq=update_freq,
            update_freq_name="update_freq",
            loss_reduction=loss_reduction,
            check_finite=check_finite,
            skip_layers=skip_layers,
            max_factor_dim=max_factor_dim,
            grad_scaler=grad_scaler,
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
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One iteration of Algorithm 2. ``closure`` zeroes the gradients, runs the forward pass,
        computes the batch-mean loss, calls ``backward`` and returns the loss. On curvature
        iterations (k % update_freq == 0) it is called a second time on the same minibatch
        after the parameter update (same random numbers, no parameter gradients, module buffers
        restored; ``in_extra_pass`` is True during that call). Returns the loss of the first
        call. A bad value in ``param_groups`` raises ValueError before anything changes."""
        closure = self._require_closure(closure)
        k = self.steps + 1
        first = any(layer.name not in self.layer_state for layer in self.layers)
        # a layer's first minibatch initialises its H_A (KBFGSPlus) instead of forming a pair
        minibatch_init = self._first_minibatch_due()
        curvature = k % self.update_freq == 0 and not minibatch_init
        known = set(self.layer_state)
        with self.phases("forward_backward"):
            group = distributed.process_group(self.model) if curvature else None
            ctx: contextlib.AbstractContextManager[dict[str, LayerRecord]]
            if curvature:
                self._save_rng()
                ctx = self.capture.kbfgs_pre(self._s_A, need_A=self._needs_explicit_A(),
                                             group=group)
            elif first:
                ctx = self.capture.probe(need_A=minibatch_init)
            else:
                ctx = contextlib.nullcontext({})
            with ctx as pre:
                loss = closure()
        if not self._accept(loss):  # grad_scaler: unscaled here
            for name in set(self.layer_state) - known:  # created lazily in this pass
                del self.layer_state[name]
            return self._skip_step(loss)
        self._take_step(pre, k)  # lines 7-11
        if curvature and self.layers:
            with self.phases("extra_pass"):  # line 13
                with self._extra_pass(runs_closure=True), self.capture.kbfgs_post() as post:
                    closure()
                self._check_records(post)
            with self.phases("curvature"), torch.no_grad(), autocast_off():  # lines 14-22
                self._unscale_records(pre, post)
                reduce_kbfgs_records(pre, post, group)
                self._curvature_update(pre, post)
            self.curvature_updates += 1
        self._scaler_update()
        return loss

    def _unscale_records(self, pre: dict[str, LayerRecord], post: dict[str, LayerRecord]
                         ) -> None:
        """With a ``grad_scaler``, both passes back-propagated the scaled loss: divide ``Dh_bar``
        (and its scale) by the loss scale of this step."""
        for recs in (pre, post):
            for r in recs.values():
                if r.Dh_bar is None:
                    continue
                inv = self._inv_scale(r.Dh_bar.dtype)
                if inv is None:
                    return
                r.Dh_bar = r.Dh_bar * inv
                if r.Dh_scale is not None:
                    r.Dh_scale = r.Dh_scale * inv

    # ------------------------------------------------------------------ layer state
    def _other_lr_scale(self, group: dict) -> float:
        return 1.0 / group["damping"]

    def _factor_dims(self, rows: int, cols: int) -> tuple[int, ...]:
        """H_A (and H_G when dense; K-BFGS(L) keeps ``2 * history`` vectors of ``rows``)."""
        return (cols,) if self.history is not None else (cols, rows)

    def _curvature_bytes(self, rows: int, cols: int, itemsize: int) -> int:
        n = cols * cols + (rows * rows if self.history is None else 2 * rows * self.history)
        if self.hessian_action == "moving_average":
            n += cols * cols  # the moving average of A
        return n * itemsize

    def _lambdas(self, layer: KroneckerLayer, locations: int) -> tuple[float, float]:
        """Algorithm 2 line 2: ``(lambda_A, lambda_G)`` of a layer."""
        return _damping_split(self.param_groups[0]["damping"], locations, layer.helper.is_conv,
                              self.damping_split)

    def _init_layer(self, layer: KroneckerLayer, locations: int,
                    A0: Tensor | None = None) -> KBFGSLayerState:
        """Algorithm 2 line 3 (``H_A = (A_0 + lambda_A I)^-1`` with a warm start ``A0``, else
        ``I / lambda_A``; ``H_G = I / lambda_G``; ``s_G = y_G = 0``). A layer that has state
        keeps it, only ``H_A`` (and A) are reset."""
        self._check_dd(layer, locations)
        rows, cols = layer.helper.dims()
        dtype, device = self._curvature_dtype(layer.module), layer.helper.weight.device
        lam_A, lam_G = self._lambdas(layer, locations)
        eye = torch.eye(cols, dtype=dtype, device=device)
        if A0 is None:
            H_A = aligned_copy(eye / lam_A)
        else:
            H_A = aligned_copy(linalg.damped_spd_inverse(A0, lam_A)[0])
        A = None
        if self.hessian_action == "moving_average":
            A = torch.zeros_like(eye) if A0 is None else A0.clone()
        st = self.layer_state.get(layer.name)
        if st is not None:
            st.locations, st.H_A, st.A = locations, H_A, A
            return st
        common: dict[str, Any] = {
            "locations": locations,
            "buf": aligned_copy(torch.zeros(rows, cols, dtype=layer.helper.weight.dtype,
                                            device=device)),
            "H_A": H_A,
            "s_G": torch.zeros(rows, dtype=dtype, device=device),
            "y_G": torch.zeros(rows, dtype=dtype, device=device),
            "skipped_A": torch.zeros((), dtype=torch.int64, device=device),
            "skipped_G": torch.zeros((), dtype=torch.int64, device=device),
            "skipped_G_rounding": torch.zeros((), dtype=torch.int64, device=device),
            "Dh_scale": torch.zeros((), dtype=dtype, device=device),
            "theta": torch.ones((), dtype=dtype, device=device),
            "A": A,
        }
        if self.history is None:
            st = DenseLayerState(
                H_G=aligned_copy(torch.eye(rows, dtype=dtype, device=device) / lam_G), **common)
        else:
            st = LimitedLayerState(S=torch.zeros(rows, 0, dtype=dtype, device=device),
                                   Y=torch.zeros(rows, 0, dtype=dtype, device=device), **common)
        self.layer_state[layer.name] = st
        return st

    def _layer_state_from_dict(self, d: dict[str, Any], layer: KroneckerLayer) -> KBFGSLayerState:
        cls = DenseLayerState if self.history is None else LimitedLayerState
        st = cls.from_state_dict(d, layer.helper.weight.device, **self._layer_load_args(layer))
        if self.hessian_action == "moving_average" and st.A is None:
            raise ValueError(f"the saved state of layer '{layer.name}' lacks the key 'A' (the "
                             "moving average of A): it was saved with another hessian_action "
                             "than 'moving_average'")
        if self.hessian_action != "moving_average":
            st.A = None
        k = self.history
        if isinstance(st, LimitedLayerState) and k is not None and st.S.shape[1] > k:
            st.S, st.Y = st.S[:, -k:].contiguous(), st.Y[:, -k:].contiguous()
        return st

    def _check_saved_kind(self, extra: dict[str, Any]) -> None:
        """K-BFGS state only, and dense (``history=None``) vs L-BFGS as this optimizer."""
        super()._check_saved_kind(extra)
        layers = extra["layers"] if isinstance(extra["layers"], dict) else {}
        saved_limited = None
        if "history" in extra:
            saved_limited = extra["history"] is not None
        else:
            for st in layers.values():
                if isinstance(st, dict) and ("S" in st or "H_G" in st):
                    saved_limited = "S" in st
                    break
        if saved_limited is None or saved_limited == (self.history is not None):
            return

        def name(limited: bool) -> str:
            return ("K-BFGS(L) (L-BFGS pairs for H_G, history set)" if limited else
                    "K-BFGS (dense H_G, history=None)")
        raise ValueError(f"state_dict was saved by {name(saved_limited)}, but this optimizer is "
                         f"{name(self.history is not None)}: build it with the same history")

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["kronecker"]["history"] = self.history
        return sd

    # ------------------------------------------------------------------ the step
    def _precondition(self, layer: KroneckerLayer, st: KBFGSLayerState) -> Tensor:
        """Algorithm 2 line 9: ``p = H_G BUF H_A``."""
        return two_sided_product(self._H_G_operator(layer, st), st.buf, st.H_A, self._scratch)

    def _lbfgs_factors(self, layer: KroneckerLayer, st: LimitedLayerState
                       ) -> tuple[Tensor, Tensor, float]:
        gamma = 1.0 / self._lambdas(layer, st.locations)[1]
        cache = st.lbfgs
        if cache is None or cache[2] != gamma:
            U, M = linalg.lbfgs_compact_factors(st.S, st.Y, gamma)
            cache = st.lbfgs = (U, M, gamma)
        return cache

    def _H_G_operator(self, layer: KroneckerLayer, st: KBFGSLayerState) -> linalg.Operator:
        if isinstance(st, DenseLayerState):
            return st.H_G
        assert isinstance(st, LimitedLayerState)
        U, M, gamma = self._lbfgs_factors(layer, st)
        return lambda x: linalg.lbfgs_apply(U, M, gamma, x)

    def _init_from_minibatch(self) -> bool:
        """Whether a layer seen for the first time takes ``H_A = (A + lambda_A I)^-1`` from
        that minibatch's ``A`` (K-BFGS: no, ``I / lambda_A`` unless warm-started)."""
        return False

    def _first_minibatch_due(self) -> bool:
        """Whether the next pass sets the H_A of layers without state from its minibatch (and
        forms no curvature pair)."""
        return self._init_from_minibatch() and any(
            layer.name not in self.layer_state for layer in self.layers)

    def _needs_explicit_A(self) -> bool:
        return self.hessian_action in ("moving_average", "exact")

    def _s_A(self, layer: KroneckerLayer, rec: LayerRecord) -> Tensor | None:
        """Algorithm 2 line 16: ``s_A = H_A a_bar`` (called by the hooks; ``None`` for the
        ``"exact"`` variant, which forms no pair for H_A). Initialises a new layer's state."""
        st = self.layer_state.get(layer.name)
        if st is None:
            st = self._init_layer(layer, rec.locations)
        if self.hessian_action == "exact":
            return None
        assert rec.a_bar is not None  # recorded by the hook before it asks for s_A
        return st.H_A @ rec.a_bar

    def _update_H_A(self, st: KBFGSLayerState, r0: LayerRecord, lam_A: float) -> None:
        """Lines 16-17: the pair ``(s_A, y_A)`` and the BFGS update (11) of H_A; Algorithm 3's
        ``H_A = (A + lambda_A I)^-1`` for ``hessian_action="exact"``."""
        if self.hessian_action == "exact":
            assert r0.A is not None  # kbfgs_pre(need_A=True)
            st.H_A.copy_(linalg.damped_spd_inverse(r0.A, lam_A)[0])
            return
        assert r0.s_A is not None  # every hessian_action but "exact" forms s_A
        if self.hessian_action == "moving_average":
            assert st.A is not None and r0.A is not None  # kbfgs_pre(need_A=True)
            y_A = y_A_moving_average(st.A, r0.A, r0.s_A, lam_A, self.beta)
        else:
            assert r0.A_s is not None
            y_A = y_A_minibatch(r0.A_s, r0.s_A, lam_A)
        _, ok = linalg.bfgs_update(st.H_A, r0.s_A, y_A, inplace=True)
        st.skipped_A += (~ok).long()

    def _rounding_level(self, name: str, st: KBFGSLayerState, r0: LayerRecord, r1: LayerRecord,
                        finite: Tensor) -> Tensor:
        """Updates the moving average ``st.Dh_scale`` (kept when the pair is not finite) and
        returns whether ``y_G`` is at rounding level against it (0-dim bool, no host sync), or
        true for a layer that feeds a BatchNorm normalising with batch statistics
        (:meth:`Capture.uses_batch_statistics`): there ``y_G`` is 0 in exact arithmetic,
        which the numerical test cannot see under bfloat16 or float16 autocast."""
        if st.Dh_scale is None:  # a state saved before the counter existed
            st.Dh_scale = torch.zeros_like(st.theta)
            st.skipped_G_rounding = torch.zeros_like(st.skipped_G)
        if r0.Dh_scale is None or r1.Dh_scale is None:
            return torch.zeros((), dtype=torch.bool, device=st.y_G.device)
        new = self.beta * st.Dh_scale + (1.0 - self.beta) * (r0.Dh_scale + r1.Dh_scale)
        st.Dh_scale = torch.where(finite, new.to(st.Dh_scale.dtype), st.Dh_scale)
        if self.capture.uses_batch_statistics(name):
            return torch.ones((), dtype=torch.bool, device=st.y_G.device)
        return rounding_level_pair(st.y_G, st.Dh_scale)

    def _curvature_update(self, pre: dict[str, LayerRecord], post: dict[str, LayerRecord], *,
                          H_A: bool = True, H_G: bool = True) -> None:
        """Lines 14-22 for every layer recorded in both passes (``H_A=False``: lines 19-22
        only; ``H_G=False``: lines 16-17 only, ``post`` unused)."""
        pending: list[tuple[LimitedLayerState, Tensor, Tensor, Tensor]] = []
        for layer in self.layers:
            r0, r1 = pre.get(layer.name), post.get(layer.name)
            st = self.layer_state.get(layer.name)
            if st is None or r0 is None or r0.h_bar is None or r0.Dh_bar is None:
                continue
            if H_G and (r1 is None or r1.h_bar is None or r1.Dh_bar is None):
                continue
            lam_A, lam_G = self._lambdas(layer, st.locations)
            if H_A:
                self._update_H_A(st, r0, lam_A)  # lines 16-17
            if not H_G:
                continue
            assert r1 is not None and r1.h_bar is not None and r1.Dh_bar is not None
            st.s_G, st.y_G, fin = average_pair(st.s_G, st.y_G, r0.h_bar, r1.h_bar,  # line 19
                                               r0.Dh_bar, r1.Dh_bar, self.beta)
            s_t, y_t, st.theta = DAMPING_RULES[self.damping_rule](  # line 20
                st.s_G, st.y_G, self._H_G_operator(layer, st), self.mu1, lam_G)
            rounding = self._rounding_level(layer.name, st, r0, r1, fin)
            s_t, y_t = mask_pair(s_t, y_t, fin & ~rounding)
            if isinstance(st, DenseLayerState):  # line 21, BFGS
                _, ok = linalg.bfgs_update(st.H_G, s_t, y_t, inplace=True)
                st.skipped_G += (~ok & ~rounding).long()
                assert st.skipped_G_rounding is not None  # set by _rounding_level
                st.skipped_G_rounding += rounding.long()
            else:
                assert isinstance(st, LimitedLayerState)
                pending.append((st, s_t, y_t,
                                torch.stack([linalg.pair_is_valid(s_t, y_t), rounding])))
        if pending:  # line 21, L-BFGS: the pair list changes shape, one host sync for all layers
            assert self.history is not None  # L-BFGS layer states exist with a history only
            flags = torch.stack([p[3] for p in pending]).tolist()
            for (st, s_t, y_t, _), (ok, rounding) in zip(pending, flags):
                if rounding:
                    assert st.skipped_G_rounding is not None  # set by _rounding_level
                    st.skipped_G_rounding += 1
                    continue
                if not ok:
                    st.skipped_G += 1
                    continue
                st.S, st.Y = lbfgs_push(st.S, st.Y, s_t, y_t, self.history)
                st.lbfgs = None

    # ------------------------------------------------------------------ diagnostics
    def _layer_stats(self, layer: KroneckerLayer, st: KBFGSLayerState,
                     condition: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "skipped_A": int(st.skipped_A),
            "skipped_G": int(st.skipped_G),
            "skipped_G_rounding": (0 if st.skipped_G_rounding is None
                                   else int(st.skipped_G_rounding)),
            "theta": float(st.theta),
        }
        if isinstance(st, LimitedLayerState):
            out["pairs"] = int(st.S.shape[1])
        if condition:
            out["cond_H_A"] = linalg.condition_number(st.H_A)
            if isinstance(st, DenseLayerState):
                out["cond_H_G"] = linalg.condition_number(st.H_G)
            else:
                assert isinstance(st, LimitedLayerState)
                U, M, gamma = self._lbfgs_factors(layer, st)
                out["cond_H_G"] = linalg.condition_number(
                    linalg.lbfgs_dense(U, M, gamma, st.S.shape[0]))
        return out
