"""Every hook of the optimizers: per-layer curvature recorded during one pass at a time.

Hooks are registered only for the duration of a recording pass and removed afterwards, so
iterations without a curvature update run with no hook at all. Inside a pass the forward hook
reduces the layer input and output at once and a tensor hook on the output reduces its
gradient; no activation tensor is kept beyond the hook (except the layer input of distributed
K-BFGS until the model's forward pass ends, see :meth:`Capture.kbfgs_pre`).

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
detected. :meth:`Capture.model_call` records the arguments of the model's first call (KFAC
replays them for its sampled-target pass).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from . import distributed
from .layers import KroneckerHelper

__all__ = ["Capture", "KroneckerLayer", "LayerRecord", "reduce_kbfgs_records"]

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

    calls: int = 0
    batch: int = 0
    locations: int = 0
    a_bar: Tensor | None = None
    s_A: Tensor | None = None
    A_s: Tensor | None = None
    A: Tensor | None = None
    h_bar: Tensor | None = None
    Dh_bar: Tensor | None = None
    G: Tensor | None = None
    #: the layer input, kept from the hook until ``A s_A`` is formed (distributed K-BFGS only)
    pending_x: Tensor | None = None
    #: the zero scalar added to the output in a KFAC pass (dropped at the end of the pass)
    dummy: Tensor | None = None


def reduce_kbfgs_records(pre: dict[str, LayerRecord], post: dict[str, LayerRecord],
                         group: Any) -> int:
    """Average the vectors of a K-BFGS curvature update over ``group`` with one flat all-reduce
    (per dtype): ``A s_A``, ``h_bar``, ``Dh_bar`` (and the explicit ``A`` of the 2020 variants)
    of the pass before the step, ``h_bar+``, ``Dh_bar+`` of the extra pass. ``a_bar`` and
    ``s_A`` are already global (:meth:`Capture.kbfgs_pre`). Returns the number of collectives
    (0 without a group)."""
    if group is None:
        return 0
    tensors: list[Tensor | None] = []
    for name, r0 in pre.items():
        tensors += [r0.A_s, r0.h_bar, r0.Dh_bar, r0.A]
        r1 = post.get(name)
        if r1 is not None:
            tensors += [r1.h_bar, r1.Dh_bar]
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
    _dummy: dict = field(default_factory=dict)

    # ------------------------------------------------------------------ the recordings
    def probe(self) -> contextlib.AbstractContextManager[dict[str, LayerRecord]]:
        """Call counts and ``|T|`` only (the first pass of a layer, to initialise its state)."""
        return self._pass(self._counting_hook)

    def warm(self) -> contextlib.AbstractContextManager[dict[str, LayerRecord]]:
        """``rec.A = batch * A``: the sum over the batch of ``sum_t a_t a_t^T`` (no gradients)."""
        return self._pass(self._warm_hook)

    @contextlib.contextmanager
    def kbfgs_pre(self, s_A_fn: SAFn, need_A: bool = False,
                  group: Any = None) -> Iterator[dict[str, LayerRecord]]:
        """K-BFGS's pass before the step: ``a_bar``, ``s_A = s_A_fn(layer, rec)``, ``A s_A``,
        ``h_bar``, ``Dh_bar`` (and the minibatch ``A`` when ``need_A``).

        With a process ``group`` (data-parallel K-BFGS), ``A s_A`` must use the *global*
        ``a_bar`` (averaging local ``A_r H_A a_bar_r`` over ranks is not the global quantity):
        the layer hooks keep a reference to each layer's input (autograd holds it anyway for
        the weight gradient); when ``root``'s forward pass ends, the ``a_bar`` of every layer
        are averaged over ``group`` (one flat all-reduce), then ``s_A`` and ``A s_A`` are formed
        and the references dropped. A layer called outside ``root``'s forward is finished when
        the block ends."""
        defer = group is not None
        records: dict[str, LayerRecord] = {}

        def finish() -> None:
            pending = [layer for layer in self.layers
                       if layer.name in records and records[layer.name].pending_x is not None]
            if pending:
                distributed.all_reduce_flat([records[ly.name].a_bar for ly in pending], group)
                self._finish_A_s(pending, records, s_A_fn)

        with self._pass(lambda layer, rec: self._pre_hook(layer, rec, s_A_fn, need_A, defer)
                        ) as recs:
            records = recs
            handle = None
            if defer:
                if self.root is None:
                    raise RuntimeError("Capture.kbfgs_pre with a process group needs `root`")
                handle = self.root.register_forward_hook(lambda module, args, output: finish())
            try:
                yield recs
                if defer:
                    finish()
            finally:
                if handle is not None:
                    handle.remove()
                for r in recs.values():
                    r.pending_x = None

    def kbfgs_post(self) -> contextlib.AbstractContextManager[dict[str, LayerRecord]]:
        """K-BFGS's extra pass: ``h_bar+``, ``Dh_bar+``. No parameter requires grad there, so a
        layer output that is not part of a graph is made one (plus a shared zero scalar that
        requires grad) for its gradient hook to run."""
        return self._pass(self._post_hook)

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
        """Records the first call of ``root`` in the block: ``call["args"]``, ``["kwargs"]``
        (by reference), ``["autocast"]`` (the autocast settings in force, for
        :func:`replay_autocast`) and ``["output"]`` (``None`` for a tensor output, else the
        output's type name)."""
        if self.root is None:
            raise RuntimeError("Capture.model_call needs `root`")
        call: dict[str, Any] = {}

        def pre_hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if "args" not in call:
                call["args"], call["kwargs"] = args, dict(kwargs)
                call["autocast"] = _autocast_state()

        def hook(module: nn.Module, args: tuple, output: Any) -> None:
            if "output" not in call:
                call["output"] = None if isinstance(output, Tensor) else type(output).__name__

        handles = (self.root.register_forward_pre_hook(pre_hook, with_kwargs=True),
                   self.root.register_forward_hook(hook))
        try:
            yield call
        finally:
            for h in handles:
                h.remove()

    # ------------------------------------------------------------------ the hooks
    @contextlib.contextmanager
    def _pass(self, make_hook: Callable[[KroneckerLayer, LayerRecord], _Hook]
              ) -> Iterator[dict[str, LayerRecord]]:
        records = {layer.name: LayerRecord() for layer in self.layers}
        handles = []
        try:
            for layer in self.layers:
                hook = make_hook(layer, records[layer.name])
                handles.append(layer.module.register_forward_hook(hook))
            yield records
        finally:
            for h in handles:
                h.remove()

    @staticmethod
    def _first_call(helper: KroneckerHelper, rec: LayerRecord, x: Tensor, output: Tensor) -> bool:
        """Count the call; on the first, note ``|T|`` and the batch size."""
        rec.calls += 1
        if rec.calls > 1:  # reuse: reported by the optimizer, nothing recorded
            return False
        rec.locations = helper.locations(output)
        rec.batch = helper.batch_size(x)
        return True

    def _counting_hook(self, layer: KroneckerLayer, rec: LayerRecord) -> _Hook:
        helper = layer.helper

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            self._first_call(helper, rec, inputs[0], output)

        return hook

    def _warm_hook(self, layer: KroneckerLayer, rec: LayerRecord) -> _Hook:
        helper = layer.helper

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            t0 = time.perf_counter()
            if self._first_call(helper, rec, inputs[0], output):
                x = inputs[0].detach().to(self.dtype_fn(module))
                rec.A = helper.A(x) * rec.batch
                self.hook_seconds += time.perf_counter() - t0

        return hook

    def _pre_hook(self, layer: KroneckerLayer, rec: LayerRecord, s_A_fn: SAFn, need_A: bool,
                  defer: bool) -> _Hook:
        helper = layer.helper

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> None:
            t0 = time.perf_counter()
            if not self._first_call(helper, rec, inputs[0], output):
                return
            dtype = self.dtype_fn(module)
            x = inputs[0].detach().to(dtype)
            rec.a_bar = helper.a_bar(x)
            if defer:
                rec.pending_x = inputs[0].detach()
            else:
                rec.s_A = s_A_fn(layer, rec)
                if rec.s_A is not None:
                    rec.A_s = helper.A_s(x, rec.s_A)
            if need_A:
                rec.A = helper.A(x)
            del x
            rec.h_bar = helper.h_bar(output.detach().to(dtype))
            if output.requires_grad:
                self._on_grad(output, rec, helper, dtype)
            self.hook_seconds += time.perf_counter() - t0

        return hook

    def _post_hook(self, layer: KroneckerLayer, rec: LayerRecord) -> _Hook:
        helper = layer.helper

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            t0 = time.perf_counter()
            if not self._first_call(helper, rec, inputs[0], output):
                return None
            dtype = self.dtype_fn(module)
            rec.h_bar = helper.h_bar(output.detach().to(dtype))
            result = None
            if not output.requires_grad and torch.is_grad_enabled():
                # No parameter upstream requires grad in this pass: make the output a node of
                # the graph (not a leaf, so in-place activations after it stay legal).
                output = output + self._dummy_scalar(output)
                result = output
            if output.requires_grad:
                self._on_grad(output, rec, helper, dtype)
            self.hook_seconds += time.perf_counter() - t0
            return result

        return hook

    def _on_grad(self, output: Tensor, rec: LayerRecord, helper: KroneckerHelper,
                 dtype: torch.dtype) -> None:
        """``rec.Dh_bar`` from the output's gradient."""
        batch, reduction = rec.batch, self.reduction

        def grad_hook(g: Tensor) -> None:
            t1 = time.perf_counter()
            rec.Dh_bar = helper.Dh_bar(g.detach().to(dtype), batch, reduction)
            self.hook_seconds += time.perf_counter() - t1

        output.register_hook(grad_hook)

    def _kfac_hook(self, layer: KroneckerLayer, rec: LayerRecord) -> _Hook:
        helper = layer.helper
        reduction = self.reduction

        def hook(module: nn.Module, inputs: tuple, output: Tensor) -> Tensor | None:
            t0 = time.perf_counter()
            if not self._first_call(helper, rec, inputs[0], output):
                return None
            dtype = self.dtype_fn(module)
            x = inputs[0]
            with torch.autocast(x.device.type, enabled=False):  # curvature in float32/64
                rec.A = helper.A(x.detach().to(dtype))
            dummy = torch.zeros((), dtype=output.dtype, device=output.device, requires_grad=True)
            rec.dummy = dummy
            out = output + dummy
            batch = rec.batch

            def grad_hook(g: Tensor) -> None:
                t1 = time.perf_counter()
                with torch.autocast(g.device.type, enabled=False):
                    rec.G = helper.G(g.detach().to(dtype), batch, reduction)
                self.hook_seconds += time.perf_counter() - t1

            out.register_hook(grad_hook)
            self.hook_seconds += time.perf_counter() - t0
            return out

        return hook

    def _finish_A_s(self, layers: list[KroneckerLayer], records: dict[str, LayerRecord],
                    s_A_fn: SAFn) -> None:
        """``s_A = s_A_fn(layer, record)`` and ``A s_A`` for every record holding ``pending_x``
        (then dropped), as the pre hook would have formed them."""
        t0 = time.perf_counter()
        for layer in layers:
            rec = records[layer.name]
            if rec.pending_x is None:
                continue
            x, rec.pending_x = rec.pending_x, None
            rec.s_A = s_A_fn(layer, rec)
            if rec.s_A is not None:
                rec.A_s = layer.helper.A_s(x.to(self.dtype_fn(layer.module)), rec.s_A)
            del x
        self.hook_seconds += time.perf_counter() - t0

    def _dummy_scalar(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._dummy:
            self._dummy[key] = torch.zeros((), dtype=like.dtype, device=like.device,
                                           requires_grad=True)
        return self._dummy[key]


# ---------------------------------------------------------------------------------------------
# Autocast of a recorded call, replayed for KFAC's sampled-target pass
# ---------------------------------------------------------------------------------------------


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
