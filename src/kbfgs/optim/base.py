"""What K-BFGS and KFAC share: Kronecker-layer discovery, the momentum / preconditioned update,
the reliability contract (non-finite skip, exact resume), warm start and diagnostics.

A subclass provides ``_init_layer`` (layer state), ``_precondition`` (P = H_G BUF H_A) and its
own ``step``; this class keeps hooks (through ``kbfgs.capture``), state and I/O at the edges of
the pure math (``kbfgs.linalg``), and times the phases of a step (``PhaseTimer``).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
from torch import Tensor, nn

from .. import distributed
from ..capture import Capture, KroneckerLayer, LayerRecord, autocast_off
from ..distributed import unwrap_model
from ..layers import bind_helper, helper_for, unsupported_reason
from .phases import PhaseTimer
from .validation import check_common, check_int, check_param_groups

__all__ = ["DEFAULT_MAX_FACTOR_DIM", "KroneckerOptimizer", "aligned_copy", "all_finite",
           "check_finite_statistics", "momentum_buffers", "two_sided_product", "unwrap_model",
           "warm_start_input"]

#: default size guard: a layer whose dense curvature factor (H_A; H_G, or KFAC's Omega / Gamma)
#: would have more rows than this is updated as other parameters (a float32 8192 x 8192 matrix
#: is 256 MiB; the paper's largest factor, VGG16's 3x3 convolutions on 512 channels, is 4609)
DEFAULT_MAX_FACTOR_DIM = 8192


class KroneckerOptimizer(torch.optim.Optimizer):
    """Base class of the Kronecker-factored optimizers (not used directly)."""

    #: the kind saved in ``state_dict()["kronecker"]["optimizer"]`` (checked on load)
    _kind = "KroneckerOptimizer"

    def __init__(
        self,
        model: nn.Module,
        defaults: dict[str, Any],
        *,
        update_freq: int,
        update_freq_name: str,
        loss_reduction: str,
        check_finite: bool,
        skip_layers: Iterable[str | type] | None = None,
        max_factor_dim: int | None = DEFAULT_MAX_FACTOR_DIM,
        grad_scaler: Any = None,
    ) -> None:
        if grad_scaler is not None and not all(
                callable(getattr(grad_scaler, a, None)) for a in ("scale", "unscale_", "update")):
            raise TypeError("grad_scaler must be a torch.amp.GradScaler (an object with scale, "
                            f"unscale_ and update), got {type(grad_scaler).__name__}")
        #: the ``torch.amp.GradScaler`` of fp16 training (docs/api.md, "Mixed precision")
        self.grad_scaler = grad_scaler
        if not isinstance(model, nn.Module):
            raise TypeError(not_a_module_message(type(self).__name__, model))
        check_common(defaults)
        check_int(update_freq_name, update_freq, 1)
        check_int("max_factor_dim", max_factor_dim, 1, allow_none=True)
        if loss_reduction not in ("mean", "sum"):
            raise ValueError(f"loss_reduction must be 'mean' or 'sum', got {loss_reduction!r}")
        self.model = model
        self.update_freq = int(update_freq)
        self.loss_reduction = loss_reduction
        self.check_finite = bool(check_finite)
        self.max_factor_dim = None if max_factor_dim is None else int(max_factor_dim)
        inner = unwrap_model(model)
        # every parameter, frozen ones included: one unfrozen later is trained from the step
        # where it first has a gradient (a frozen one never has one and costs nothing)
        params = _unique_params(inner)
        if not any(p.requires_grad for p in params):
            raise ValueError("model has no trainable parameters")
        super().__init__(params, defaults)
        self._warned: set[str] = set()
        self.demoted: list[str] = []
        skip = skip_rule(inner, skip_layers)
        #: layer names in the model's module order (Kronecker layers stay in this order)
        self._order = {name or type(m).__name__: i for i, (name, m) in
                       enumerate(inner.named_modules())}
        found, self._dormant = _find_layers(inner, skip)
        self.layers: list[KroneckerLayer] = self._size_guard(found)
        #: per-layer state (a dataclass of the subclass), by layer name
        self.layer_state: dict[str, Any] = {}
        self.capture = Capture(self.layers, self._curvature_dtype, loss_reduction, root=inner)
        self.steps = 0  # k of the paper: number of completed steps
        self.warm_started = False
        self.skipped_steps = 0
        self.curvature_updates = 0
        #: ``with self.phases("curvature"): ...`` times a phase of the step (``stats()["time"]``)
        self.phases = PhaseTimer()
        self._scratch: dict = {}  # preconditioning scratch shared by all layers
        self._kron_params = {id(p) for layer in self.layers for p in layer.helper.params()}
        #: layers promoted from ``_dormant`` whose momentum buffers move into ``buf`` at init
        self._adopt: set[str] = set()
        self._in_extra_pass = False

    @property
    def in_extra_pass(self) -> bool:
        """True only while the optimizer runs the closure for its extra curvature pass (K-BFGS:
        the second call of the closure on a curvature step, at the updated parameters, without
        parameter gradients). Use it in the closure to log metrics once per step. KFAC's factor
        pass calls the model, not the closure, so for KFAC it is False whenever the closure
        runs. Read-only."""
        return self._in_extra_pass

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
            self._adopt.discard(layer.name)
        self.layers[:] = [ly for ly in self.layers if ly.name not in names]

    def _check_records(self, records: dict[str, LayerRecord]) -> None:
        self._demote([n for n, r in records.items() if r.calls > 1],
                     "is called more than once in one forward pass")

    def _demote_uncalled(self, records: dict[str, LayerRecord]) -> None:
        """A parameter with a gradient is always updated: a Kronecker layer recorded in this
        pass whose forward did not run (``calls == 0``) while one of its parameters has a
        gradient (its weight is used functionally, e.g. ``nn.MultiheadAttention``'s
        ``out_proj`` through ``F.multi_head_attention_forward``) becomes an other parameter
        from this step on (Python checks only: no host sync)."""
        if not records:  # a step without a recording: nothing to check
            return
        names = []
        for layer in self.layers:
            rec = records.get(layer.name)
            if rec is not None and rec.calls == 0 and any(
                    p.grad is not None for p in layer.helper.params()):
                names.append(layer.name)
        self._demote(names, "has a gradient but its forward was not called (its weight is "
                     "used by another module's forward, as nn.MultiheadAttention does with "
                     "out_proj)")

    def _discover(self) -> None:
        """Layers frozen at construction whose weight now has a gradient (unfrozen, e.g. for
        fine-tuning) become Kronecker layers: this step they are updated as other parameters
        (their ``|T|`` is not known yet), from their next recorded pass on with curvature,
        their momentum carried over. A Python check of ``.grad`` per dormant layer."""
        ready = [(n, m) for n, m in self._dormant if m.weight.grad is not None]
        if not ready:
            return
        self._dormant = [(n, m) for n, m in self._dormant if m.weight.grad is None]
        new = [KroneckerLayer(n, bind_helper(m)) for n, m in ready]
        new = self._size_guard(new, stacklevel=5)
        self.layers.extend(new)  # in place: the capture holds this list
        self.layers.sort(key=lambda ly: self._order.get(ly.name, -1))
        for layer in new:
            self._kron_params.update(id(p) for p in layer.helper.params())
            self._adopt.add(layer.name)

    def _adopt_momentum(self) -> None:
        """Move the momentum buffers that promoted layers gathered as other parameters into
        their ``BUF`` once they have state."""
        for layer in [ly for ly in self.layers if ly.name in self._adopt]:
            st = self.layer_state.get(layer.name)
            if st is None:
                continue
            self._adopt.discard(layer.name)
            for v, p in zip(layer.helper.split_matrix(st.buf), layer.helper.params()):
                state = self.state.get(p)
                if state is not None and "momentum_buffer" in state:
                    v.copy_(state.pop("momentum_buffer"))
                    if not state:
                        del self.state[p]

    # ------------------------------------------------------------------ size guard
    def _factor_dims(self, rows: int, cols: int) -> tuple[int, ...]:
        """Sizes of the dense square curvature matrices of a ``rows x cols`` layer (the size
        guard compares them with ``max_factor_dim``)."""
        return (cols, rows)

    def _curvature_bytes(self, rows: int, cols: int, itemsize: int) -> int:
        """Bytes of a layer's curvature state (the momentum ``BUF`` not included)."""
        return sum(d * d for d in self._factor_dims(rows, cols)) * itemsize

    def _size_guard(self, layers: list[KroneckerLayer], stacklevel: int = 4
                    ) -> list[KroneckerLayer]:
        """The layers whose curvature factors have at most ``max_factor_dim`` rows; the others
        are left to the other parameters with a warning stating the memory they would need."""
        if self.max_factor_dim is None:
            return layers
        kept = []
        for layer in layers:
            rows, cols = layer.helper.dims()
            dims = self._factor_dims(rows, cols)
            if max(dims) <= self.max_factor_dim:
                kept.append(layer)
                continue
            itemsize = torch.empty((), dtype=self._curvature_dtype(layer.module)).element_size()
            need = self._curvature_bytes(rows, cols, itemsize)
            warnings.warn(
                f"{type(self).__name__}: module '{layer.name}' ({type(layer.module).__name__}) "
                f"would need {need} bytes ({format_bytes(need)}) of curvature state (factors "
                f"{', '.join(f'{d} x {d}' for d in dims)}), above max_factor_dim="
                f"{self.max_factor_dim}; its parameters are updated as other parameters "
                "(momentum SGD). Pass max_factor_dim=None (or larger) to precondition it, or "
                "name it in skip_layers to silence this", UserWarning, stacklevel=stacklevel)
        return kept

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused after construction (as ``torch.optim.LBFGS`` does): the optimizer trains every
        parameter of the model it was given with the hyper-parameters of ``param_groups[0]``,
        parameters unfrozen later included."""
        if getattr(self, "param_groups", None):  # Optimizer.__init__ adds the first group
            raise ValueError(
                f"{type(self).__name__} doesn't support per-parameter options (parameter "
                "groups): it trains every parameter of the model given at construction with "
                "param_groups[0]'s hyper-parameters, including parameters unfrozen later (set "
                "requires_grad=True; no add_param_group needed). Train parameters outside the "
                "model with a separate optimizer")
        super().add_param_group(param_group)

    def _require_closure(self, closure: Callable | None) -> Callable:
        """The closure, run with gradients enabled; first checks the hyper-parameters of
        ``param_groups`` (a bad value set after construction is refused before anything
        changes)."""
        if closure is None:
            raise RuntimeError(
                f"{type(self).__name__}.step() requires a closure: closure() must zero the "
                "gradients, run the forward pass, compute the batch-mean loss, call "
                "loss.backward() and return the loss; the optimizer runs its curvature pass "
                "on the same minibatch itself. Training loops that call step() without a "
                "closure (the Hugging Face Trainer, GradScaler.step, Lightning with "
                "precision='16-mixed') are not supported: see 'Using kbfgs in your training "
                "code' in docs/api.md"
            )
        check_param_groups(self.param_groups)
        return torch.enable_grad()(closure)

    def _all_finite(self, loss: Any) -> bool:
        """One host sync: is the loss and every gradient finite (the same answer on all ranks)?"""
        with self.phases("check_finite"):
            grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
            ok = all_finite(loss, grads)
            dev = grads[0].device if grads else torch.device("cpu")
            # a loss is local to a rank: every rank must take the same skip decision
            return distributed.all_true(ok, distributed.process_group(self.model), dev)

    def _scaler(self) -> Any:
        """The grad scaler when one is given and enabled, else ``None``."""
        s = self.grad_scaler
        return s if s is not None and s.is_enabled() else None

    def _accept(self, loss: Any) -> bool:
        """After the closure's first call: unscale the gradients (``grad_scaler``), then the
        non-finite check (always with a scaler: an overflow skips the step)."""
        scaler = self._scaler()
        if scaler is not None:
            scaler.unscale_(self)
        return not ((self.check_finite or scaler is not None) and not self._all_finite(loss))

    def _inv_scale(self, dtype: torch.dtype) -> Tensor | None:
        """``1 / scale`` of the grad scaler as a tensor (no host sync), ``None`` without one.
        The loss scale of this step: ``update()`` runs at the end of ``step``."""
        scaler = self._scaler()
        if scaler is None:
            return None
        scale = scaler._get_scale_async() if hasattr(scaler, "_get_scale_async") else \
            torch.tensor(scaler.get_scale())
        return scale.to(torch.float64).reciprocal().to(dtype)

    def _scaler_update(self) -> None:
        """``grad_scaler.update()``, once at the end of every ``step`` (taken or skipped): the
        optimizer calls it, the training loop must not."""
        scaler = self._scaler()
        if scaler is not None:
            scaler.update()

    def _skip_step(self, loss: Any) -> Any:
        self._scaler_update()
        self.skipped_steps += 1
        self._warn_once("nonfinite", f"{type(self).__name__}: non-finite loss or gradient at step "
                        f"{self.steps + 1}; the step is skipped and the optimizer state is "
                        "unchanged (counted in stats()['skipped_steps'])")
        return loss

    @contextlib.contextmanager
    def _extra_pass(self, runs_closure: bool = False) -> Iterator[None]:
        """The extra curvature pass: same random numbers as the first pass, no parameter
        gradients, module buffers restored, no DDP gradient all-reduce; ``in_extra_pass`` is
        True inside when the pass ``runs_closure`` (K-BFGS; KFAC calls the model)."""
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
            self._in_extra_pass = runs_closure
            with ctx:
                yield
        finally:
            self._in_extra_pass = False
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
        self._demote_uncalled(pre)
        if self._dormant:
            self._discover()
        for layer in self.layers:
            rec = pre.get(layer.name)
            if layer.name not in self.layer_state and rec is not None and rec.calls == 1:
                self._init_layer(layer, rec.locations)
        if self._adopt:
            self._adopt_momentum()
        self._apply_update()
        self.steps = k

    @torch.no_grad()
    def _apply_update(self) -> None:
        """Momentum on every parameter, P = H_G BUF_W H_A on Kronecker layers, then the step."""
        with self.phases("precondition"), autocast_off():
            self._momentum_and_step()

    def _momentum_and_step(self) -> None:
        group = self.param_groups[0]
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        # Every layer's momentum and decay in a few multi-tensor ops (one launch each on a
        # GPU, instead of several per layer); the preconditioning products stay per layer.
        active = []
        loose = []  # parameters of Kronecker layers not preconditioned this step: momentum SGD
        for layer in self.layers:
            st = self.layer_state.get(layer.name)
            params = layer.helper.params()
            if st is not None and params[0].grad is not None:
                active.append((layer, st, params))
            else:  # no state yet (a layer just unfrozen), or a frozen weight with a live bias
                loose += [p for p in params if p.grad is not None]
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
                  if id(p) not in self._kron_params and p.grad is not None] + loose
        if others:
            self._update_others(others, group)

    def _update_others(self, others: list[Tensor], group: dict[str, Any]) -> None:
        """The other parameters (not preconditioned this step): momentum SGD,
        ``buf = momentum buf + g``, ``p -= lr * scale * (buf + wd p)``."""
        lr, mom, wd = group["lr"], group["momentum"], group["weight_decay"]
        bufs = momentum_buffers(self.state, others)
        torch._foreach_mul_(bufs, mom)
        torch._foreach_add_(bufs, [cast(Tensor, p.grad) for p in others])  # all have one
        steps = torch._foreach_add(bufs, others, alpha=wd) if wd != 0 else bufs
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
            for i, batch in enumerate(inputs):
                x = warm_start_input(batch, i)
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
        reduce_warm_start(self.layers, sums, count, locations, self._curvature_dtype,
                          distributed.process_group(self.model))
        if not sums:
            raise ValueError("warm_start received no input batches (or no Kronecker layer ran)")
        A0 = {name: A / count[name] for name, A in sums.items()}
        check_finite_statistics(A0, "A_0")  # before any layer changes
        for layer in self.layers:
            if layer.name in A0:
                self._warm_layer(layer, locations[layer.name], A0[layer.name])

    def _warm_layer(self, layer: KroneckerLayer, locations: int, A0: Tensor) -> None:
        self._init_layer(layer, locations, A0)

    def _init_layer(self, layer: KroneckerLayer, locations: int, A0: Tensor | None = None) -> Any:
        raise NotImplementedError

    def _precondition(self, layer: KroneckerLayer, st: Any) -> Tensor:
        raise NotImplementedError

    def _layer_state_from_dict(self, d: dict[str, Any], layer: KroneckerLayer) -> Any:
        """A layer's state from its :meth:`state_dict` form, validated (keys, shapes) and cast
        to this layer's device and dtypes (tensors copied with :func:`aligned_copy`)."""
        raise NotImplementedError

    def _layer_load_args(self, layer: KroneckerLayer) -> dict[str, Any]:
        """The keyword arguments of the layer-state ``from_state_dict`` for ``layer``."""
        rows, cols = layer.helper.dims()
        return {"layer": layer.name, "rows": rows, "cols": cols,
                "dtype": self._curvature_dtype(layer.module),
                "param_dtype": layer.module.weight.dtype}

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
            "optimizer": self._kind,
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`. Everything is validated before anything changes: the
        optimizer kind (K-BFGS / KFAC, dense / L-BFGS), the layer names, every key and shape of
        each layer's state; a mismatch is a ValueError naming it. Floating-point state is cast
        to this model's dtypes (as ``torch.optim`` does): curvature to the curvature dtype,
        momentum to the parameters' dtype."""
        if not isinstance(state_dict, dict):
            raise TypeError(f"state_dict must be a dict, got {type(state_dict).__name__}")
        sd = dict(state_dict)
        extra = sd.pop("kronecker", None)
        me = type(self).__name__
        if not isinstance(extra, dict):
            raise ValueError(f"state_dict was not produced by {me}.state_dict() "
                             "(missing key 'kronecker')")
        missing = [k for k in _SAVED_KEYS if k not in extra]
        if missing:
            raise ValueError(f"state_dict['kronecker'] lacks the keys {missing} "
                             f"(not produced by {me}.state_dict())")
        self._check_saved_kind(extra)
        saved = extra["layers"]
        demoted = set(extra.get("demoted", []))
        # the Kronecker layers after loading (demoted ones out, saved dormant ones woken)
        layers = {ly.name: ly for ly in self.layers if ly.name not in demoted}
        for n, m in self._dormant:
            if n in saved and n not in layers:
                layers[n] = KroneckerLayer(n, bind_helper(m))
        unknown = set(saved) - set(layers)
        if unknown:
            raise ValueError(f"state_dict has curvature for layers this model lacks: "
                             f"{sorted(unknown)} (this model's Kronecker layers: "
                             f"{sorted(layers)})")
        loaded = {name: self._layer_state_from_dict(d, layers[name]) for name, d in saved.items()}
        super().load_state_dict(sd)  # checks the parameter groups before changing anything
        for name in demoted:
            self.layer_state.pop(name, None)
        self._demote(demoted, "was demoted in the saved run", quiet=True)
        self._promote_saved(saved)
        self.steps = int(extra["steps"])
        self.warm_started = bool(extra["warm_started"])
        self.skipped_steps = int(extra["skipped_steps"])
        self.curvature_updates = int(extra["curvature_updates"])
        self.layer_state = loaded

    def _check_saved_kind(self, extra: dict[str, Any]) -> None:
        """Refuse the state of another kind of optimizer (ValueError naming both)."""
        saved = saved_kind(extra)
        if saved != self._kind:
            raise ValueError(f"state_dict was saved by {saved}, not by {self._kind}: load it "
                             f"into a {saved} optimizer")

    def _promote_saved(self, saved: dict[str, Any]) -> None:
        """Layers frozen here but with curvature in the saved run (unfrozen there) become
        Kronecker layers again, so that a resumed fine-tuning run continues exactly."""
        wake = [(n, m) for n, m in self._dormant if n in saved]
        if not wake:
            return
        self._dormant = [(n, m) for n, m in self._dormant if n not in saved]
        for n, m in wake:
            layer = KroneckerLayer(n, bind_helper(m))
            self.layers.append(layer)
            self._kron_params.update(id(p) for p in layer.helper.params())
        self.layers.sort(key=lambda ly: self._order.get(ly.name, -1))

    # ------------------------------------------------------------------ diagnostics
    def memory_usage(self) -> dict[str, Any]:
        """Bytes of optimizer state by part (tensor storages, each counted once, row padding
        included): ``"curvature"`` (every Kronecker layer's H_A, H_G / L-BFGS pairs, or KFAC's
        Omega, Gamma and their inverses), ``"momentum"`` (the momentum buffers: ``BUF`` of the
        Kronecker layers and those of the other parameters), ``"scratch"`` (work space of the
        preconditioning, shared by all layers), ``"total"``, and ``"layers"``:
        ``{name: bytes of that layer's state, BUF included}``."""
        seen: set[int] = set()
        layers: dict[str, int] = {}
        curvature = momentum = 0
        for name, st in self.layer_state.items():
            buf = tensor_bytes([st.buf], seen)
            rest = tensor_bytes([v for k, v in vars(st).items() if k != "buf"], seen)
            layers[name] = buf + rest
            momentum += buf
            curvature += rest
        momentum += tensor_bytes([v for st in self.state.values() for v in st.values()], seen)
        scratch = tensor_bytes(list(self._scratch.values()), seen)
        return {"curvature": curvature, "momentum": momentum, "scratch": scratch,
                "total": curvature + momentum + scratch, "layers": layers}

    def stats(self, condition: bool = True) -> dict[str, Any]:
        """Diagnostics: counts, per-layer skipped pairs / Powell theta / condition numbers, the
        host time spent in each part (seconds; on GPU, launch time unless synchronised) and
        ``memory_bytes``, the bytes of optimizer state (``memory_usage()["total"]``)."""
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
            "memory_bytes": self.memory_usage()["total"],
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


def momentum_buffers(state: Any, params: list[Tensor]) -> list[Tensor]:
    """The ``"momentum_buffer"`` of each parameter in ``state`` (an optimizer's per-parameter
    state), created as zeros (the parameter's memory format) where missing."""
    bufs = []
    for p in params:
        st = state[p]
        if "momentum_buffer" not in st:
            st["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        bufs.append(st["momentum_buffer"])
    return bufs


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


_SAVED_KEYS = ("steps", "warm_started", "skipped_steps", "curvature_updates", "layers")


def saved_kind(extra: dict[str, Any]) -> str:
    """``"KBFGS"`` or ``"KFAC"``: the optimizer that saved ``state_dict()["kronecker"]`` (from its
    ``optimizer`` key, or for older saves from KFAC's ``kfac`` key and the layer-state keys)."""
    kind = extra.get("optimizer")
    if isinstance(kind, str):
        return kind
    layers = extra.get("layers")
    if "kfac" in extra or (isinstance(layers, dict) and any(
            isinstance(st, dict) and "Omega" in st for st in layers.values())):
        return "KFAC"
    return "KBFGS"


def layer_fields_from_dict(cls: type, d: Any, *, layer: str, shapes: dict[str, tuple],
                           device: torch.device, dtype: torch.dtype | None = None,
                           param_dtype: torch.dtype | None = None,
                           transient: Iterable[str] = ()) -> dict[str, Any]:
    """The constructor arguments of the per-layer state dataclass ``cls`` from its saved form
    ``d``, validated: no unknown key, every field without a default present, every tensor of
    the shape in ``shapes`` (``None`` entries match any size). Tensors are copied onto
    ``device`` with aligned rows; floating ones cast to ``dtype`` (``buf``: ``param_dtype``) when
    given. A mismatch is a ValueError naming the layer and the key."""
    what = f"the saved state of layer '{layer}'"
    if not isinstance(d, dict):
        raise ValueError(f"{what} is not a dict (got {type(d).__name__})")
    names = {f.name: f for f in dataclasses.fields(cls) if f.name not in set(transient)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ValueError(f"{what} has keys a {cls.__name__} does not have: {unknown}")
    missing = [n for n, f in names.items() if n not in d and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ValueError(f"{what} lacks the keys {missing} of a {cls.__name__}")
    out: dict[str, Any] = {}
    for k, v in d.items():
        if not isinstance(v, Tensor):
            out[k] = copy.deepcopy(v)
            continue
        want = shapes.get(k)
        if want is not None and (v.dim() != len(want) or any(
                w is not None and w != n for w, n in zip(want, v.shape))):
            shown = tuple("*" if w is None else w for w in want)
            raise ValueError(f"{what}: '{k}' has shape {tuple(v.shape)}, this model needs "
                             f"{shown}")
        t = v.detach().to(device)
        cast = param_dtype if k == "buf" else dtype
        if cast is not None and t.is_floating_point():
            t = t.to(cast)
        out[k] = aligned_copy(t)
    return out


def warm_start_input(batch: Any, index: int) -> Tensor:
    """The input tensor of warm-start batch ``index`` (a tensor, or the first element of a
    tuple/list); refuses non-tensors, empty batches and non-finite values (one host sync per
    batch) with a ValueError naming the batch."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, Tensor):
        raise TypeError("warm_start expects an iterable of tensors or (input, ...) "
                        f"tuples, got an element of type {type(x).__name__}")
    if x.dim() > 0 and x.shape[0] == 0:
        raise ValueError(f"warm_start: batch {index} is empty (input of shape {tuple(x.shape)}); "
                         "every batch needs at least one sample")
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(f"warm_start: batch {index} contains non-finite values (NaN or Inf); "
                         "the optimizer state is unchanged")
    return x


def check_finite_statistics(stats: dict[str, Tensor], what: str) -> None:
    """A ValueError naming the layers whose warm-start statistics are not finite (one host
    sync)."""
    if not stats:
        return
    names = list(stats)
    ok = torch.stack([torch.isfinite(t).all().to(device=stats[names[0]].device)
                      for t in stats.values()]).tolist()
    bad = [n for n, good in zip(names, ok) if not good]
    if bad:
        raise ValueError(f"warm_start: non-finite {what} (NaN or Inf) for layers {bad}: check "
                         "the inputs and the model output; the optimizer state is unchanged")


def reduce_warm_start(layers: list[KroneckerLayer], sums: dict[str, Tensor],
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
        dev = layer.helper.weight.device
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


def _find_layers(model: nn.Module, skip: Callable[[str, nn.Module], bool]
                 ) -> tuple[list[KroneckerLayer], list[tuple[str, nn.Module]]]:
    """Every supported Linear/Conv2d not ``skip``-ped: with a trainable weight a Kronecker layer,
    with a frozen weight a dormant ``(name, module)`` (promoted when its weight first has a
    gradient). Unsupported modules and modules sharing a parameter with another module (weight
    tying, e.g. an output Linear tied to an nn.Embedding) are left to the other parameters,
    with a warning when they are trainable."""
    owners: dict[int, list[str]] = defaultdict(list)  # id(parameter) -> modules holding it
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners[id(p)].append(name or type(module).__name__)
    found: list[KroneckerLayer] = []
    dormant: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        helper_cls = helper_for(module)
        if helper_cls is None or getattr(module, "weight", None) is None:
            continue
        label = name or type(module).__name__
        if skip(name, module):
            continue
        trainable = any(p.requires_grad for p in module.parameters(recurse=False))
        reason = unsupported_reason(module)
        if reason is not None:
            if module.weight.requires_grad:
                warnings.warn(f"module '{label}' ({type(module).__name__}, {reason}) is not "
                              "supported as a Kronecker layer; its parameters are updated as "
                              "other parameters (momentum SGD)", UserWarning, stacklevel=4)
            continue
        others = sorted({o for p in module.parameters(recurse=False) for o in owners[id(p)]}
                        - {label})
        if others:
            if trainable:
                warnings.warn(f"module '{label}' ({type(module).__name__}) shares a parameter "
                              f"with module '{others[0]}' (weight tying); its parameters are "
                              "updated as other parameters (momentum SGD)",
                              UserWarning, stacklevel=4)
            continue
        if module.weight.requires_grad:
            found.append(KroneckerLayer(label, helper_cls(module)))  # the bias flag fixed here
        else:
            dormant.append((label, module))
    return found, dormant


def skip_rule(model: nn.Module, skip_layers: Iterable[str | type] | str | type | None
              ) -> Callable[[str, nn.Module], bool]:
    """``skip_layers`` as a predicate ``(name, module) -> bool``: a name skips that module and
    every module below it (``"features"`` skips ``"features.0"``), a type every instance of
    it. A name that is not a module of ``model`` or an entry that is neither a str nor an
    ``nn.Module`` subclass is a ValueError naming ``skip_layers``."""
    if skip_layers is None:
        return lambda name, module: False
    items = [skip_layers] if isinstance(skip_layers, (str, type)) else skip_layers
    try:
        items = list(items)
    except TypeError:
        raise ValueError("skip_layers must be a list of module names (str) and/or module types "
                         f"(nn.Module subclasses), got {skip_layers!r}") from None
    names: list[str] = []
    types: list[type] = []
    for item in items:
        if isinstance(item, str):
            names.append(item)
        elif isinstance(item, type) and issubclass(item, nn.Module):
            types.append(item)
        else:
            raise ValueError("skip_layers takes module names (str) and module types (nn.Module "
                             f"subclasses), got {item!r}")
    known = {name for name, _ in model.named_modules()}
    for n in names:
        if n not in known:
            example = next((k for k in known if k), "")
            raise ValueError(f"skip_layers: the model has no module named {n!r} (use the names "
                             f"of model.named_modules(), e.g. {example!r})")
    kinds = tuple(types)

    def rule(name: str, module: nn.Module) -> bool:
        if kinds and isinstance(module, kinds):
            return True
        return any(name == n or name.startswith(n + ".") for n in names)

    return rule


def not_a_module_message(owner: str, got: Any) -> str:
    """The TypeError text for a constructor given something other than an ``nn.Module``
    (typically ``model.parameters()``)."""
    return (f"{owner} takes the model: pass the model itself, not its parameters "
            f"({owner}(model, lr=..., damping=...); it finds the Kronecker layers in the "
            f"module tree); got {type(got).__name__}")


def tensor_bytes(objs: Iterable[Any], seen: set[int] | None = None) -> int:
    """Bytes of the storages of the tensors in ``objs`` (tensors, or tuples / lists of them;
    other values count 0), each storage once (``seen``: data pointers already counted)."""
    seen = set() if seen is None else seen
    total = 0
    for obj in objs:
        if isinstance(obj, (tuple, list)):
            total += tensor_bytes(obj, seen)
        elif isinstance(obj, Tensor):
            storage = obj.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
    return total


def format_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _rng_state(cuda_devices: list[torch.device]) -> tuple:
    return (torch.get_rng_state(),
            [(d, torch.cuda.get_rng_state(d)) for d in cuda_devices])


def _set_rng_state(state: tuple) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    for d, s in cuda:
        torch.cuda.set_rng_state(s, d)
