"""Timing of the phases of an optimizer step: one context manager, one dict of host seconds.

``KBFGS`` and ``KFAC`` wrap each part of a step in ``with self.phases(name):``. The names are
the same for both (``stats()["time"]`` reports the seconds per name):

==================== =========================================================================
``forward_backward`` the closure's forward-backward pass (recording hooks included)
``check_finite``     the non-finite check of the loss and gradients (one host sync)
``precondition``     momentum, ``P = H_G BUF H_A`` and the parameter update
``extra_pass``       the extra pass (K-BFGS: Algorithm 2 line 12; KFAC: the sampled-target pass)
``curvature``        the curvature update (K-BFGS: lines 9-16; KFAC: the moving averages)
``inverse``          KFAC's damped inverses (Algorithm 5 line 19)
``warm_start``       ``warm_start()``
==================== =========================================================================

Phases may nest; ``current`` is the innermost phase in progress (``None`` outside), so a tool
can attribute work to phases without patching the optimizer (``bench/op_count.py``). While a
``torch.profiler`` session is active each phase is also a ``record_function`` range named
``kbfgs::<name>``; without one, entering a phase costs two ``perf_counter`` calls and a flag
test.
"""

from __future__ import annotations

import time
from collections import defaultdict

import torch
from torch.profiler import record_function

__all__ = ["PHASES", "PhaseTimer"]

#: the phase names the optimizers use
PHASES = ("forward_backward", "check_finite", "precondition", "extra_pass", "curvature",
          "inverse", "warm_start")

_profiler_enabled = torch._C._autograd._profiler_enabled


class _Phase:
    __slots__ = ("name", "outer", "range", "t0", "timer")

    def __init__(self, timer: PhaseTimer, name: str) -> None:
        self.timer = timer
        self.name = name

    def __enter__(self) -> None:
        timer = self.timer
        self.outer = timer.current
        timer.current = self.name
        self.range = None
        if _profiler_enabled():
            self.range = record_function(f"kbfgs::{self.name}")
            self.range.__enter__()
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        timer = self.timer
        timer.seconds[self.name] += time.perf_counter() - self.t0
        if self.range is not None:
            self.range.__exit__(*exc)
        timer.current = self.outer


class PhaseTimer:
    """Accumulates host seconds per phase name: ``with timer("curvature"): ...``.

    ``seconds`` maps a phase name to its total host time (on a GPU: launch time unless the
    phase synchronises); ``current`` is the innermost phase in progress or ``None``.
    """

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.current: str | None = None

    def __call__(self, name: str) -> _Phase:
        return _Phase(self, name)
