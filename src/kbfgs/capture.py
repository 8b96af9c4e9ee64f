"""Every hook of the optimizers: per-layer curvature recorded during one pass at a time.

Hooks are registered only for the duration of a recording pass and removed afterwards, so
iterations without a curvature update run with no hook at all. Inside a pass the forward hook
reduces the layer input and output at once and a tensor hook on the output reduces its
gradient; no activation tensor is kept beyond the hook except K-BFGS's layer inputs until the
closure returns (``A s_A`` needs the ``a_bar`` of the whole batch, see :meth:`Capture.kbfgs_pre`).
Curvature is computed with autocast off (float32, float64 for float64 weights).

A closure that accumulates gradients over micro-batches (``for xm, ym in chunks:
loss_fn(model(xm), ym).backward()``) calls each module once per micro-batch, each call's backward
before the next forward; :meth:`Capture._begin_call` tells this apart from reuse inside one
forward pass and the recordings combine the micro-batches as samples (:func:`merge_mean`,
:func:`merge_output_grad`).

The recordings (each a context manager yielding ``{layer name: LayerRecord}``):

=============================  ==============================================================
:meth:`Capture.probe`          call counts and the number of locations ``|T|`` of each layer
:meth:`Capture.warm`           ``batch * A`` (warm start of H_A, Algorithm 2 line 3)
:meth:`Capture.kbfgs_pre`      ``a_bar``, ``s_A = H_A a_bar``, ``A s_A`` (eq. 15), ``h_bar``,
                               ``Dh_bar`` (and the explicit minibatch ``A`` on request)
:meth:`Capture.kbfgs_post`     ``h_bar+``, ``Dh_bar+`` (the extra pass, Algorithm 2 line 12)
:meth:`Capture.kfac_factors`   KFAC's ``Omega`` (``A``) and ``Gamma`` (``G``), Algorithm 5
=============================  ==============================================================

Every recording counts calls per module so that a module used twice in one forward is
detected. :meth:`Capture.model_call` records the arguments of the model's call of each
micro-batch (KFAC replays them for its sampled-target pass). Every recording runs
``torch.compile``-d code eagerly (:func:`eager`), so hooks never enter a compiled graph.
"""

from __future__ import annotations

import contextlib
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from . import distributed
from .layers import KroneckerHelper

__all__ = ["Capture", "KroneckerLayer", "LayerRecord", "autocast_off", "merge_mean",
           "merge_output_grad", "no_autocast", "reduce_kbfgs_records"]

#: ``s_A_fn(layer, record)``: ``s_A = H_A a_bar`` of a layer (``None``: form no ``A s_A``)
SAFn = Callable[["KroneckerLayer", "LayerRecord"], "Tensor | None"]


@dataclass
class KroneckerLayer:
    """A Kronecker layer: its qualified name and its helper, bound to the module at discovery
    (the bias flag fixed then)."""

    name: str
    helper: KroneckerHelper

    @property
    def module(self) -> nn.Module:
        return self.helper.module


@dataclass
class LayerRecord:
    """What one pass recorded for one layer (``None`` where the recording does not record).

    Shapes with ``(rows, cols)`` the layer's :meth:`KroneckerHelper.dims`: ``a_bar``, ``s_A``,
    ``A_s`` are ``(cols,)``, ``A`` is ``(cols, cols)``, ``h_bar`` and ``Dh_bar`` are ``(rows,)``
    and ``G`` is ``(rows, rows)``."""

    #: the most calls of the module inside one forward pass (more than 1: reuse)
    calls: int = 0
    #: samples recorded, summed over the micro-batches
    batch: int = 0
    locations: int = 0
    #: micro-batches recorded (a closure that accumulates gradients over several forward and
    #: backward passes, see :meth:`Capture._begin_call`)
    chunks: int = 0
    a_bar: Tensor | None = None
    s_A: Tensor | None = None
    A_s: Tensor | None = None
    A: Tensor | None = None
    h_bar: Tensor | None = None
    Dh_bar: Tensor | None = None
    #: ``E_n[mean_t |Dh_t(n)|]`` summed over the outputs: the scale against which ``Dh_bar``
    #: is at rounding level (a conv followed by BatchNorm)
    Dh_scale: Tensor | None = None
    G: Tensor | None = None
    #: the layer inputs of the micro-batches, kept until ``A s_A`` is formed (K-BFGS)
    inputs: list[Tensor] = field(default_factory=list)
    #: ``A`` of the micro-batches whose inputs were folded into it (K-BFGS, micro-batches whose
    #: inputs would take more memory than ``A``)
    A_fold: Tensor | None = None
    #: the zero scalar added to the output in a KFAC pass (dropped at the end of the pass)
    dummy: Tensor | None = None
    #: calls of the module in the current micro-batch
    chunk_calls: int = 0
    #: the gradient of the last recorded call's output arrived (its backward ran)
    grad_arrived: bool = False
    #: samples of the micro-batches whose ``Dh_bar`` (``G``) arrived
    grad_batch: int = 0


def merge_mean(acc: Tensor | None, n_acc: int, new: Tensor, n_new: int) -> Tensor:
    """``(n_acc acc + n_new new) / (n_acc + n_new)``: two sample averages (``a_bar``, ``h_bar``,
    ``A``, Omega) of micro-batches of ``n_acc`` and ``n_new`` samples as one average (``new``
    itself when nothing is accumulated yet)."""
    if acc is None or n_acc == 0:
        return new
    n = n_acc + n_new
    return acc * (n_acc / n) + new * (n_new / n)


def merge_output_grad(acc: Tensor | None, n_acc: int, new: Tensor, n_new: int,
                      reduction: str, gram: bool = False) -> Tensor:
    """``Dh_bar`` (``gram=False``) or KFAC's Gamma (``gram=True``) of micro-batches of ``n_acc``
    and ``n_new`` samples, each computed with its own batch size from ``g = dL/dh`` of the loss
    the closure back-propagates (each micro-batch's share of the batch loss).

    ``Dh(n) = m dL/dh(n)`` (``"mean"``) or ``dL/dh(n)`` (``"sum"``) with ``m`` the whole batch.
    ``"mean"``: ``Dh_bar`` does not depend on ``m`` and the micro-batch values add; Gamma scales
    with ``m``: ``(n/n_acc) acc + (n/n_new) new``. ``"sum"``: both are sample averages
    (:func:`merge_mean`)."""
    if acc is None or n_acc == 0:
        return new
    if reduction == "sum":
        return merge_mean(acc, n_acc, new, n_new)
    if not gram:
        return acc + new
    n = n_acc + n_new
    return acc * (n / n_acc) + new * (n / n_new)


def reduce_kbfgs_records(pre: dict[str, LayerRecord], post: dict[str, LayerRecord],
                         group: Any) -> int:
    """Average the vectors of a K-BFGS curvature update over ``group`` with one flat all-reduce
    (per dtype): ``A s_A``, ``h_bar``, ``Dh_bar``, ``Dh_scale`` (and the explicit ``A`` of the
    2020 variants, Gamma ``G`` of :attr:`Capture.gram` layers) of the pass before the step,
    ``h_bar+``, ``Dh_bar+``, ``Dh_scale`` (and ``G``) of the extra pass (every rank then takes
    the same rounding-level decision). ``a_bar`` and ``s_A`` are already global
    (:meth:`Capture.kbfgs_pre`). Returns the number of collectives (0 without a group)."""
    if group is None:
        return 0
    tensors: list[Tensor | None] = []
    for name, r0 in pre.items():
        tensors += [r0.A_s, r0.h_bar, r0.Dh_bar, r0.Dh_scale, r0.A, r0.G]
        r1 = post.get(name)
        if r1 is not None:
            tensors += [r1.h_bar, r1.Dh_bar, r1.Dh_scale, r1.G]
    return distributed.all_reduce_flat(tensors, group)


_Hook = Callable[[nn.Module, tuple, Tensor], "Tensor | None"]


@dataclass
class Capture:
    """Attaches hooks to the Kronecker layers (and to ``root``, the unwrapped model) for one
    pass at a time; ``hook_seconds`` accumulates the host time spent in the hooks."""

    layers: list[KroneckerLayer]
    dtype_fn: Callable[[nn.Module], torch.dtype]
    reduction: str = "mean"
    root: nn.Module | None = None
    hook_seconds: float = 0.0
    #: names of the layers whose K-BFGS passes (:meth:`kbfgs_pre`, :meth:`kbfgs_post`) also
    #: record ``rec.G``, KFAC's Gamma ``E[Dh Dh^T]`` of the output gradients (kbfgs-plus with
    #: ``fisher_G``)
    gram: set[str] = field(default_factory=set)
    #: layer name -> the BatchNorm whose input is that layer's output, unchanged (found in the
    #: first recorded pass, :meth:`_watch_norms`): while the BatchNorm normalises with the
    #: batch's statistics, the layer's ``Dh_bar`` is 0 in exact arithmetic
    norm_fed: dict[str, nn.Module] = field(default_factory=dict)
    _norms_watched: bool = False
    _dummy: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ the recordings
    @contextlib.contextmanager
    def probe(self, grad_only: bool = False, need_A: bool = False
              ) -> Iterator[dict[str, LayerRecord]]:
        """Call counts and ``|T|`` (the first pass of a layer, to initialise its state), and
        with ``need_A`` the minibatch ``A`` (``rec.A``, the sample mean over the micro-batches),
        formed when the block ends from the inputs the hooks kept (as :meth:`kbfgs_pre` forms
        ``A s_A``: no curvature work inside a compiled model). ``grad_only``: as in
        :meth:`kbfgs_pre`."""
        with self._pass(lambda layer, rec: self._counting_hook(layer, rec, need_A),
                        grad_only) as recs:
            try:
                yield recs
                if need_A:
                    self._finish_A(recs)
            finally:
                for r in recs.values():
                    r.inputs = []
                    r.A_fold = None

    def warm(self) -> contextlib.AbstractContextManager[dict[str, LayerRecord]]:
        """``rec.A = batch * A``: the sum over the batch of ``sum_t a_t a_t^T`` (no gradients)."""
        return self._pass(self._warm_hook)

    @contextlib.contextmanager
    def kbfgs_pre(self, s_A_fn: SAFn, need_A: bool = False, group: Any = None,
                  grad_only: bool = False) -> Iterator[dict[str, LayerRecord]]:
        """K-BFGS's pass before the step: ``a_bar``, ``s_A = s_A_fn(layer, rec)``, ``A s_A``,
        ``h_bar``, ``Dh_bar`` (and the minibatch ``A`` when ``need_A``).

        ``A s_A`` needs ``s_A = H_A a_bar`` with the ``a_bar`` of the *whole* batch: of every
        micro-batch of a closure that accumulates gradients, and, with a process ``group``
        (data-parallel K-BFGS), of every rank (averaging local ``A_r H_A a_bar_r`` is not the
        global quantity). So the hooks keep a reference to each layer input (autograd holds it
        anyway until that micro-batch's backward) and ``A s_A`` is formed when the block ends
        (after the ``a_bar`` of every layer were averaged over ``group`` in one flat all-reduce):
        ``A s_A = sum_j m_j A_j s_A / m`` over the micro-batches ``j`` of ``m_j`` samples. When
        the kept inputs of a layer would hold more elements than its ``cols x cols`` matrix
        ``A``, they are folded into the explicit ``A = sum_j m_j A_j / m`` (exact, formed from
        the inputs in chunks) and ``A s_A`` is that matrix times ``s_A``: a layer holds at most
        ``max(cols^2, one micro-batch input)`` elements beyond what autograd holds.

        ``grad_only``: record only the calls made with gradients enabled (a recording left open
        across the user's own loop, where evaluation passes under ``torch.no_grad()`` run too);
        such a recording does not force ``torch.compile``-d code to run eagerly."""
        with self._pass(lambda layer, rec: self._pre_hook(layer, rec, need_A),
                        grad_only) as recs:
            try:
                yield recs
                self._finish_A_s(recs, s_A_fn, group)
            finally:
                for r in recs.values():
                    r.inputs = []
                    r.A_fold = None

    def kbfgs_post(self, grad_only: bool = False
                   ) -> contextlib.AbstractContextManager[dict[str, LayerRecord]]:
        """K-BFGS's extra pass: ``h_bar+``, ``Dh_bar+``. No parameter requires grad there, so a
        layer output that is not part of a graph is made one (plus a shared zero scalar that
        requires grad) for its gradient hook to run. ``grad_only``: as in :meth:`kbfgs_pre`."""
        return self._pass(self._post_hook, grad_only)

    @contextlib.contextmanager
    def kfac_factors(self) -> Iterator[dict[str, LayerRecord]]:
        """KFAC's factor pass: ``rec.A`` = Omega and, once :meth:`backward` ran, ``rec.G`` =
        Gamma (curvature in float32/64 even under autocast).

        Every layer output ``h`` is replaced by ``h + z`` with ``z`` a zero scalar leaf that
        requires grad: the pass then builds a graph even though no parameter requires grad, and
        :meth:`backward` reaches every ``h`` without writing any ``.grad``. The tensor hook is
        registered on ``h + z`` before any in-place op that may follow (e.g.
        ``ReLU(inplace=True)``) and so receives ``dL/dh`` itself."""
        with self._pass(self._kfac_hook) as recs:
            try:
                yield recs
            finally:
                for r in recs.values():
                    r.dummy = None

    @staticmethod
    def backward(loss: Tensor, records: dict[str, LayerRecord]) -> None:
        """Back-propagate ``loss`` to the outputs recorded by :meth:`kfac_factors` (their
        gradient hooks form Gamma); no parameter's ``.grad`` is written."""
        dummies = [r.dummy for r in records.values() if r.dummy is not None]
        if dummies:
            torch.autograd.grad(loss, dummies, allow_unused=True)

    @contextlib.contextmanager
    def model_call(self) -> Iterator[dict[str, Any]]:
        """Records the calls of ``root`` in the block: ``call["calls"]``, one ``(args, kwargs)``
        (by reference) per micro-batch (a call of ``root`` after the gradient of the previous
        recorded call's output arrived; further calls inside one forward pass are not
        recorded), ``call["args"]``, ``["kwargs"]`` of the first, ``["autocast"]`` (the autocast
        settings in force, for :func:`replay_autocast`) and ``["output"]`` (``None`` for a
        tensor output, else the output's type name)."""
        if self.root is None:
            raise RuntimeError("Capture.model_call needs `root`")
        call: dict[str, Any] = {"calls": []}
        state = {"arrived": False, "open": False}

        def arrived(g: Tensor) -> None:
            state["arrived"] = True

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if call["calls"] and not state["arrived"]:
                return
            call["calls"].append((args, dict(kwargs)))
            state["arrived"], state["open"] = False, True
            if "args" not in call:
                call["args"], call["kwargs"] = args, dict(kwargs)
                call["autocast"] = _autocast_state()

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if not state["open"]:
                return
            state["open"] = False
            if "output" not in call:
                call["output"] = None if isinstance(output, Tensor) else type(output).__name__
            if isinstance(output, Tensor) and output.requires_grad:
                output.register_hook(arrived)

        handles = (self.root.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   self.root.register_forward_hook(hook))
        try:
            with eager():
                yield call
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ the hooks
    @contextlib.contextmanager
    def _pass(self, make_hook: Callable[[KroneckerLayer, LayerRecord], _Hook],
              grad_only: bool = False) -> Iterator[dict[str, LayerRecord]]:
        records = {layer.name: LayerRecord() for layer in self.layers}
        handles = []
        try:
            for layer in self.layers:
                hook = make_hook(layer, records[layer.name])
                if grad_only:
                    # left open across the user's loop, the hook may be called from compiled
                    # code: it runs eagerly there (one graph break, as any hook; traced, it
                    # would be recompiled per layer and stop at its timer)
                    hook = torch.compiler.disable(_with_grad_only(hook))
                handles.append((layer.module, layer.module.register_forward_hook(hook)))
            # a recording left open across the user's loop (grad_only) must not change the
            # compile stance of the user's own code
            with contextlib.nullcontext() if grad_only else eager(), self._watch_norms(records):
                yield records
        finally:
            for module, h in handles:
                h.remove()
                # a recording left open and then collected with a garbage cycle: the garbage
                # collector clears the handle's weak reference first, so remove() is a no-op
                module._forward_hooks.pop(h.id, None)

    @contextlib.contextmanager
    def _watch_norms(self, records: dict[str, LayerRecord]) -> Iterator[None]:
        """Fills :attr:`norm_fed` in the first pass that records a call (after the Capture is
        made: a loaded optimizer finds it again): which layer outputs go, unchanged, into a
        BatchNorm (``nn.modules.batchnorm._BatchNorm``: ``BatchNorm1d/2d/3d``,
        ``SyncBatchNorm``) that normalises over every dimension but the layer's output features
        (a conv's 4-d output, a Linear's 2-d one). "Unchanged": the very tensor the layer
        returned, not modified in place since (an in-place activation between them, e.g.
        ``ReLU(inplace=True)``, changes its version counter). Registered after the recording
        hooks, so the output a K-BFGS extra pass substitutes is the one watched. The hooks run
        eagerly inside a compiled model (this one pass only)."""
        if self._norms_watched or self.root is None:
            yield
            return
        norms = [m for m in self.root.modules()
                 if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        if not norms:
            self._norms_watched = True
            yield
            return
        outputs: dict[int, tuple[weakref.ref[Tensor], int, str]] = {}
        found: dict[str, nn.Module] = {}

        def watch(layer: KroneckerLayer) -> _Hook:
            features_dim = 4 if getattr(layer.helper, "is_conv", False) else 2

            @torch.compiler.disable
            def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
                if (isinstance(output, Tensor) and output.dim() == features_dim
                        and not output.is_inference()):
                    outputs[id(output)] = (weakref.ref(output), output._version, layer.name)

            return hook

        @torch.compiler.disable
        def check(module: nn.Module, args: tuple) -> None:
            x = args[0] if args else None
            if not isinstance(x, Tensor):
                return
            entry = outputs.get(id(x))
            if entry is not None and entry[0]() is x and entry[1] == x._version:
                found[entry[2]] = module

        handles = [(layer.module._forward_hooks, layer.module.register_forward_hook(watch(layer)))
                   for layer in self.layers]
        handles += [(m._forward_pre_hooks, m.register_forward_pre_hook(check)) for m in norms]
        try:
            yield
        finally:
            for hooks, h in handles:
                h.remove()
                hooks.pop(h.id, None)  # collected with a garbage cycle: see _pass
            if any(r.chunks for r in records.values()):
                self.norm_fed = found
                self._norms_watched = True

    def uses_batch_statistics(self, name: str) -> bool:
        """Whether layer ``name`` feeds a BatchNorm directly (:attr:`norm_fed`) that now
        normalises with the batch's statistics (training mode, or no running statistics):
        its ``Dh_bar`` is then 0 in exact arithmetic, in every precision."""
        norm = self.norm_fed.get(name)
        return norm is not None and bool(norm.training or not norm.track_running_stats)

    @staticmethod
    def _begin_call(helper: KroneckerHelper, rec: LayerRecord, x: Tensor, output: Tensor) -> int:
        """Count the call; return the number of samples it records, 0 for none.

        A call opens a micro-batch when it is the module's first in the pass, or when the
        gradient of the module's previous recorded call has arrived: that call's backward ran
        before this forward (gradient accumulation inside the closure); the micro-batches are
        then combined as samples. Otherwise the module is used again inside one forward pass
        (``rec.calls > 1``, reported by the optimizer) and nothing is recorded."""
        if x.dim() > 1 and x.shape[0] == 0:  # a shape check, no host sync
            raise ValueError(f"empty batch: a Kronecker layer ({type(helper).__name__}) received "
                             f"an input of shape {tuple(x.shape)}; every batch (and micro-batch) "
                             "needs at least one sample")
        if rec.chunk_calls and not rec.grad_arrived:  # reuse inside one forward pass
            rec.chunk_calls += 1
            rec.calls = max(rec.calls, rec.chunk_calls)
            return 0
        m = helper.batch_size(x)
        rec.chunk_calls = 1
        rec.calls = max(rec.calls, 1)
        rec.chunks += 1
        rec.grad_arrived = False
        rec.locations = helper.locations(output)
        rec.batch += m
        return m

    @staticmethod
    def _mark_grad(output: Tensor, rec: LayerRecord) -> None:
        """Note when the gradient of ``output`` arrives (tells accumulation from reuse)."""

        def grad_hook(g: Tensor) -> None:
            rec.grad_arrived = True

        output.register_hook(grad_hook)

    def _counting_hook(self, layer: KroneckerLayer, rec: LayerRecord,
                       need_A: bool = False) -> _Hook:
        helper = layer.helper

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            m = self._begin_call(helper, rec, inputs[0], output)
            if m and need_A:  # kept; A is formed when the recording ends
                self._keep_input(helper, rec, inputs[0].detach(), rec.batch - m,
                                 self.dtype_fn(module))
            if m and output.requires_grad:
                self._mark_grad(output, rec)

        # a layer's first minibatch, once: run eagerly inside a compiled model (traced, the
        # kept inputs would recompile the hook for every layer shape and dtype)
        return torch.compiler.disable(hook) if need_A else hook

    def _warm_hook(self, layer: KroneckerLayer, rec: LayerRecord) -> _Hook:
        helper = layer.helper

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            t0 = time.perf_counter()
            m = self._begin_call(helper, rec, inputs[0], output)
            if m:
                x = inputs[0].detach().to(self.dtype_fn(module))
                with no_autocast(x):
                    A = helper.A(x) * m
                rec.A = A if rec.A is None else rec.A + A
                self.hook_seconds += time.perf_counter() - t0

        return hook

    def _pre_hook(self, layer: KroneckerLayer, rec: LayerRecord, need_A: bool) -> _Hook:
        helper = layer.helper

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            t0 = time.perf_counter()
            m = self._begin_call(helper, rec, inputs[0], output)
            if not m:
                return
            n0 = rec.batch - m
            dtype = self.dtype_fn(module)
            with no_autocast(output):  # curvature in float32/64 whatever the autocast state
                x = inputs[0].detach()
                xd = x.to(dtype)
                rec.a_bar = merge_mean(rec.a_bar, n0, helper.a_bar(xd), m)
                if need_A:
                    rec.A = merge_mean(rec.A, n0, helper.A(xd), m)
                else:
                    self._keep_input(helper, rec, x, n0, dtype)
                del xd
                rec.h_bar = merge_mean(rec.h_bar, n0, helper.h_bar(output.detach().to(dtype)), m)
            if output.requires_grad:
                self._on_grad(output, rec, helper, dtype, m, layer.name in self.gram)
            self.hook_seconds += time.perf_counter() - t0

        return hook

    @staticmethod
    def _keep_input(helper: KroneckerHelper, rec: LayerRecord, x: Tensor, n0: int,
                    dtype: torch.dtype) -> None:
        """Keep ``x`` for ``A s_A`` (see :meth:`kbfgs_pre`), or fold the micro-batch inputs into
        the explicit ``A`` once they would hold more elements than it."""
        if rec.A_fold is not None:
            rec.A_fold = merge_mean(rec.A_fold, n0, helper.A(x.to(dtype)), helper.batch_size(x))
            return
        rec.inputs.append(x)
        cols = helper.dims()[1]
        if len(rec.inputs) == 1 or sum(t.numel() for t in rec.inputs) <= cols * cols:
            return
        Capture._fold_inputs(helper, rec, dtype)

    @staticmethod
    def _fold_inputs(helper: KroneckerHelper, rec: LayerRecord, dtype: torch.dtype) -> None:
        """Fold the kept inputs (none folded before) into ``rec.A_fold``, the sample mean of
        their ``A`` (exact, one micro-batch at a time); the inputs are dropped."""
        n = 0
        for t in rec.inputs:
            mt = helper.batch_size(t)
            rec.A_fold = merge_mean(rec.A_fold, n, helper.A(t.to(dtype)), mt)
            n += mt
        rec.inputs = []

    def _post_hook(self, layer: KroneckerLayer, rec: LayerRecord) -> _Hook:
        helper = layer.helper

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            t0 = time.perf_counter()
            m = self._begin_call(helper, rec, inputs[0], output)
            if not m:
                return None
            dtype = self.dtype_fn(module)
            with no_autocast(output):
                h_bar = helper.h_bar(output.detach().to(dtype))
            rec.h_bar = merge_mean(rec.h_bar, rec.batch - m, h_bar, m)
            result = None
            if not output.requires_grad and torch.is_grad_enabled():
                # No parameter upstream requires grad in this pass: make the output a node of
                # the graph (not a leaf, so in-place activations after it stay legal).
                output = output + self._dummy_scalar(output)
                result = output
            if output.requires_grad:
                self._on_grad(output, rec, helper, dtype, m, layer.name in self.gram)
            self.hook_seconds += time.perf_counter() - t0
            return result

        return hook

    def _on_grad(self, output: Tensor, rec: LayerRecord, helper: KroneckerHelper,
                 dtype: torch.dtype, batch: int, gram: bool = False) -> None:
        """``rec.Dh_bar`` and ``rec.Dh_scale`` (with ``gram`` also ``rec.G``) from the output's
        gradient (``batch`` samples), merged with those of the earlier micro-batches."""
        reduction = self.reduction

        def grad_hook(g: Tensor) -> None:
            t1 = time.perf_counter()
            rec.grad_arrived = True
            with no_autocast(g):
                gd = g.detach().to(dtype)
                Dh = helper.Dh_bar(gd, batch, reduction)
                # E_n[mean_t |Dh_t|] summed over the outputs: one more reduction of g
                per = gd.numel() // Dh.numel()  # batch * |T|
                scale = torch.linalg.vector_norm(gd, 1) * (
                    batch / per if reduction == "mean" else 1.0 / per)
                G = helper.G(gd, batch, reduction) if gram else None
            n0 = rec.grad_batch
            rec.Dh_bar = merge_output_grad(rec.Dh_bar, n0, Dh, batch, reduction)
            rec.Dh_scale = merge_output_grad(rec.Dh_scale, n0, scale, batch, reduction)
            if G is not None:
                rec.G = merge_output_grad(rec.G, n0, G, batch, reduction, gram=True)
            rec.grad_batch = n0 + batch
            self.hook_seconds += time.perf_counter() - t1

        output.register_hook(grad_hook)

    def _kfac_hook(self, layer: KroneckerLayer, rec: LayerRecord) -> _Hook:
        helper = layer.helper
        reduction = self.reduction

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            t0 = time.perf_counter()
            m = self._begin_call(helper, rec, inputs[0], output)
            if not m:
                return None
            dtype = self.dtype_fn(module)
            x = inputs[0]
            with no_autocast(x):  # curvature in float32/64
                rec.A = merge_mean(rec.A, rec.batch - m, helper.A(x.detach().to(dtype)), m)
            dummy = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            rec.dummy = dummy
            out = output + dummy

            def grad_hook(g: Tensor) -> None:
                t1 = time.perf_counter()
                rec.grad_arrived = True
                with no_autocast(g):
                    G = helper.G(g.detach().to(dtype), m, reduction)
                rec.G = merge_output_grad(rec.G, rec.grad_batch, G, m, reduction, gram=True)
                rec.grad_batch += m
                self.hook_seconds += time.perf_counter() - t1

            out.register_hook(grad_hook)
            self.hook_seconds += time.perf_counter() - t0
            return out

        return hook

    def _finish_A_s(self, records: dict[str, LayerRecord], s_A_fn: SAFn, group: Any) -> None:
        """At the end of :meth:`kbfgs_pre`: average ``a_bar`` over ``group``, then
        ``s_A = s_A_fn(layer, record)`` and ``A s_A`` from the kept inputs (or the folded
        ``A``) of every recorded layer; the inputs are dropped."""
        t0 = time.perf_counter()
        done = [ly for ly in self.layers if records[ly.name].a_bar is not None]
        if group is not None and done:
            distributed.all_reduce_flat([records[ly.name].a_bar for ly in done], group)
        for layer in done:
            rec = records[layer.name]
            inputs, rec.inputs = rec.inputs, []
            with autocast_off():  # ``step`` may run inside an autocast region
                rec.s_A = s = s_A_fn(layer, rec)
            if s is None:
                continue
            with autocast_off():
                if rec.A is not None:  # explicit minibatch A (2020 variants)
                    rec.A_s = rec.A @ s
                elif rec.A_fold is not None:
                    rec.A_s = rec.A_fold @ s
                else:
                    dtype, n = self.dtype_fn(layer.module), 0
                    for x in inputs:
                        mx = layer.helper.batch_size(x)
                        rec.A_s = merge_mean(rec.A_s, n, layer.helper.A_s(x.to(dtype), s), mx)
                        n += mx
            rec.A_fold = None
            del inputs
        self.hook_seconds += time.perf_counter() - t0

    def _finish_A(self, records: dict[str, LayerRecord]) -> None:
        """At the end of :meth:`probe` with ``need_A``: ``rec.A`` from the kept inputs (or the
        folded ``A``) of every recorded layer; the inputs are dropped."""
        t0 = time.perf_counter()
        with autocast_off():  # ``step`` may run inside an autocast region
            for layer in self.layers:
                rec = records[layer.name]
                self._fold_inputs(layer.helper, rec, self.dtype_fn(layer.module))
                rec.A, rec.A_fold = rec.A_fold, None
        self.hook_seconds += time.perf_counter() - t0

    def _dummy_scalar(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._dummy:
            self._dummy[key] = torch.zeros((), dtype=like.dtype, device=like.device,
                                           requires_grad=True)
        return self._dummy[key]


def _with_grad_only(hook: _Hook) -> _Hook:
    """``hook`` for the calls whose output requires grad only (others are not recorded)."""

    def guarded(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
        if not (torch.is_grad_enabled() and output.requires_grad):
            return None
        return hook(module, inputs, output)

    return guarded


# ---------------------------------------------------------------------------------------------
# Autocast of a recorded call, replayed for KFAC's sampled-target pass
# ---------------------------------------------------------------------------------------------


def no_autocast(like: Tensor) -> contextlib.AbstractContextManager[None]:
    """Autocast off on ``like``'s device (curvature in float32/64 whatever the autocast state;
    a no-op context when autocast is off)."""
    dev = like.device.type
    try:
        on = torch.is_autocast_enabled(dev)
    except TypeError:  # torch < 2.4
        on = torch.is_autocast_enabled() if dev == "cuda" else torch.is_autocast_cpu_enabled()
    return torch.autocast(dev, enabled=False) if on else contextlib.nullcontext()


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """``torch.compile``-d code runs eagerly inside (``torch.compiler.set_stance("force_eager")``,
    torch >= 2.6): a pass with hooks never meets a compiled graph, so the graphs compiled for
    the steps without hooks stay valid (no recompilation per curvature step)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or torch.compiler.is_compiling():
        yield
        return
    with set_stance("force_eager"):
        yield


@contextlib.contextmanager
def autocast_off() -> Iterator[None]:
    """Autocast off on every device where it is on (the optimizer's own math, when ``step``
    itself is called inside an autocast region, e.g. by a framework); the closure's calls keep
    the caller's autocast state."""
    with contextlib.ExitStack() as stack:
        for dev, _ in _autocast_state():
            stack.enter_context(torch.autocast(dev, enabled=False))
        yield


def _autocast_state() -> list[tuple[str, torch.dtype]]:
    """The autocast settings in force, as ``[(device_type, dtype)]``."""
    state = []
    for dev in ("cuda", "cpu"):
        try:
            on = torch.is_autocast_enabled(dev)
            dtype = torch.get_autocast_dtype(dev)
        except (TypeError, AttributeError):  # torch < 2.4
            if dev == "cuda":
                on, dtype = torch.is_autocast_enabled(), torch.get_autocast_gpu_dtype()
            else:
                on, dtype = torch.is_autocast_cpu_enabled(), torch.get_autocast_cpu_dtype()
        if on:
            state.append((dev, dtype))
    return state


class replay_autocast:
    """Re-enter the autocast settings recorded by :meth:`Capture.model_call`."""

    def __init__(self, state: list[tuple[str, torch.dtype]]) -> None:
        self.ctxs = [torch.autocast(dev, dtype=dt) for dev, dt in state]

    def __enter__(self) -> None:
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc: object) -> None:
        for c in reversed(self.ctxs):
            c.__exit__(*exc)
