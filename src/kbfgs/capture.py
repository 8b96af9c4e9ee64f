"""Hook manager: records per-layer curvature vectors during a forward-backward pass.

Hooks are registered only for the duration of a recording pass (``Capture.record``) and
removed afterwards, so iterations without a curvature update run with no hook at all. Inside a
pass the forward hook reduces the layer input and output to vectors at once and a tensor hook on
the output reduces its gradient; no activation tensor is kept beyond the hook.

Modes of a pass:
    ``"pre"``   a_bar, A s_A (s_A = H_A a_bar, from a callback), h_bar, Dh_bar
                (and the explicit minibatch A when ``need_A``)
    ``"post"``  h_bar+, Dh_bar+
    ``"probe"`` only call counts and the number of locations |T| of each layer
    ``"warm"``  the sum over samples of sum_t a_t a_t^T (warm start of H_A), no gradients
Every mode counts calls per module so that a module used twice in one forward is detected.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional

import torch
from torch import Tensor, nn

from .layers import KroneckerHelper

__all__ = ["Capture", "LayerRecord", "KroneckerLayer"]


@dataclass
class KroneckerLayer:
    """A Kronecker layer: its qualified name, module and type helper."""

    name: str
    module: nn.Module
    helper: type[KroneckerHelper]


@dataclass
class LayerRecord:
    """Vectors recorded for one layer in one pass (``None`` where the mode does not record)."""

    calls: int = 0
    batch: int = 0
    locations: int = 0
    a_bar: Optional[Tensor] = None
    s_A: Optional[Tensor] = None
    A_s: Optional[Tensor] = None
    A: Optional[Tensor] = None
    h_bar: Optional[Tensor] = None
    Dh_bar: Optional[Tensor] = None
    #: the layer input, kept from the hook to ``Capture.finish_A_s`` (``defer_A_s`` only)
    pending_x: Optional[Tensor] = None


@dataclass
class Capture:
    """Attaches hooks to the Kronecker layers for one pass at a time."""

    layers: list[KroneckerLayer]
    dtype_fn: Callable[[nn.Module], torch.dtype]
    reduction: str = "mean"
    hook_seconds: float = 0.0
    _dummy: dict = field(default_factory=dict)

    @contextlib.contextmanager
    def record(
        self,
        mode: str,
        s_A_fn: Optional[Callable[[str, LayerRecord], Optional[Tensor]]] = None,
        need_A: bool = False,
        make_output_require_grad: bool = False,
        defer_A_s: bool = False,
    ) -> Iterator[dict[str, LayerRecord]]:
        """Register hooks for one pass; yields ``{layer name: LayerRecord}`` filled by the pass.

        ``defer_A_s`` (distributed K-BFGS): the ``"pre"`` hook keeps a reference to the layer
        input in ``pending_x`` instead of forming ``s_A`` and ``A s_A``; ``finish_A_s`` forms
        them later (after ``a_bar`` was averaged across ranks) and drops the reference."""
        records = {layer.name: LayerRecord() for layer in self.layers}
        handles = []
        try:
            for layer in self.layers:
                hook = self._forward_hook(layer, records[layer.name], mode, s_A_fn, need_A,
                                          make_output_require_grad, defer_A_s)
                handles.append(layer.module.register_forward_hook(hook))
            yield records
        finally:
            for h in handles:
                h.remove()

    def finish_A_s(self, records: dict[str, LayerRecord],
                   s_A_fn: Callable[[str, LayerRecord], Optional[Tensor]]) -> None:
        """``s_A = s_A_fn(name, record)`` and ``A s_A`` for every record holding ``pending_x``
        (then dropped), as the ``"pre"`` hook would have formed them."""
        t0 = time.perf_counter()
        for layer in self.layers:
            rec = records.get(layer.name)
            if rec is None or rec.pending_x is None:
                continue
            x, rec.pending_x = rec.pending_x, None
            rec.s_A = s_A_fn(layer.name, rec)
            if rec.s_A is not None:
                rec.A_s = layer.helper.A_s(layer.module, x.to(self.dtype_fn(layer.module)),
                                           rec.s_A)
            del x
        self.hook_seconds += time.perf_counter() - t0

    def _forward_hook(self, layer: KroneckerLayer, rec: LayerRecord, mode: str,
                      s_A_fn, need_A: bool, make_output_require_grad: bool,
                      defer_A_s: bool = False):
        helper = layer.helper
        reduction = self.reduction

        def hook(module: nn.Module, inputs: tuple, output: Tensor):
            t0 = time.perf_counter()
            rec.calls += 1
            if rec.calls > 1:  # reuse: reported by the optimizer, nothing recorded
                return None
            rec.locations = helper.locations(module, output)
            x = inputs[0]
            rec.batch = helper.batch_size(x)
            if mode == "probe":
                return None
            dtype = self.dtype_fn(module)
            x = x.detach().to(dtype)
            if mode == "warm":
                rec.A = helper.A(module, x) * rec.batch
                self.hook_seconds += time.perf_counter() - t0
                return None
            if mode == "pre":
                rec.a_bar = helper.a_bar(module, x)
                if defer_A_s and s_A_fn is not None:
                    rec.pending_x = inputs[0].detach()
                elif s_A_fn is not None:
                    rec.s_A = s_A_fn(layer.name, rec)
                    if rec.s_A is not None:
                        rec.A_s = helper.A_s(module, x, rec.s_A)
                if need_A:
                    rec.A = helper.A(module, x)
            del x
            rec.h_bar = helper.h_bar(output.detach().to(dtype))
            result = None
            if make_output_require_grad and not output.requires_grad and torch.is_grad_enabled():
                # No parameter upstream requires grad in this pass: make the output a node of
                # the graph (not a leaf, so in-place activations after it stay legal).
                dummy = self._dummy_scalar(output)
                output = output + dummy
                result = output
            if output.requires_grad:
                batch = rec.batch

                def grad_hook(g: Tensor) -> None:
                    t1 = time.perf_counter()
                    rec.Dh_bar = helper.Dh_bar(g.detach().to(dtype), batch, reduction)
                    self.hook_seconds += time.perf_counter() - t1

                output.register_hook(grad_hook)
            self.hook_seconds += time.perf_counter() - t0
            return result

        return hook

    def _dummy_scalar(self, like: Tensor) -> Tensor:
        key = (like.device, like.dtype)
        if key not in self._dummy:
            self._dummy[key] = torch.zeros((), dtype=like.dtype, device=like.device,
                                           requires_grad=True)
        return self._dummy[key]
