"""The first-order baselines of the paper (Appendix D.1 / D.3) and the non-finite step skip.

* :class:`SGDM`: ``buf = momentum buf + g`` (no dampening, momentum 0.9), then
  ``W -= lr (buf + wd W)`` (decoupled weight decay; ``torch.optim.SGD`` couples it, so the
  update is written here).
* :class:`DecoupledAdam`: Adam of Kingma & Ba with betas (0.9, 0.999), bias correction,
  ``eps`` = the ``damping`` hyper-parameter and decoupled weight decay ``W -= lr (p + wd W)``
  (the paper's D.3 modification), which is what ``torch.optim.AdamW`` computes.

:class:`SkipNonFinite` gives any ``torch.optim.Optimizer`` the reliability contract of the
Kronecker-factored optimizers: a step whose loss or gradient is not finite is skipped
(parameters and state unchanged) and counted in ``stats()['skipped_steps']``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .base import all_finite, momentum_buffers
from .validation import check_number

__all__ = ["SGDM", "DecoupledAdam", "SkipNonFinite"]


def _all_finite(loss: Any, params: Iterable[Tensor]) -> bool:
    return all_finite(loss, [p.grad for p in params if p.grad is not None])


class SkipNonFinite:
    """Mixin (before a ``torch.optim.Optimizer`` in the bases): run the closure, skip a
    non-finite step, count steps (the counters are kept in ``state_dict``).

    A subclass calls :meth:`_init_counters` in ``__init__`` and, in ``step``,
    ``loss, ok = self._run_closure(closure)``, then updates only when ``ok``.
    """

    check_finite: bool
    steps: int
    skipped_steps: int
    param_groups: list[dict[str, Any]]  # the optimizer's (this class is mixed into one)

    def _init_counters(self, check_finite: bool) -> None:
        self.check_finite = bool(check_finite)
        self.steps = 0
        self.skipped_steps = 0

    def _run_closure(self, closure: Callable[[], Any] | None) -> tuple[Any, bool]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = [p for g in self.param_groups for p in g["params"]]
        if self.check_finite and not _all_finite(loss, params):
            self.skipped_steps += 1
            if self.skipped_steps == 1:
                warnings.warn(f"{type(self).__name__}: non-finite loss or gradient at step "
                              f"{self.steps + 1}; the step is skipped and the optimizer state is "
                              "unchanged (counted in stats()['skipped_steps'])",
                              RuntimeWarning, stacklevel=3)
            return loss, False
        return loss, True

    def stats(self, condition: bool = True) -> dict[str, Any]:
        return {"steps": self.steps, "skipped_steps": self.skipped_steps}

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]  # mixin: the Optimizer after it has it
        sd["counters"] = {"steps": self.steps, "skipped_steps": self.skipped_steps}
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        sd = dict(state_dict)
        counters = sd.pop("counters", None)
        super().load_state_dict(sd)  # type: ignore[misc]  # mixin: the Optimizer after it has it
        if counters is not None:
            self.steps = int(counters["steps"])
            self.skipped_steps = int(counters["skipped_steps"])


class SGDM(SkipNonFinite, torch.optim.Optimizer):
    """SGD with momentum as in the paper: ``buf = momentum buf + g`` (no dampening),
    ``W -= lr (buf + weight_decay W)`` (decoupled weight decay, Appendix D.3)."""

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.9,
                 weight_decay: float = 0.0, *, check_finite: bool = True) -> None:
        check_number("lr", lr, 0.0)
        check_number("momentum", momentum, 0.0, high=1.0)
        check_number("weight_decay", weight_decay, 0.0)
        super().__init__(params, {"lr": lr, "momentum": momentum, "weight_decay": weight_decay})
        self._init_counters(check_finite)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss, ok = self._run_closure(closure)
        if ok:
            self._update()
            self.steps += 1
        return loss

    @torch.no_grad()
    def _update(self) -> None:
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            bufs = momentum_buffers(self.state, params)
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, [p.grad for p in params])
            wd = group["weight_decay"]
            steps = torch._foreach_add(bufs, params, alpha=wd) if wd != 0 else bufs
            torch._foreach_add_(params, steps, alpha=-group["lr"])


class DecoupledAdam(SkipNonFinite, torch.optim.AdamW):
    """Adam (Kingma & Ba) with ``eps = damping`` and decoupled weight decay
    ``W -= lr (p + weight_decay W)``: ``torch.optim.AdamW`` with the non-finite skip."""

    def __init__(self, params: Iterable[Any], lr: float, damping: float,
                 weight_decay: float = 0.0, *, betas: tuple[float, float] = (0.9, 0.999),
                 check_finite: bool = True) -> None:
        check_number("lr", lr, 0.0)
        check_number("damping", damping, 0.0, strict=True)
        check_number("weight_decay", weight_decay, 0.0)
        super().__init__(params, lr=lr, betas=betas, eps=damping, weight_decay=weight_decay)
        self._init_counters(check_finite)

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss, ok = self._run_closure(closure)
        if ok:
            super().step()
            self.steps += 1
        return loss
