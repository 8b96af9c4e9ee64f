"""KFAC, the paper's second-order baseline (Algorithm 5, Appendix D.1; docs/api.md).

Per Kronecker layer (the same Linear / Conv2d rules, fallbacks and ``W`` layout as K-BFGS):

* ``Omega = E_n[sum_t a_t a_t^T]``  (the ``A`` of K-BFGS, ``kbfgs.layers``),
* ``Gamma = E_n[mean_t Dh_t Dh_t^T]`` with ``Dh(n) = m * d(sampled mean loss)/dh(n)``, from a
  forward-backward pass whose targets are *sampled from the model's predictive distribution*,
* moving averages ``X = beta X + (1 - beta) X_minibatch`` every ``stat_freq`` steps (line 14),
* ``H_Omega = (Omega + pi sqrt(lambda) I)^-1``, ``H_Gamma = (Gamma + sqrt(lambda) / pi I)^-1``
  every ``inv_freq`` steps (line 19),
* ``p = H_Gamma BUF_W H_Omega`` with the K-BFGS momentum and decoupled weight decay.

The optimizer owns the state (:class:`KFACLayerState`) and Algorithm 5's order of operations;
the hooks of the factor pass are ``kbfgs.capture`` (``Capture.kfac_factors``), the factors
``kbfgs.layers`` (``A`` is Omega, ``G`` is Gamma) and the damped inversion the pure function
:func:`damped_inverses` (``kbfgs.linalg.damped_spd_inverse``).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import distributed, linalg
from ..capture import KroneckerLayer, LayerRecord, autocast_off, replay_autocast
from .base import (
    DEFAULT_MAX_FACTOR_DIM,
    KroneckerOptimizer,
    _rng_state,
    _set_rng_state,
    aligned_copy,
    check_finite_statistics,
    layer_fields_from_dict,
    two_sided_product,
    unwrap_model,
    warm_start_input,
)
from .validation import check_choice, check_int, check_number

__all__ = [
    "KFAC",
    "LIKELIHOODS",
    "KFACLayerState",
    "damped_inverses",
    "kfac_pi",
    "sample_targets",
    "sampled_loss",
    "sampling_seed",
]

LIKELIHOODS = ("categorical", "bernoulli", "gaussian")


# ---------------------------------------------------------------------------------------------
# Pure functions (no module state): sampling and the damped inverses of line 19
# ---------------------------------------------------------------------------------------------


def sampling_seed(seed: int, stream: str, index: int, rank: int = 0) -> int:
    """The seed of the ``torch.Generator`` that draws the targets of one factor pass.

    ``stream`` is ``"step"`` (``index`` = the iteration k, counted from 1) or ``"warm"``
    (``index`` = the position of the batch in the warm-start iterable); ``rank`` is the
    distributed rank (0 without ``torch.distributed``). The value is the first 63 bits of
    ``blake2b("{seed}:{stream}:{index}:{rank}")``: stable across processes and platforms, so a
    resumed run draws exactly the targets the uninterrupted run would have drawn.
    """
    digest = hashlib.blake2b(f"{int(seed)}:{stream}:{int(index)}:{int(rank)}".encode(),
                             digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _sampling_dtype(out: Tensor) -> torch.dtype:
    return torch.float64 if out.dtype == torch.float64 else torch.float32


def sample_targets(output: Tensor, likelihood: str, generator: torch.Generator) -> Tensor:
    """Targets drawn from the predictive distribution given by the model ``output``.

    * ``"categorical"``: ``output`` are logits with the classes on dim 1 (as for
      ``F.cross_entropy``): ``y ~ Categorical(softmax(output, dim=1))``, an int64 tensor of
      shape ``output.shape`` without dim 1 (drawn with ``torch.multinomial``).
    * ``"bernoulli"``: ``output`` are logits: ``y ~ Bernoulli(sigmoid(output))``
      (``torch.bernoulli``).
    * ``"gaussian"``: ``output`` is the mean: ``y = output + N(0, I)`` (``torch.randn``).

    Probabilities are computed from ``output.detach()`` in float32 (float64 for a float64
    output); the draw uses only ``generator`` (the global RNG is untouched). Non-finite output
    entries (a diverging model) are drawn as if they were 0, so the draw itself never fails;
    the sampled loss on such an output is then non-finite and the factors of that pass are
    skipped (``skipped_stats``).
    """
    out = output.detach().to(_sampling_dtype(output))
    out = torch.where(torch.isfinite(out), out, torch.zeros((), dtype=out.dtype, device=out.device))
    if likelihood == "categorical":
        if out.dim() < 2:
            raise ValueError("likelihood='categorical' needs an output of shape (batch, classes, "
                             f"...) (logits on dim 1), got shape {tuple(output.shape)}")
        probs = torch.softmax(out, dim=1).movedim(1, -1)
        flat = probs.reshape(-1, probs.shape[-1])
        y = torch.multinomial(flat, 1, replacement=True, generator=generator)
        return y.reshape(probs.shape[:-1])
    if likelihood == "bernoulli":
        return torch.bernoulli(torch.sigmoid(out), generator=generator)
    if likelihood == "gaussian":
        noise = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=generator)
        return out + noise
    raise ValueError(f"likelihood must be one of {', '.join(map(repr, LIKELIHOODS))}, "
                     f"got {likelihood!r}")


def sampled_loss(output: Tensor, target: Tensor, likelihood: str, reduction: str) -> Tensor:
    """The loss whose gradient gives the sampled per-sample derivatives ``Dh``.

    ``"categorical"``: ``F.cross_entropy`` (mean, or sum, over the batch and any extra dims);
    ``"bernoulli"``: BCE with logits summed over all non-batch dims; ``"gaussian"``:
    ``0.5 ||output - y||^2`` summed over all non-batch dims; the last two are then averaged
    (``reduction="mean"``) or summed (``"sum"``) over the batch.
    """
    out = output.to(_sampling_dtype(output))
    if likelihood == "categorical":
        return F.cross_entropy(out, target, reduction=reduction)
    if likelihood == "bernoulli":
        per = F.binary_cross_entropy_with_logits(out, target, reduction="none")
    else:
        per = 0.5 * (out - target).pow(2)
    per = per.reshape(per.shape[0], -1).sum(1)
    return per.mean() if reduction == "mean" else per.sum()


def kfac_pi(Omega: Tensor, Gamma: Tensor) -> Tensor:
    """``pi`` of Algorithm 5 line 19, as a 0-dim tensor.

    ``pi^2 = trace(Omega (x) I_G) / trace(I_O (x) Gamma) = (d_G tr Omega) / (d_O tr Gamma)
    = (tr(Omega) / d_O) / (tr(Gamma) / d_G)`` with ``d_O``, ``d_G`` the sizes of Omega and Gamma
    (``trace(X (x) Y) = tr(X) tr(Y)``, ``tr(I_d) = d``). When either trace is not positive or the
    ratio is not finite (e.g. factors that are still zero), ``pi = 1``: the damping is then split
    evenly, ``sqrt(lambda)`` on each side.
    """
    tr_o = torch.diagonal(Omega).sum() / Omega.shape[0]
    tr_g = torch.diagonal(Gamma).sum() / Gamma.shape[0]
    ratio = tr_o / tr_g
    ok = (tr_o > 0) & (tr_g > 0) & torch.isfinite(ratio)
    one = torch.ones_like(ratio)
    return torch.where(ok, torch.sqrt(torch.where(ok, ratio, one)), one)


def _damped_inverses(Omega: Tensor, Gamma: Tensor, damping: float
                     ) -> tuple[Tensor, Tensor, Tensor, int]:
    pi = kfac_pi(Omega, Gamma)
    root = math.sqrt(damping)
    d_o, d_g = pi * root, root / pi
    H_O, fo = linalg.damped_spd_inverse(Omega, d_o)
    H_G, fg = linalg.damped_spd_inverse(Gamma, d_g)
    return H_O, H_G, pi, int(fo) + int(fg)


def damped_inverses(Omega: Tensor, Gamma: Tensor, damping: float) -> tuple[Tensor, Tensor, Tensor]:
    """Line 19 of Algorithm 5: ``(H_Omega, H_Gamma, pi)`` with
    ``H_Omega = (Omega + pi sqrt(lambda) I)^-1`` and ``H_Gamma = (Gamma + sqrt(lambda) / pi I)^-1``
    (``pi`` from :func:`kfac_pi`)."""
    H_O, H_G, pi, _ = _damped_inverses(Omega, Gamma, damping)
    return H_O, H_G, pi


# ---------------------------------------------------------------------------------------------
# The optimizer
# ---------------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class KFACLayerState:
    """Per-layer state of KFAC (``(rows, cols)`` the layer's ``W`` shape)."""

    #: ``|T|``, the number of output locations of the last factor pass
    locations: int
    #: momentum of the gradient, ``(rows, cols)`` in the parameters' dtype
    buf: Tensor
    #: moving averages of the factors (line 14): ``(cols, cols)`` and ``(rows, rows)``
    Omega: Tensor
    Gamma: Tensor
    #: the damped inverses of line 19 and their ``pi``
    H_Omega: Tensor
    H_Gamma: Tensor
    pi: Tensor
    stat_updates: int = 0
    inv_updates: int = 0
    skipped_stats: int = 0
    #: 1 after a warm start (the first factor pass then averages instead of setting)
    warm: int = 0
    inv_fallbacks: int = 0

    def to_state_dict(self) -> dict[str, Any]:
        """The saved form: ``{field: value}``."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def shapes(cls, rows: int, cols: int) -> dict[str, tuple[int | None, ...]]:
        """The shape of each tensor field for a layer whose ``W`` is ``rows x cols``."""
        return {"buf": (rows, cols), "Omega": (cols, cols), "Gamma": (rows, rows),
                "H_Omega": (cols, cols), "H_Gamma": (rows, rows), "pi": ()}

    @classmethod
    def from_state_dict(cls, d: dict[str, Any], device: torch.device, *, layer: str = "?",
                        rows: int | None = None, cols: int | None = None,
                        dtype: torch.dtype | None = None,
                        param_dtype: torch.dtype | None = None) -> KFACLayerState:
        """The inverse of :meth:`to_state_dict`, validated: every tensor key present (the
        counters default to 0), none unknown, and (given ``rows``, ``cols``) every shape; a
        mismatch is a ValueError naming ``layer``. Tensors are copied to ``device`` with
        aligned rows, floating ones cast to ``dtype`` (``buf`` to ``param_dtype``) when given."""
        shapes = {} if rows is None or cols is None else cls.shapes(rows, cols)
        return cls(**layer_fields_from_dict(cls, d, layer=layer, shapes=shapes, device=device,
                                            dtype=dtype, param_dtype=param_dtype))


class KFAC(KroneckerOptimizer):
    """KFAC as the paper implements it (Algorithm 5, Appendix D.1; docs/api.md).

    Args:
        model: the ``nn.Module`` to train (or a ``DistributedDataParallel`` wrapping it). Every
            ``nn.Linear`` / ``nn.Conv2d`` with a trainable weight is a Kronecker layer (same rules,
            fallbacks and warnings as :class:`kbfgs.KBFGS`); every other trainable parameter
            (BatchNorm, ...) is updated with its momentum gradient at the same learning rate
            ``lr`` (Appendix D.1; not ``lr / damping`` as in K-BFGS).
        lr: learning rate alpha (``param_groups[0]["lr"]`` is read every step).
        damping: lambda of line 19 (``param_groups[0]["damping"]`` is read at each inversion).
        momentum: ``buf = momentum * buf + grad`` (line 7; the paper uses 0.9).
        stat_freq: T_1, the factors are updated at the steps k with ``k % stat_freq == 0``.
        inv_freq: T_2, the inverses are recomputed at the steps k with ``k % inv_freq == 0``.
        weight_decay: decoupled weight decay gamma: ``W -= lr * (p + gamma W)`` (Appendix D.3).
        likelihood: the predictive distribution the targets of the factor pass are drawn from:
            ``"categorical"`` (the model output are logits, classes on dim 1, as for
            ``F.cross_entropy``), ``"bernoulli"`` (the output are logits of independent
            Bernoulli variables, as for ``F.binary_cross_entropy_with_logits``) or
            ``"gaussian"`` (the output is the mean of N(output, I), as for half the squared
            error).
        loss_reduction: ``"mean"`` (the closure returns the batch mean, ``Dh = m dL/dh``) or
            ``"sum"`` (``Dh = dL/dh``); the sampled loss uses the same reduction.
        beta: decay of the moving averages of Omega and Gamma (0.9).
        seed: seeds the draws of the sampled targets (see :func:`sampling_seed`: the generator of
            step k is seeded from ``(seed, "step", k, rank)``, so a resumed run is exact).
        check_finite: skip a step whose loss or gradient is not finite (one host sync a step).
        skip_layers: module names (a name covers the modules below it) and/or module types
            whose Linear / Conv2d layers are not Kronecker layers but other parameters.
        max_factor_dim: size guard: a layer whose dense curvature factor would have more rows
            than this (H_A or H_G, K-BFGS(L): H_A only; KFAC: Omega or Gamma) is updated as
            other parameters, with a warning stating the memory it would need (default 8192;
            ``None``: no limit). ``memory_usage()`` gives the bytes of state by part.

    What the closure must provide: nothing beyond the usual closure of every optimizer in this
    package (zero the gradients, run the forward pass, compute the batch-mean loss, call
    ``backward``, return the loss). On a statistics step (``k % stat_freq == 0``) the optimizer
    registers a forward pre-hook on the (unwrapped) model for the duration of the closure and
    remembers, by reference, the positional and keyword arguments of the *first* call of the
    model; after the update it calls the model again with these arguments (same random numbers
    as the closure's pass, autocast as in the closure, no parameter gradients, module buffers
    restored), draws targets from the output and back-propagates the sampled loss. The
    references are dropped at the end of the step; the closure must not modify its inputs in
    place after the forward pass. Hence the closure must call the model (the module given here)
    itself, and the model's output must be a single tensor holding the logits (categorical,
    bernoulli) or the mean (gaussian) of the chosen likelihood. A closure that never calls the
    model raises RuntimeError and a non-tensor output raises TypeError, both before any state
    changes. The sampled loss is ``F.cross_entropy`` (categorical), BCE with logits summed
    over the non-batch dims (bernoulli) or ``0.5 ||output - y||^2`` summed over the non-batch
    dims (gaussian), batch mean (or sum for ``loss_reduction="sum"``); see
    :func:`sample_targets` and :func:`sampled_loss`.

    Damping split (line 19, :func:`damped_inverses`): with ``d_O``, ``d_G`` the sizes of Omega
    and Gamma, ``trace(Omega (x) I_G) = d_G tr(Omega)`` and
    ``trace(I_O (x) Gamma) = d_O tr(Gamma)``,
    so ``pi = sqrt((tr(Omega) / d_O) / (tr(Gamma) / d_G))``; ``pi = 1`` when a trace is not
    positive or the ratio is not finite. ``H_Omega = (Omega + pi sqrt(lambda) I)^-1`` and
    ``H_Gamma = (Gamma + sqrt(lambda) / pi I)^-1`` (Cholesky; eigenvalues as a fallback, counted
    in ``stats()`` as ``inv_fallbacks``).
    A minibatch factor that is not finite leaves the averages unchanged (``skipped_stats``).

    Under ``DistributedDataParallel`` the minibatch factors are averaged across ranks (and the
    warm-start sums added), and the sampling seed includes the rank.

    Initial state: ``warm_start(inputs)`` computes Omega and Gamma as averages over all samples
    of the given batches (sampled targets, generator from ``(seed, "warm", batch index)``) and
    the inverses from them (line 2). Without a warm start, ``H_Omega = H_Gamma = I / sqrt(lambda)``
    (the line-19 inverses of zero factors with ``pi = 1``) until the first inversion, and the
    first statistics pass *sets* Omega and Gamma to its minibatch factors (a warm start from that
    minibatch) instead of averaging them with zeros; later passes use the moving average.
    """

    _kind = "KFAC"

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        damping: float,
        momentum: float = 0.9,
        stat_freq: int = 1,
        inv_freq: int = 20,
        weight_decay: float = 0.0,
        likelihood: str = "categorical",
        *,
        loss_reduction: str = "mean",
        beta: float = 0.9,
        seed: int = 0,
        check_finite: bool = True,
        skip_layers: Iterable[str | type[nn.Module]] | None = None,
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
        grad_scaler: Any = None,
    ) -> None:
        check_int("inv_freq", inv_freq, 1)
        check_choice("likelihood", likelihood, LIKELIHOODS)
        check_number("beta", beta, 0.0, high=1.0)
        check_int("seed", seed)
        self.inv_freq = int(inv_freq)
        self.likelihood = likelihood
        self.beta = float(beta)
        self.seed = int(seed)
        super().__init__(
            model,
            {"lr": lr, "damping": damping, "momentum": momentum, "weight_decay": weight_decay},
            update_freq=stat_freq,
            update_freq_name="stat_freq",
            loss_reduction=loss_reduction,
            check_finite=check_finite,
            skip_layers=skip_layers,
            max_factor_dim=max_factor_dim,
            grad_scaler=grad_scaler,
        )
        self.inverse_updates = 0

    @property
    def stat_freq(self) -> int:
        return self.update_freq

    def _curvature_bytes(self, rows: int, cols: int, itemsize: int) -> int:
        """Omega, Gamma and their damped inverses."""
        return 2 * (cols * cols + rows * rows) * itemsize

    # ------------------------------------------------------------------ step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One iteration of Algorithm 5; returns the loss of the closure.

        ``closure()`` (zero grads, forward, batch-mean loss, backward, return loss) runs once.
        Then: non-finite check (the step is skipped with the state unchanged), momentum and the
        preconditioned update (lines 7-9); if ``k % stat_freq == 0`` the factor pass at the new
        parameters on the same inputs with sampled targets and the moving averages (lines
        11-16); if ``k % inv_freq == 0`` the damped inverses (lines 17-21).
        """
        closure = self._require_closure(closure)
        k = self.steps + 1
        do_stats = k % self.update_freq == 0
        do_inv = k % self.inv_freq == 0
        first = any(layer.name not in self.layer_state for layer in self.layers)
        inner = unwrap_model(self.model)
        record_call = do_stats and bool(self.layers)
        if record_call:
            self._save_rng()
        recording: contextlib.AbstractContextManager[dict[str, Any]] = (
            self.capture.model_call() if record_call else contextlib.nullcontext({}))
        probing: contextlib.AbstractContextManager[dict[str, LayerRecord]] = (
            self.capture.probe() if first else contextlib.nullcontext({}))
        with self.phases("forward_backward"), recording as call, probing as pre:
            loss = closure()
        if not self._accept(loss):  # grad_scaler: unscaled here
            return self._skip_step(loss)
        if record_call and "args" not in call:
            raise RuntimeError(
                f"KFAC samples its targets from the output of the model given to the optimizer "
                f"({type(inner).__name__}), but the closure did not call it; the closure must "
                "run the forward pass through that model (the step was not taken)")
        if record_call and call.get("output") is not None:
            raise _output_type_error(call["output"] + "; the step was not taken")
        self._take_step(pre, k)  # lines 7-9
        if record_call:
            with self.phases("extra_pass"):  # lines 11-13
                with self._extra_pass(), replay_autocast(call["autocast"]):
                    runs: list[Callable[[], Any]] = [partial(inner, *a, **kw)
                                                     for a, kw in call["calls"]]
                    records = self._factor_pass(runs, "step", k)
                call.clear()
            with self.phases("curvature"), autocast_off():  # line 14
                self._demote_uncalled(records)  # the replayed call ran the same modules
                self._update_factors(records)
        if do_inv and self.layers:
            with self.phases("inverse"), autocast_off():  # lines 17-21
                self._update_inverses()
        self._scaler_update()
        return loss

    # ------------------------------------------------------------------ factor pass
    def _rank(self) -> int:
        """This process's rank in the model's process group (0 without one)."""
        group = distributed.process_group(self.model)
        return 0 if group is None else distributed.rank(group)

    def _factor_pass(self, run: Callable[[], Any] | list[Callable[[], Any]], stream: str,
                     index: int) -> dict[str, LayerRecord]:
        """Run ``run()`` (a forward pass of the model) under ``Capture.kfac_factors``, draw
        targets from its output and back-propagate the sampled loss to the layer outputs;
        returns the minibatch factors per layer (``A`` = Omega, ``G`` = Gamma). A list of
        several runs (the micro-batches of the closure) goes to :meth:`_micro_factor_pass`."""
        runs = run if isinstance(run, list) else [run]
        if len(runs) > 1:
            return self._micro_factor_pass(runs, stream, index)
        run = runs[0]
        with self.capture.kfac_factors() as records, torch.enable_grad():
            out = run()
            if not isinstance(out, Tensor):
                raise _output_type_error(type(out).__name__)
            gen = torch.Generator(device=out.device)
            gen.manual_seed(sampling_seed(self.seed, stream, index, self._rank()))
            target = sample_targets(out, self.likelihood, gen)
            loss = sampled_loss(out, target, self.likelihood, self.loss_reduction)
            self.capture.backward(loss, records)
        return records

    def _micro_factor_pass(self, runs: list[Callable[[], Any]], stream: str, index: int
                           ) -> dict[str, LayerRecord]:
        """The factor pass of a closure that accumulated gradients over micro-batches: the
        factors of the whole batch, as the one-batch pass would form them.

        The targets are drawn once for the concatenated output of all micro-batches (a forward
        pass of each without a graph), with the generator of the one-batch pass, so they are
        the one-batch draw; then each micro-batch runs forward and backward with its share
        ``m_j / m`` of the sampled batch loss (same random numbers again), and the capture
        combines the micro-batches as samples. Cost: one more forward pass without a graph
        per micro-batch; memory: one micro-batch's graph at a time."""
        rng = _rng_state(self._rng_devices())
        with torch.no_grad():
            outs = [r() for r in runs]
        for o in outs:
            if not isinstance(o, Tensor):
                raise _output_type_error(type(o).__name__)
        sizes = [o.shape[0] for o in outs]
        out = torch.cat(outs)
        del outs
        gen = torch.Generator(device=out.device)
        gen.manual_seed(sampling_seed(self.seed, stream, index, self._rank()))
        targets = sample_targets(out, self.likelihood, gen).split(sizes)
        del out
        total = sum(sizes)
        _set_rng_state(rng)
        with self.capture.kfac_factors() as records, torch.enable_grad():
            for r, target, m in zip(runs, targets, sizes):
                loss = sampled_loss(r(), target, self.likelihood, self.loss_reduction)
                if self.loss_reduction == "mean":
                    loss = loss * (m / total)
                self.capture.backward(loss, records)
        return records

    def _reduce_across_ranks(self, tensors: list[Tensor], op: str) -> None:
        """In-place mean (``op="avg"``) or sum over ranks of a DDP model (no-op otherwise):
        one flat all-reduce per dtype (``kbfgs.distributed.all_reduce_flat``)."""
        distributed.all_reduce_flat(tensors, distributed.process_group(self.model),
                                    average=op == "avg")

    @torch.no_grad()
    def _update_factors(self, records: dict[str, LayerRecord]) -> None:
        """Line 14: moving averages, kept unchanged for a layer whose minibatch factors are not
        finite (counted in ``skipped_stats``)."""
        self._check_records(records)
        todo = []
        for layer in self.layers:
            r, st = records.get(layer.name), self.layer_state.get(layer.name)
            if st is None or r is None or r.calls != 1 or r.A is None or r.G is None:
                continue
            todo.append((st, r, r.A, r.G))
        if not todo:
            return
        self._reduce_across_ranks([t for _, _, A, G in todo for t in (A, G)], "avg")
        # one reduction per factor: a NaN or inf entry makes the sum non-finite (a sum that
        # overflows only skips the update, conservatively); one host sync for all layers
        oks = torch.isfinite(torch.stack([A.sum() + G.sum() for _, _, A, G in todo])).tolist()
        b = self.beta
        for (st, r, A, G), ok in zip(todo, oks):
            if not ok:
                st.skipped_stats += 1
                continue
            if st.stat_updates == 0 and not st.warm:
                st.Omega = A.clone()
                st.Gamma = G.clone()
            else:  # beta X + (1 - beta) X_mb in one pass
                st.Omega.lerp_(A, 1.0 - b)
                st.Gamma.lerp_(G, 1.0 - b)
            st.stat_updates += 1
            st.locations = r.locations
        self.curvature_updates += 1

    @torch.no_grad()
    def _update_inverses(self) -> None:
        """Lines 17-21 for every layer with state (the damping is read now)."""
        damping = self.param_groups[0]["damping"]
        for layer in self.layers:
            st = self.layer_state.get(layer.name)
            if st is None:
                continue
            self._invert(st, damping)
        self.inverse_updates += 1

    @staticmethod
    def _invert(st: KFACLayerState, damping: float) -> None:
        H_O, H_G, pi, fallbacks = _damped_inverses(st.Omega, st.Gamma, damping)
        st.H_Omega, st.H_Gamma, st.pi = aligned_copy(H_O), aligned_copy(H_G), pi
        st.inv_updates += 1
        st.inv_fallbacks += fallbacks

    # ------------------------------------------------------------------ layer state
    def _init_layer(self, layer: KroneckerLayer, locations: int,
                    A0: Tensor | None = None) -> KFACLayerState:
        """Line 2 without a warm start: zero factors, ``H = I / sqrt(lambda)``."""
        st = self.layer_state.get(layer.name)
        if st is not None:
            st.locations = locations
            return st
        rows, cols = layer.helper.dims()
        dtype, device = self._curvature_dtype(layer.module), layer.helper.weight.device
        root = math.sqrt(self.param_groups[0]["damping"])
        st = KFACLayerState(
            locations=locations,
            buf=aligned_copy(torch.zeros(rows, cols, dtype=layer.helper.weight.dtype,
                                         device=device)),
            Omega=torch.zeros(cols, cols, dtype=dtype, device=device),
            Gamma=torch.zeros(rows, rows, dtype=dtype, device=device),
            H_Omega=aligned_copy(torch.eye(cols, dtype=dtype, device=device) / root),
            H_Gamma=aligned_copy(torch.eye(rows, dtype=dtype, device=device) / root),
            pi=torch.ones((), dtype=dtype, device=device),
        )
        self.layer_state[layer.name] = st
        return st

    def _layer_state_from_dict(self, d: dict[str, Any], layer: KroneckerLayer) -> KFACLayerState:
        return KFACLayerState.from_state_dict(d, layer.helper.weight.device,
                                              **self._layer_load_args(layer))

    def _precondition(self, layer: KroneckerLayer, st: KFACLayerState) -> Tensor:
        """Line 8: ``p = H_Gamma BUF H_Omega``."""
        return two_sided_product(st.H_Gamma, st.buf, st.H_Omega, self._scratch)

    # ------------------------------------------------------------------ warm start
    def warm_start(self, inputs: Iterable[Any]) -> None:
        """Line 2: Omega and Gamma from data, then the line-19 inverses.

        ``inputs`` is an iterable of input batches: tensors, or tuples/lists whose first element
        is the input (e.g. a DataLoader of ``(x, y)``; the labels are not used: the targets are
        sampled from the model). Each batch runs forward (in the model's current mode) and
        backward with sampled targets, without parameter gradients; Omega and Gamma are the
        averages over all samples; module buffers (BatchNorm running statistics) are restored.
        """
        with self.phases("warm_start"):
            self._warm_start(inputs)
        self.warm_started = True

    def _warm_start(self, inputs: Iterable[Any]) -> None:
        inner = unwrap_model(self.model)
        buffers = [(b, b.clone()) for b in inner.buffers()]
        sums: dict[str, list[Tensor]] = {}
        count: dict[str, int] = defaultdict(int)
        locations: dict[str, int] = {}
        device = next(iter(self.param_groups[0]["params"])).device
        try:
            for i, batch in enumerate(inputs):
                x = warm_start_input(batch, i).to(device)
                records = self._factor_pass(partial(inner, x), "warm", i)
                self._check_records(records)
                for name, r in records.items():
                    if r.calls != 1 or r.A is None or r.G is None:
                        continue
                    if name in sums:
                        sums[name][0].add_(r.A, alpha=r.batch)
                        sums[name][1].add_(r.G, alpha=r.batch)
                    else:
                        sums[name] = [r.A * r.batch, r.G * r.batch]
                    count[name] += r.batch
                    locations[name] = r.locations
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        if not sums:
            raise ValueError("warm_start received no input batches (or no Kronecker layer ran)")
        names = [ly.name for ly in self.layers if ly.name in sums]
        counts = torch.tensor([float(count[n]) for n in names], dtype=torch.float64, device=device)
        self._reduce_across_ranks([t for n in names for t in sums[n]] + [counts], "sum")
        damping = self.param_groups[0]["damping"]
        with torch.no_grad():
            factors = {n: [t / c for t in sums[n]] for n, c in zip(names, counts.tolist())}
            check_finite_statistics({n: f[0] for n, f in factors.items()}, "Omega")
            check_finite_statistics({n: f[1] for n, f in factors.items()}, "Gamma")
            for layer in [ly for ly in self.layers if ly.name in factors]:
                Omega, Gamma = factors[layer.name]
                st = self._init_layer(layer, locations[layer.name])
                st.Omega, st.Gamma = Omega, Gamma
                st.warm = 1
                self._invert(st, damping)

    # ------------------------------------------------------------------ state / diagnostics
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["kronecker"]["kfac"] = {"seed": self.seed, "inverse_updates": self.inverse_updates}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        extra = (state_dict.get("kronecker", {}).get("kfac") if isinstance(state_dict, dict)
                 else None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.seed = int(extra["seed"])
            self.inverse_updates = int(extra["inverse_updates"])

    def stats(self, condition: bool = True) -> dict[str, Any]:
        out = super().stats(condition)
        out["inverse_updates"] = self.inverse_updates
        return out

    def _layer_stats(self, layer: KroneckerLayer, st: KFACLayerState,
                     condition: bool) -> dict[str, Any]:
        out: dict[str, Any] = {
            "pi": float(st.pi),
            "stat_updates": int(st.stat_updates),
            "inv_updates": int(st.inv_updates),
            "skipped_stats": int(st.skipped_stats),
            "inv_fallbacks": int(st.inv_fallbacks),
        }
        if condition:
            out["cond_H_Omega"] = linalg.condition_number(st.H_Omega)
            out["cond_H_Gamma"] = linalg.condition_number(st.H_Gamma)
        return out


# ---------------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------------


def _output_type_error(got: str) -> TypeError:
    return TypeError(
        "KFAC draws the targets of its Gamma pass from the model output, so the model must "
        "return a single tensor: the logits (likelihood 'categorical' with classes on dim 1, or "
        "'bernoulli') or the mean ('gaussian') of the predictive distribution; got " + got)
