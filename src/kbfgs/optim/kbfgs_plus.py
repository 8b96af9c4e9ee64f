"""``kbfgs-plus``: K-BFGS's curvature with the step size of Adam (layer-wise norm grafting).

Not in the paper. The direction of every Kronecker layer is K-BFGS's ``P = H_G BUF_W H_A``
(Algorithm 2, unchanged: the same H_A, H_G, damping and curvature pairs); only its length is
replaced, layer by layer, by the length of the step Adam would take on that layer:

    D = m_hat / (sqrt(v_hat) + eps),   P <- P * ||D||_F / ||P||_F,

with ``m_hat`` the bias-corrected average of the gradients (read from K-BFGS's own momentum
buffer, ``m = (1 - beta1) buf``, ``beta1 = momentum``) and ``v_hat`` Adam's bias-corrected
second moment (``beta2``). This is the grafting of Shampoo (Agarwal et al. 2020; Gupta et al.
2018): the preconditioner chooses the direction, a diagonal method the step size. By default
the momentum is Nesterov's (``P = H_G (G + beta1 BUF) H_A``, and the same in ``m``), and
``graft="row"`` grafts each output row (unit, conv filter) instead of the whole layer.
``lr`` is therefore in Adam's units (about 1e-3 to 1e-2), and the step no longer depends on the
scale of H_A and H_G, so one setting trains every problem here (docs/results.md, "kbfgs-plus").
Every other parameter (biases of non-Kronecker modules, BatchNorm, embeddings...) gets Adam
with the same ``lr``. The decay is decoupled as in K-BFGS: ``W <- (1 - lr wd) W``.

Cost over K-BFGS: one extra ``p``-sized buffer (``exp_avg_sq``) per parameter and a few
element-wise operations per step; no host synchronisation.

**Without a closure** (``closure_free=True``): ``step()`` is called after the training loop's
own ``loss.backward()``, as for ``torch.optim.Adam``, and the optimizer runs no pass of its
own. The "+" measurement of Algorithm 2 (line 12: ``h_bar+``, ``Dh_bar+`` at the new
parameters) is then taken from the *next* iteration's forward-backward, on the next minibatch:
the pair of H_G becomes

    s_G = h_bar(W_{k+1}; batch k+1) - h_bar(W_k; batch k),
    y_G = Dh_bar(W_{k+1}; batch k+1) - Dh_bar(W_k; batch k),

which mixes two minibatches (the moving average of line 19 and the damping of line 20 then
smooth a noisier pair); H_A's pair needs only the curvature step's own minibatch and is
unchanged. To see the training loop's passes, the optimizer keeps hooks on the Kronecker layers
between ``step()`` calls for the iterations it measures (the curvature step and the one after
it); they record only calls made with gradients enabled, so evaluation under
``torch.no_grad()`` in between is ignored. A recorded forward pass whose backward did not run
before ``step()`` (a forward with gradients enabled whose loss was never back-propagated) gives
no pair for that step (warned once).

**H_A from the first minibatch** (``init_H_A="minibatch"``): Algorithm 2 line 3 sets
``H_A = (A + lambda_A I)^-1`` with ``A`` from data; here ``A`` is the first minibatch's, formed
once per layer on the first step the layer takes part in (no pair is formed on that step), so
no warm-start pass over the training set is needed (docs/api.md, "kbfgs-plus").
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..capture import KroneckerLayer, LayerRecord, autocast_off, reduce_kbfgs_records
from .base import momentum_buffers, reduce_warm_start, two_sided_product
from .kbfgs import KBFGS, KBFGSLayerState
from .validation import check_number, check_param_groups

__all__ = ["GRAFTS", "INITS_H_A", "KBFGSPlus", "adam_direction", "average_Gamma",
           "fisher_left_factor", "graft", "graft_rows"]

#: ``delta`` of :func:`fisher_left_factor`, relative to the mean eigenvalue of Gamma
FISHER_G_DAMPING = 1e-2

#: the values of ``KBFGSPlus(graft=...)``: Adam's length per layer or per output row
GRAFTS = ("layer", "row")
#: the values of ``KBFGSPlus(init_H_A=...)``: a new layer's H_A from its first minibatch's A,
#: or ``I / lambda_A``
INITS_H_A = ("minibatch", "identity")


def adam_direction(buf: Tensor, exp_avg_sq: Tensor, beta1: float, beta2: float, step: int,
                   eps: float, nesterov: bool = False) -> Tensor:
    """Adam's step direction ``m_hat / (sqrt(v_hat) + eps)`` from a heavy-ball momentum buffer
    ``buf = beta1 buf + g`` (so ``m = (1 - beta1) buf`` is Adam's first moment) and Adam's
    second moment ``exp_avg_sq``, both after ``step`` updates (bias-corrected).
    ``nesterov``: ``buf`` is the Nesterov momentum ``g + beta1 buf``, a sum of ``step + 1``
    decaying terms, and is bias-corrected as such (at step 1 it is ``g``'s Adam direction)."""
    n = step + 1 if nesterov else step
    m_hat = buf * ((1.0 - beta1) / (1.0 - beta1 ** n)) if beta1 > 0 else buf
    denom = (exp_avg_sq / (1.0 - beta2 ** step)).sqrt_().add_(eps)
    return m_hat / denom


def graft(P: Tensor, norm: Tensor) -> Tensor:
    """``P`` rescaled in place to the Frobenius norm ``norm`` (a 0-dim tensor; no host sync).
    A zero ``P`` stays zero."""
    return P.mul_(_ratio(norm.to(P.dtype), torch.linalg.vector_norm(P)))


def graft_rows(P: Tensor, row_norms: Tensor) -> Tensor:
    """Every row ``i`` of the matrix ``P`` rescaled in place to the norm ``row_norms[i]`` (no
    host sync). A zero row stays zero."""
    have = torch.linalg.vector_norm(P, dim=1)
    return P.mul_(_ratio(row_norms.to(P.dtype), have).unsqueeze(1))


def average_Gamma(Gamma: Tensor | None, G: Tensor, beta: float) -> Tensor:
    """``beta Gamma + (1 - beta) G`` (``Gamma = None``: from zero); ``Gamma`` kept when ``G``
    is not finite (no host sync)."""
    if Gamma is None:
        Gamma = torch.zeros_like(G)
    new = Gamma * beta + G * (1.0 - beta)
    return torch.where(torch.isfinite(G).all(), new, Gamma)


def fisher_left_factor(Gamma: Tensor, rel_damping: float = FISHER_G_DAMPING) -> Tensor:
    """``(I + Gamma / delta)^-1/2`` with ``delta = rel_damping * mean eigenvalue of Gamma``:
    ``(Gamma + delta I)^-1/2`` scaled to the largest eigenvalue 1 (the scale does not matter
    to a grafted step). Formed from an eigendecomposition in float64 (negative rounding
    eigenvalues taken as 0); a zero ``Gamma`` gives ``I``."""
    lam, Q = torch.linalg.eigh(Gamma.double())
    lam = lam.clamp_min(0.0)
    delta = rel_damping * lam.mean()
    total = lam + delta
    d = torch.where(total > 0, delta / total.clamp_min(torch.finfo(total.dtype).tiny),
                    torch.ones_like(total)).sqrt()
    return ((Q * d) @ Q.T).to(Gamma.dtype)


def _ratio(want: Tensor, have: Tensor) -> Tensor:
    """``want / have``, and 0 where ``have`` is 0 (a zero stays zero: no inf, no NaN)."""
    return torch.where(have > 0, want / have.clamp_min(torch.finfo(have.dtype).tiny),
                       torch.zeros_like(want))


class KBFGSPlus(KBFGS):
    """K-BFGS (or K-BFGS(L) with ``history``) whose per-layer step length is Adam's.

    Args: as :class:`kbfgs.KBFGS`, with ``lr`` in Adam's units (default 5e-3), curvature
    every ``update_freq = 3`` steps (the grafted step does not need it more often:
    docs/results.md, "kbfgs-plus"), and
        beta2: decay of Adam's second moment (0.95, not Adam's 0.999: the second moment must
            follow a burst of large gradients within a few dozen steps, or the grafted step
            grows with it; docs/api.md, "kbfgs-plus").
        eps: Adam's epsilon (1e-8).
        closure_free: ``step()`` without a closure, after the loop's own backward; the "+"
            measurement comes from the next iteration's pass (module docstring). ``False``:
            ``step(closure)`` as K-BFGS, with the extra pass on the same minibatch.
        graft: ``"layer"`` (default): the layer's step takes the Frobenius norm of Adam's step
            on the layer; ``"row"``: each output row (a Linear unit, a conv filter with its
            bias) takes the norm of Adam's step on that row, which also scales the output
            channels against each other (an option for convs feeding BatchNorm, whose H_G has
            no curvature: docs/api.md, "kbfgs-plus").
        nesterov: Nesterov momentum (default ``True``): the direction is
            ``H_G (G + momentum BUF) H_A`` and Adam's first moment is the Nesterov one
            (bias-corrected over its ``k + 1`` terms, so step 1 is unchanged).
        init_H_A: ``"minibatch"`` (default): a layer's H_A starts as ``(A + lambda_A I)^-1``
            with ``A`` from the first minibatch the layer sees (Algorithm 2 line 3 on that
            minibatch; one explicit ``A`` per layer, once), so no :meth:`warm_start` pass over
            the data is needed; ``"identity"``: ``I / lambda_A`` (as K-BFGS without a warm
            start). A :meth:`warm_start` before the first step replaces either.
        fisher_G: a layer whose H_G pairs are at rounding level (a conv feeding BatchNorm,
            whose ``Dh_bar`` is 0 in exact arithmetic: H_G learns nothing) takes the left
            factor ``(Gamma + delta I)^-1/2`` instead of H_G, with ``Gamma`` KFAC's
            ``E[Dh Dh^T]`` averaged over the passes K-BFGS records anyway and ``delta`` 1% of
            its mean eigenvalue (default ``False``; docs/api.md, "kbfgs-plus").
    ``momentum`` is Adam's beta1 as well as K-BFGS's momentum. See the module docstring and
    docs/api.md ("kbfgs-plus").
    """

    def __init__(self, model: nn.Module, lr: float = 5e-3, damping: float = 1.0,
                 momentum: float = 0.9, update_freq: int = 3, weight_decay: float = 0.0,
                 history: int | None = None, *, beta2: float = 0.95, eps: float = 1e-8,
                 closure_free: bool = True, graft: str = "layer", nesterov: bool = True,
                 init_H_A: str = "minibatch", fisher_G: bool = False, **kwargs: Any) -> None:
        check_number("beta2", beta2, 0.0, high=1.0)
        if not beta2 < 1.0:
            raise ValueError(f"beta2 must be in [0, 1), got {beta2!r}")
        check_number("eps", eps, 0.0, strict=True)
        if not isinstance(closure_free, bool):
            raise TypeError(f"closure_free must be True or False, got {closure_free!r}")
        if graft not in GRAFTS:
            raise ValueError(f"graft must be one of {', '.join(GRAFTS)}, got {graft!r}")
        if not isinstance(nesterov, bool):
            raise TypeError(f"nesterov must be True or False, got {nesterov!r}")
        if init_H_A not in INITS_H_A:
            raise ValueError(f"init_H_A must be one of {', '.join(INITS_H_A)}, got {init_H_A!r}")
        if not isinstance(fisher_G, bool):
            raise TypeError(f"fisher_G must be True or False, got {fisher_G!r}")
        self.init_H_A = init_H_A
        self.fisher_G = fisher_G
        #: the minibatch A of new layers (the first-minibatch H_A), while a step initialises them
        self._first_A: dict[str, Tensor] | None = None
        self.graft = graft
        self.nesterov = nesterov
        self.beta2 = float(beta2)
        self.eps = float(eps)
        self.closure_free = closure_free
        #: the recording open between steps (closure_free) and what it records
        self._armed: contextlib.ExitStack | None = None
        self._armed_recs: dict[str, LayerRecord] = {}
        #: the first half of an H_G pair (the records of the last curvature step)
        self._pending: dict[str, LayerRecord] | None = None
        super().__init__(model, lr, damping, momentum, update_freq, weight_decay, history,
                         **kwargs)
        if closure_free:
            self._arm()

    # ------------------------------------------------------------------ closure-free step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One iteration. ``closure_free=False``: as :meth:`kbfgs.KBFGS.step` (closure
        required). ``closure_free=True``: the gradients of the minibatch are already in
        ``.grad`` (or ``closure``, when given, computes them once, as for ``torch.optim.Adam``);
        returns the closure's loss or ``None``."""
        if not self.closure_free:
            return super().step(closure)
        check_param_groups(self.param_groups)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        k = self.steps + 1
        first = self._first_minibatch_due()  # the open recording is that probe (_arm)
        recs = self._disarm()
        if not self._accept(loss):
            self._pending = None
            self._arm()
            return self._skip_step(loss)
        complete = self._complete(recs)
        curvature = k % self.update_freq == 0 and not first
        with self.phases("curvature"), torch.no_grad(), autocast_off():
            self._unscale_records(complete, {})
            reduce_kbfgs_records(complete, {}, distributed.process_group(self.model))
            if self._pending is not None and not first:  # lines 19-22, this pass the "+" one
                self._curvature_update(self._pending, complete, H_A=False)
                self.curvature_updates += 1
            self._pending = None
        self._take_step(recs, k)  # lines 7-11 (records of layers first seen initialise them)
        if curvature and self.layers:
            with self.phases("curvature"), torch.no_grad(), autocast_off():
                self._curvature_update(complete, {}, H_G=False)  # lines 16-17
            self._pending = complete
        self._scaler_update()
        self._arm()
        return loss

    def _complete(self, recs: dict[str, LayerRecord]) -> dict[str, LayerRecord]:
        """The records whose backward ran for every recorded sample (others give no pair)."""
        measured = {n: r for n, r in recs.items() if r.h_bar is not None}  # not a probe
        out = {n: r for n, r in measured.items()
               if r.grad_batch == r.batch and r.Dh_bar is not None}
        if len(out) < len(measured):
            self._warn_once("no_backward", f"{type(self).__name__}: a forward pass with "
                            "gradients enabled was not back-propagated before step(); layers "
                            "without a gradient of their output form no curvature pair this step")
        return out

    def _arm(self) -> None:
        """Open the recording that the next iteration's forward-backward needs: the curvature
        step's (``a_bar``, ``A s_A``, ``h_bar``, ``Dh_bar``), the "+" pass after it (``h_bar``,
        ``Dh_bar``), a probe while a layer has no state yet, or none."""
        self._disarm()
        k = self.steps + 1
        new = any(layer.name not in self.layer_state for layer in self.layers)
        if self._first_minibatch_due():
            # a new layer's first minibatch: its A (for H_A), no pair this step
            ctx: contextlib.AbstractContextManager[dict[str, LayerRecord]] = \
                self.capture.probe(grad_only=True, need_A=True)
        elif k % self.update_freq == 0:
            # the open recording holds s_A_fn: a weak reference, so that an optimizer dropped
            # by the user is freed at once and its hooks with it
            s_A = weakref.WeakMethod(self._s_A)

            def s_A_fn(layer: KroneckerLayer, rec: LayerRecord) -> Tensor | None:
                fn = s_A()
                return None if fn is None else fn(layer, rec)

            ctx = self.capture.kbfgs_pre(s_A_fn, need_A=self._needs_explicit_A(),
                                         group=distributed.process_group(self.model),
                                         grad_only=True)
        elif self._pending is not None:
            ctx = self.capture.kbfgs_post(grad_only=True)
        elif new:
            ctx = self.capture.probe(grad_only=True)
        else:
            return
        stack = contextlib.ExitStack()
        self._armed_recs = stack.enter_context(ctx)
        self._armed = stack

    def _disarm(self) -> dict[str, LayerRecord]:
        """Close the open recording (``A s_A`` is formed then) and return its records."""
        stack, recs = self._armed, self._armed_recs
        self._armed, self._armed_recs = None, {}
        if stack is None:
            return {}
        stack.close()
        return recs

    # ------------------------------------------------------------------ first-minibatch H_A
    def warm_start(self, inputs: Any) -> None:
        super().warm_start(inputs)
        if self.closure_free:
            self._arm()  # the layers have state now: the recording of their next pass changes

    def _init_from_minibatch(self) -> bool:
        return self.init_H_A == "minibatch"

    def _take_step(self, pre: dict[str, LayerRecord], k: int) -> None:
        """As K-BFGS; a layer seen for the first time (``init_H_A="minibatch"``) takes
        ``H_A = (A + lambda_A I)^-1`` from this minibatch's ``A``, averaged over the process
        group of a distributed model as the warm start's sums are."""
        new = [ly for ly in self.layers if ly.name not in self.layer_state]
        if not (new and self._init_from_minibatch()):
            return super()._take_step(pre, k)
        sums: dict[str, Tensor] = {}
        count: dict[str, int] = {}
        locations: dict[str, int] = {}
        for layer in new:
            rec = pre.get(layer.name)
            if rec is not None and rec.calls == 1 and rec.A is not None and rec.batch:
                sums[layer.name] = rec.A * rec.batch
                count[layer.name] = rec.batch
                locations[layer.name] = rec.locations
        with torch.no_grad():
            reduce_warm_start(self.layers, sums, count, locations, self._curvature_dtype,
                              distributed.process_group(self.model))
        self._first_A = {n: A / count[n] for n, A in sums.items()}
        try:
            super()._take_step(pre, k)
        finally:
            self._first_A = None

    def _init_layer(self, layer: KroneckerLayer, locations: int,
                    A0: Tensor | None = None) -> KBFGSLayerState:
        if A0 is None and self._first_A is not None:
            A0 = self._first_A.get(layer.name)
        return super()._init_layer(layer, locations, A0)

    # ------------------------------------------------------------------ fisher_G
    def _curvature_update(self, pre: dict[str, LayerRecord], post: dict[str, LayerRecord], *,
                          H_A: bool = True, H_G: bool = True) -> None:
        """As K-BFGS; with ``fisher_G`` the H_G part also averages Gamma of the layers whose
        pairs are at rounding level (both passes), forms their left factor, and adds the
        layers whose pair was at rounding level now to those (one host sync)."""
        super()._curvature_update(pre, post, H_A=H_A, H_G=H_G)
        if not (H_G and self.fisher_G):
            return
        for name in self.capture.gram:
            st, r0, r1 = self.layer_state.get(name), pre.get(name), post.get(name)
            if st is None or r0 is None or r1 is None or r0.G is None or r1.G is None:
                continue
            st.Gamma = average_Gamma(st.Gamma, (r0.G + r1.G) * 0.5, self.beta)
            st.H_G_fisher = fisher_left_factor(st.Gamma)
        self._find_flat_G()

    def _find_flat_G(self) -> None:
        """``capture.gram``: the layers with a pair of H_G at rounding level (``fisher_G``; a
        layer stays once added). Derived from the layer states (one host sync)."""
        if not self.fisher_G:
            self.capture.gram = set()
            return
        todo = [(n, st.skipped_G_rounding) for n, st in self.layer_state.items()
                if n not in self.capture.gram and st.skipped_G_rounding is not None]
        if todo:
            flat = torch.stack([c for _, c in todo]).gt(0).tolist()
            self.capture.gram |= {n for (n, _), f in zip(todo, flat) if f}

    def _uses_fisher_G(self, layer: KroneckerLayer, st: KBFGSLayerState) -> bool:
        """Whether the layer's left factor is the Fisher one (``fisher_G``, pairs at rounding
        level, Gamma averaged at least once)."""
        return self.fisher_G and st.Gamma is not None and layer.name in self.capture.gram

    def _left_factor(self, layer: KroneckerLayer, st: KBFGSLayerState) -> Any:
        """H_G, or (:meth:`_uses_fisher_G`) the Fisher factor."""
        if self._uses_fisher_G(layer, st):
            if st.H_G_fisher is None:  # loaded from a state_dict
                assert st.Gamma is not None  # _uses_fisher_G
                st.H_G_fisher = fisher_left_factor(st.Gamma)
            return st.H_G_fisher
        return self._H_G_operator(layer, st)

    def _layer_stats(self, layer: KroneckerLayer, st: KBFGSLayerState,
                     condition: bool) -> dict[str, Any]:
        out = super()._layer_stats(layer, st, condition)
        out["fisher_G"] = self._uses_fisher_G(layer, st)
        return out

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        if self._pending is not None:
            sd["kronecker"]["pending_pair"] = {
                n: {k: v for k, v in (("h_bar", r.h_bar), ("Dh_bar", r.Dh_bar),
                                      ("Dh_scale", r.Dh_scale), ("G", r.G)) if v is not None}
                for n, r in self._pending.items()}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As :meth:`kbfgs.KBFGS.load_state_dict`, plus the pending first half of an H_G pair
        of ``closure_free`` (validated before anything changes)."""
        extra = state_dict.get("kronecker") if isinstance(state_dict, dict) else None
        saved = extra.get("pending_pair") if isinstance(extra, dict) else None
        pending = self._pending_from_dict(saved) if saved is not None else None
        super().load_state_dict(state_dict)
        self._pending = pending if self.closure_free else None
        self.capture.gram = set()
        self._find_flat_G()
        if self.closure_free:
            self._arm()

    def _pending_from_dict(self, saved: Any) -> dict[str, LayerRecord]:
        """``state_dict()["kronecker"]["pending_pair"]`` as records; a ValueError names a layer
        this model lacks or a vector of the wrong shape."""
        layers = {ly.name: ly for ly in self.layers}
        if not isinstance(saved, dict):
            raise ValueError("state_dict['kronecker']['pending_pair'] must be a dict")
        out: dict[str, LayerRecord] = {}
        for name, d in saved.items():
            layer = layers.get(name)
            if layer is None:
                raise ValueError(f"state_dict['kronecker']['pending_pair'] has layer '{name}', "
                                 f"which is not a Kronecker layer of this model")
            rows = layer.helper.dims()[0]
            vec: dict[str, Tensor | None] = {}
            for key, shape in (("h_bar", (rows,)), ("Dh_bar", (rows,)), ("Dh_scale", ()),
                               ("G", (rows, rows))):
                v = d.get(key) if isinstance(d, dict) else None
                if key in ("h_bar", "Dh_bar") or v is not None:
                    if not isinstance(v, Tensor) or tuple(v.shape) != shape:
                        raise ValueError(f"state_dict['kronecker']['pending_pair']['{name}']"
                                         f"['{key}'] must be a tensor of shape {shape}")
                    v = v.to(device=layer.helper.weight.device,
                              dtype=self._curvature_dtype(layer.module))
                vec[key] = v
            out[name] = LayerRecord(h_bar=vec["h_bar"], Dh_bar=vec["Dh_bar"],
                                    Dh_scale=vec["Dh_scale"], G=vec["G"])
        return out

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
        """``P = H_G M H_A`` (``M`` the momentum ``BUF``, or with ``nesterov`` ``G + beta1 BUF``)
        grafted to the norm of Adam's direction on the layer (``graft="row"``: row by row)."""
        beta1 = self.param_groups[0]["momentum"]
        rows = st.buf.shape[0]
        params = layer.helper.params()
        grads = [p.grad for p in params]
        # a layer with a frozen weight or bias keeps the heavy-ball BUF (no G for that part)
        nesterov = self.nesterov and all(g is not None for g in grads)
        M = self._nesterov_matrix(layer, st.buf, grads, beta1) if nesterov else st.buf
        P = two_sided_product(self._left_factor(layer, st), M, st.H_A, self._scratch)
        by_row = self.graft == "row"
        sq = torch.zeros(rows if by_row else (), dtype=torch.float32, device=P.device)
        for view, p in zip(layer.helper.split_matrix(M), params):
            if p.grad is None:
                continue
            v, k = self._second_moment(p)
            d = adam_direction(view.reshape(p.shape), v, beta1, self.beta2, k, self.eps,
                               nesterov).float()
            sq = sq + (d.reshape(rows, -1).pow(2).sum(1) if by_row else d.pow(2).sum())
        return graft_rows(P, sq.sqrt()) if by_row else graft(P, sq.sqrt())

    def _nesterov_matrix(self, layer: KroneckerLayer, buf: Tensor, grads: list[Tensor | None],
                         beta1: float) -> Tensor:
        """``G + beta1 BUF`` in a scratch matrix shared by all layers (valid until the next
        layer's), without temporaries."""
        flat = self._scratch.get("nesterov")
        if (flat is None or flat.numel() < buf.numel() or flat.dtype != buf.dtype
                or flat.device != buf.device):
            flat = self._scratch["nesterov"] = torch.empty(buf.numel(), dtype=buf.dtype,
                                                           device=buf.device)
        M = torch.mul(buf, beta1, out=flat[: buf.numel()].view(buf.shape))
        for view, g in zip(layer.helper.split_matrix(M), grads):
            assert g is not None
            view.add_(g.to(view.dtype))
        return M

    def _update_others(self, others: list[Tensor], group: dict[str, Any]) -> None:
        """Adam (decoupled decay) on every parameter that is not preconditioned, with the
        momentum buffer as Adam's first moment."""
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        for p, buf in zip(others, momentum_buffers(self.state, others)):
            assert p.grad is not None  # others hold only parameters with a gradient
            buf.mul_(mom).add_(p.grad)
            v, k = self._second_moment(p)
            m = buf * mom + p.grad if self.nesterov else buf
            d = adam_direction(m, v, mom, self.beta2, k, self.eps, self.nesterov)
            if wd != 0:
                p.mul_(1.0 - lr * wd)
            p.add_(d.to(p.dtype), alpha=-lr)
