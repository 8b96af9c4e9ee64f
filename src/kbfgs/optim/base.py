"""What K-BFGS and KFAC share: Kronecker-layer discovery, the momentum / preconditioned update,
the reliability contract (non-finite skip, exact resume), warm start and diagnostics.

A subclass provides ``_init_layer`` (layer state), ``_precondition`` (P = H_G BUF H_A) and its
own ``step``; this class keeps hooks (through ``kbfgs.capture``), state and I/O at the edges of
the pure math (``kbfgs.linalg``), and times the phases of a step (``PhaseTimer``).
"""

from __future__ import annotations

import contextlib
import warnings
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import distributed
from ..capture import Capture, KroneckerLayer, LayerRecord
from ..distributed import unwrap_model
from ..layers import helper_for, unsupported_reason
from .phases import PhaseTimer
from .validation import check_common, check_int

__all__ = ["KroneckerOptimizer", "aligned_copy", "all_finite", "two_sided_product", "unwrap_model"]


class KroneckerOptimizer(torch.optim.Optimizer):
    """Base class of the Kronecker-factored optimizers (not used directly)."""

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        update_freq: int,
        update_freq_name: str,
        loss_reduction: str,
        check_finite: bool,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        check_common(defaults)
        check_int(update_freq_name, update_freq, 1)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.model = model
        self.update_freq = int(update_freq)
        self.loss_reduction = loss_reduction
        self.check_finite = bool(check_finite)
        inner = unwrap_model(model)
        params = [p for p in _unique_params(inner) if p.requires_grad]
        if not params:
            raise ValueError("model has no trainable parameters")
        super().__init__(params, defaults)
        self.layers: list[KroneckerLayer] = _find_layers(inner)
        #: per-layer state (a dataclass of the subclass), by layer name
        self.layer_state: dict[str, Any] = {}
        self.capture = Capture(self.layers, self._curvature_dtype, loss_reduction, root=inner)
        self.steps = 0  # k of the paper: number of completed steps
        self.warm_started = False
        self.skipped_steps = 0
        self.curvature_updates = 0
        #: ``with self.phases("curvature"): ...`` times a phase of the step (``stats()["time"]``)
        self.phases = PhaseTimer()
        self._warned: set[str] = set()
        self.demoted: list[str] = []
        self._scratch: dict = {}  # preconditioning scratch shared by all layers
        self._kron_params = {id(p) for layer in self.layers for p in layer.helper.params()}

    @property
    def times(self) -> dict[str, float]:
        """Host seconds per phase (the dict ``stats()["time"]`` reports, without ``hooks``)."""
        return self.phases.seconds

    # ------------------------------------------------------------------ helpers
    @staticmethod
    def _curvature_dtype(module: nn.Module) -> torch.dtype:
        """float64 curvature for float64 parameters, float32 otherwise (autocast included)."""
        return torch.float64 if module.weight.dtype == torch.float64 else torch.float32

    def _warn_once(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def _demote(self, names: Iterable[str], why: str, quiet: bool = False) -> None:
        """Turn Kronecker layers into other parameters (e.g. a module used twice in a forward)."""
        names = set(names)
        if not names:
            return
        for layer in [ly for ly in self.layers if ly.name in names]:
            if not quiet:
                warnings.warn(
                    f"{type(self).__name__}: module '{layer.name}' ({type(layer.module).__name__}) "
                    f"{why}; its parameters are updated as other parameters (momentum SGD)",
                    UserWarning, stacklevel=3,
                )
            st = self.layer_state.pop(layer.name, None)
            views = layer.helper.split_matrix(st.buf) if st else None
            for i, p in enumerate(layer.helper.params()):
                self._kron_params.discard(id(p))
                if views is not None and "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = views[i].clone()
            self.demoted.append(layer.name)
        self.layers[:] = [ly for ly in self.layers if ly.name not in names]

    def _check_records(self, records: dict[str, LayerRecord]) -> None:
        self._demote([n for n, r in records.items() if r.calls > 1],
                     "is called more than once in one forward pass")

    @staticmethod
    def _require_closure(closure: Callable | None) -> Callable:
        if closure is None:
            raise RuntimeError(
                "step() requires a closure: closure() must zero the gradients, run the forward "
                "pass, compute the batch-mean loss, call loss.backward() and return the loss; "
                "the optimizer calls it again on the same minibatch for the curvature pass"
            )
        return torch.enable_grad()(closure)

    def _all_finite(self, loss: Any) -> bool:
        """One host sync: is the loss and every gradient finite (the same answer on all ranks)?"""
        with self.phases("check_finite"):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            ok = all_finite(loss, grads)
            dev = grads[0].device if grads else torch.device("cpu")
            # a loss is local to a rank: every rank must take the same skip decision
            return distributed.all_true(ok, distributed.process_group(self.model), dev)

    def _skip_step(self, loss: Any) -> Any:
        self.skipped_steps += 1
        self._warn_once("nonfinite", f"{type(self).__name__}: non-finite loss or gradient at step "
                        f"{self.steps + 1}; the step is skipped and the optimizer state is "
                        "unchanged (counted in stats()['skipped_steps'])")
        return loss

    @contextlib.contextmanager
    def _extra_pass(self) -> Iterator[None]:
        """The extra curvature pass: same random numbers as the first pass, no parameter
        gradients, module buffers restored, no DDP gradient all-reduce."""
        inner = unwrap_model(self.model)
        buffers = [(b, b.clone()) for b in inner.buffers()]
        flags = [(p, p.requires_grad) for p in inner.parameters()]
        no_sync = getattr(self.model, "no_sync", None)
        ctx = no_sync() if callable(no_sync) else contextlib.nullcontext()
        rng_after = _rng_state(self._rng_devices())
        _set_rng_state(self._rng_before)
        try:
            for p, _ in flags:
                p.requires_grad_(False)
            with ctx:
                yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            _set_rng_state(rng_after)

    def _rng_devices(self) -> list[torch.device]:
        devs = {p.device for g in self.param_groups for p in g["params"]}
        return [d for d in devs if d.type == "cuda"]

    def _save_rng(self) -> None:
        self._rng_before = _rng_state(self._rng_devices())

    # ------------------------------------------------------------------ update
    def _take_step(self, pre: dict[str, LayerRecord], k: int) -> None:
        """After an accepted first pass: demote reused modules, initialise layers seen for the
        first time (|T| from the pass), apply the update and count step ``k``."""
        self._check_records(pre)
        for layer in self.layers:
            rec = pre.get(layer.name)
            if layer.name not in self.layer_state and rec is not None and rec.calls == 1:
                self._init_layer(layer, rec.locations)
        self._apply_update()
        self.steps = k

    @torch.no_grad()
    def _apply_update(self) -> None:
        """Momentum on every parameter, P = H_G BUF_W H_A on Kronecker layers, then the step."""
        with self.phases("precondition"):
            self._momentum_and_step()

    def _momentum_and_step(self) -> None:
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        # Every layer's momentum and decay in a few multi-tensor ops (one launch each on a
        # GPU, instead of several per layer); the preconditioning products stay per layer.
        active = []
        for layer in self.layers:
            st = self.layer_state.get(layer.name)
            params = layer.helper.params()
            if st is not None and params[0].grad is not None:
                active.append((layer, st, params))
        if active:
            torch._foreach_mul_([st.buf for _, st, _ in active], mom)
            views, grads = [], []
            for layer, st, params in active:
                for v, p in zip(layer.helper.split_matrix(st.buf), params):
                    if p.grad is not None:
                        views.append(v)
                        grads.append(p.grad)
            torch._foreach_add_(views, grads)
            if wd != 0:  # W - lr (P + wd W) = (1 - lr wd) W - lr P
                torch._foreach_mul_([p for _, _, params in active for p in params],
                                    1.0 - lr * wd)
        for layer, st, params in active:
            P = self._precondition(layer, st)
            for v, p in zip(layer.helper.split_matrix(P), params):
                p.add_(v.to(p.dtype), alpha=-lr)
        others = [p for g in self.param_groups for p in g["params"]
                  if id(p) not in self._kron_params and p.grad is not None]
        if others:
            bufs = []
            for p in others:
                st = self.state[p]
                if "momentum_buffer" not in st:
                    st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                bufs.append(st["momentum_buffer"])
            torch._foreach_mul_(bufs, mom)
            torch._foreach_add_(bufs, [p.grad for p in others])
            if wd != 0:
                steps = torch._foreach_add(bufs, others, alpha=wd)
            else:
                steps = bufs
            torch._foreach_add_(others, steps, alpha=-lr * self._other_lr_scale(group))

    def _other_lr_scale(self, group: dict) -> float:
        return 1.0

    # ------------------------------------------------------------------ warm start
    @torch.no_grad()
    def warm_start(self, inputs: Iterable[Any]) -> None:
        """Initialise H_A = (A_0 + lambda_A I)^-1 from data (Algorithm 2 line 3).

        ``inputs`` is an iterable of input batches: tensors, or tuples/lists whose first element
        is the input (e.g. a DataLoader of ``(x, y)``). A_0 = E_n[sum_t a_t a_t^T] over all samples.
        The model runs in its current mode without gradients; its buffers (BatchNorm running
        statistics) are restored afterwards.
        """
        with self.phases("warm_start"):
            self._warm_start(inputs)
        self.warm_started = True

    def _warm_start(self, inputs: Iterable[Any]) -> None:
        inner = unwrap_model(self.model)
        buffers = [(b, b.clone()) for b in inner.buffers()]
        sums: dict[str, Tensor] = {}
        count: dict[str, int] = defaultdict(int)
        locations: dict[str, int] = {}
        device = next(iter(self.param_groups[0]["params"])).device
        try:
            for batch in inputs:
                x = batch[0] if isinstance(batch, (tuple, list)) else batch
                if not isinstance(x, Tensor):
                    raise TypeError("warm_start expects an iterable of tensors or (input, ...) "
                                    f"tuples, got an element of type {type(x).__name__}")
                with self.capture.warm() as recs:
                    inner(x.to(device))
                self._check_records(recs)
                for name, r in recs.items():
                    if r.A is None:
                        continue
                    sums[name] = r.A if name not in sums else sums[name].add_(r.A)
                    count[name] += r.batch
                    locations[name] = r.locations
        finally:
            for b, saved in buffers:
                b.copy_(saved)
        _reduce_warm_start(self.layers, sums, count, locations, self._curvature_dtype,
                           distributed.process_group(self.model))
        if not sums:
            raise ValueError("warm_start received no input batches (or no Kronecker layer ran)")
        for layer in self.layers:
            if layer.name in sums:
                self._warm_layer(layer, locations[layer.name], sums[layer.name] / count[layer.name])

    def _warm_layer(self, layer: KroneckerLayer, locations: int, A0: Tensor) -> None:
        self._init_layer(layer, locations, A0)

    def _init_layer(self, layer: KroneckerLayer, locations: int, A0: Tensor | None = None) -> Any:
        raise NotImplementedError

    def _precondition(self, layer: KroneckerLayer, st: Any) -> Tensor:
        raise NotImplementedError

    def _layer_state_from_dict(self, d: dict[str, Any], device: torch.device) -> Any:
        """A layer's state from its :meth:`state_dict` form (tensors copied with
        :func:`aligned_copy` onto ``device``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()
        sd["kronecker"] = {
            "steps": self.steps,
            "warm_started": self.warm_started,
            "skipped_steps": self.skipped_steps,
            "curvature_updates": self.curvature_updates,
            "layers": {name: st.to_state_dict() for name, st in self.layer_state.items()},
            "demoted": list(self.demoted),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        extra = sd.pop("kronecker", None)
        if extra is None:
            raise ValueError(f"state_dict was not produced by {type(self).__name__}.state_dict() "
                             "(missing key 'kronecker')")
        self._demote(extra.get("demoted", []), "was demoted in the saved run", quiet=True)
        known = {ly.name for ly in self.layers}
        unknown = set(extra["layers"]) - known
        if unknown:
            raise ValueError(f"state_dict has curvature for layers this model lacks: {sorted(unknown)}")
        super().load_state_dict(sd)
        self.steps = int(extra["steps"])
        self.warm_started = bool(extra["warm_started"])
        self.skipped_steps = int(extra["skipped_steps"])
        self.curvature_updates = int(extra["curvature_updates"])
        self.layer_state = {}
        for layer in self.layers:
            st = extra["layers"].get(layer.name)
            if st is None:
                continue
            self.layer_state[layer.name] = self._layer_state_from_dict(
                st, layer.module.weight.device)

    # ------------------------------------------------------------------ diagnostics
    def stats(self, condition: bool = True) -> dict[str, Any]:
        """Diagnostics: counts, per-layer skipped pairs / Powell theta / condition numbers and the
        host time spent in each part (seconds; on GPU, launch time unless synchronised)."""
        times = dict(self.times)
        times["hooks"] = self.capture.hook_seconds
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "curvature_updates": self.curvature_updates,
            "warm_started": self.warm_started,
            "time": times,
            "layers": {layer.name: self._layer_stats(layer, self.layer_state[layer.name], condition)
                       for layer in self.layers if layer.name in self.layer_state},
        }

    def _layer_stats(self, layer: KroneckerLayer, st: Any, condition: bool) -> dict[str, Any]:
        return {}


_ALIGN_BYTES = 64


def aligned_copy(t: Tensor) -> Tensor:
    """A copy of a 2-D tensor whose rows start on 64-byte boundaries (a padded leading
    dimension). Matrix products on widths like 785 (784 inputs + bias) run about 1.5x faster on
    CPU with aligned rows; other tensors, and matrices narrower than 8 alignment steps (where
    the padding would exceed 12.5% of the memory), are returned as plain copies."""
    if t.dim() != 2 or not t.is_floating_point():
        return t.clone()
    ld = _aligned_ld(t.shape[1], t.dtype)
    if ld == t.shape[1]:  # already aligned, or too narrow for padding to pay
        return t.clone()
    out = torch.zeros(t.shape[0], ld, dtype=t.dtype, device=t.device)[:, :t.shape[1]]
    return out.copy_(t)


def _aligned_ld(cols: int, dtype: torch.dtype) -> int:
    """Padded row length: a multiple of 64 bytes, for rows of at least 8 such steps (narrower
    matrices would pay more than 12.5% memory for little speed)."""
    step = max(1, _ALIGN_BYTES // torch.empty((), dtype=dtype).element_size())
    return -(-cols // step) * step if cols >= 8 * step else cols


def scratch_matrix(pool: dict, slot: str, rows: int, cols: int, like: Tensor) -> Tensor:
    """A ``rows x cols`` view with aligned rows into a flat buffer of ``pool`` that grows to the
    largest size asked for; every layer reuses it (transient results only)."""
    ld = _aligned_ld(cols, like.dtype)
    key = (slot, like.dtype, like.device)
    flat = pool.get(key)
    if flat is None or flat.numel() < rows * ld:
        flat = pool[key] = torch.empty(rows * ld, dtype=like.dtype, device=like.device)
    return flat[: rows * ld].view(rows, ld)[:, :cols]


def two_sided_product(left: Any, X: Tensor, right: Tensor, pool: dict) -> Tensor:
    """``left @ X @ right`` (``left`` a matrix or a callable operator) computed into aligned
    scratch buffers shared by all layers (``pool``, not part of ``state_dict``). The result is
    valid until the next call with the same pool."""
    if X.dtype != right.dtype:
        X = X.to(right.dtype)
    Y = torch.matmul(X, right, out=scratch_matrix(pool, "X", X.shape[0], right.shape[1], right))
    if callable(left) and not isinstance(left, Tensor):
        return left(Y)
    return torch.matmul(left, Y, out=scratch_matrix(pool, "P", left.shape[0], Y.shape[1], Y))


def all_finite(loss: Any, grads: list[Tensor]) -> bool:
    """One host sync: are the loss and every gradient finite?

    A NaN or inf entry makes a tensor's sum non-finite, so one sum per gradient (a single cheap
    pass; an abs-max costs several times more on CPU) decides. A finite gradient whose float32
    sum overflows (entries near 1e38) counts as non-finite too."""
    dev = grads[0].device if grads else torch.device("cpu")
    vals = [g.sum(dtype=torch.float32).reshape(1) for g in grads]
    if isinstance(loss, Tensor):
        vals.append(loss.detach().sum(dtype=torch.float32).reshape(1).to(dev))
    elif loss is not None:
        vals.append(torch.tensor([float(loss)], device=dev))
    return not vals or bool(torch.isfinite(torch.cat(vals)).all())


def _reduce_warm_start(layers: list[KroneckerLayer], sums: dict[str, Tensor],
                       count: dict[str, int], locations: dict[str, int],
                       dtype_fn: Callable[[nn.Module], torch.dtype], group: Any) -> None:
    """Sum the warm-start sums ``sum_n sum_t a_t a_t^T`` and sample counts over ``group``, in
    place (``sums``, ``count``, ``locations`` are updated; one flat all-reduce). A rank without
    data for a layer contributes zeros, so every rank passes the same layout. No-op without a
    group."""
    if group is None:
        return
    header = []
    mats = []
    for layer in layers:
        cols = layer.helper.dims()[1]
        dev = layer.module.weight.device
        present = layer.name in sums
        mats.append(sums[layer.name] if present else
                    torch.zeros(cols, cols, dtype=dtype_fn(layer.module), device=dev))
        header.append(torch.tensor([float(count.get(layer.name, 0)), float(present),
                                    float(locations.get(layer.name, 0))],
                                   dtype=torch.float64, device=dev))
    distributed.all_reduce_flat(header + mats, group, average=False)
    for layer, h, A in zip(layers, header, mats):
        n, ranks, locs = h.tolist()
        if n > 0:
            sums[layer.name] = A
            count[layer.name] = round(n)
            locations[layer.name] = round(locs / ranks)


def _unique_params(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # nn.Module.parameters() already removes duplicates


def _find_layers(model: nn.Module) -> list[KroneckerLayer]:
    """Every Linear/Conv2d with a trainable weight, minus the unsupported ones (warned)."""
    found: list[KroneckerLayer] = []
    owners: dict[int, list[str]] = defaultdict(list)
    for name, module in model.named_modules():
        helper_cls = helper_for(module)
        if helper_cls is None or getattr(module, "weight", None) is None:
            continue
        if not module.weight.requires_grad:
            continue
        reason = unsupported_reason(module)
        if reason is not None:
            warnings.warn(f"module '{name}' ({type(module).__name__}, {reason}) is not supported as "
                          "a Kronecker layer; its parameters are updated as other parameters "
                          "(momentum SGD)", UserWarning, stacklevel=4)
            continue
        helper = helper_cls(module)  # the bias flag is fixed here
        found.append(KroneckerLayer(name or type(module).__name__, helper))
        for p in helper.params():
            owners[id(p)].append(name)
    shared = {n for names in owners.values() if len(names) > 1 for n in names}
    for name in sorted(shared):
        warnings.warn(f"module '{name}' shares a parameter with another layer; its parameters are "
                      "updated as other parameters (momentum SGD)", UserWarning, stacklevel=4)
    return [ly for ly in found if ly.name not in shared]


def _rng_state(cuda_devices: list[torch.device]) -> tuple:
    return (torch.get_rng_state(),
            [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices])


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in cuda:
        torch.cuda.set_rng_state(s, d)
