"""What defines a run: :class:`RunSpec`, its run id and file names, and the one formatter of
hyper-parameters and numbers used by the runner, the grid, the report and the command line."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .problems import METHOD_HPS, RUNNER_METHODS, Problem, check_method

__all__ = [
    "HP_ABBREV",
    "HP_ORDER",
    "NON_KEY_FIELDS",
    "RunSpec",
    "checkpoint_path",
    "default_budget",
    "format_hp",
    "format_hps",
    "format_number",
    "make_spec",
    "resolve_hps",
    "result_path",
]

#: the order in which hyper-parameters are shown (others follow, sorted)
HP_ORDER = ("lr", "damping", "weight_decay", "update_freq", "history", "stat_freq",
            "inv_freq", "momentum", "likelihood")
#: short names of the hyper-parameters in run ids
HP_ABBREV = {"lr": "lr", "damping": "d", "weight_decay": "wd", "update_freq": "T"}
#: RunSpec fields that do not change a run's result (left out of its key and of report groups)
NON_KEY_FIELDS = ("data_dir", "device", "threads", "checkpoint_every")


# --------------------------------------------------------------------------------------------
# Formatting
# --------------------------------------------------------------------------------------------


def format_hp(v: Any) -> str:
    """One hyper-parameter value: floats as ``%g`` (0.03, 1e-05), anything else as ``str``."""
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def format_hps(hps: Mapping[str, Any], keys: Iterable[str] | None = None, sep: str = ", ",
               abbrev: bool = False) -> str:
    """Hyper-parameters as text: ``lr=0.03, damping=0.3, ...``.

    ``keys``: which to show, in this order (those absent from ``hps`` are skipped); default:
    all of them, :data:`HP_ORDER` first, then the others sorted. ``abbrev``: ``lr0.03_d0.3``
    style (the short names of :data:`HP_ABBREV`, no ``=``; with ``sep="_"`` in run ids).
    """
    if keys is None:
        keys = [k for k in HP_ORDER if k in hps] + sorted(set(hps) - set(HP_ORDER))
    parts = []
    for k in keys:
        if k in hps:
            parts.append(f"{HP_ABBREV.get(k, k)}{format_hp(hps[k])}" if abbrev
                         else f"{k}={format_hp(hps[k])}")
    return sep.join(parts)


def format_number(v: float | None, scale: float = 1.0, digits: int = 4) -> str:
    """A measured number with ``digits`` significant digits; ``nan`` for None or non-finite."""
    if v is None or not math.isfinite(v):
        return "nan"
    return f"{v * scale:.{digits}g}"


# --------------------------------------------------------------------------------------------
# Run specification
# --------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """Everything that defines one run (and its result file name)."""

    problem: str
    method: str
    hps: dict[str, Any]
    seed: int = 1
    #: process-time budget in seconds (training only); None: run ``epochs``
    time_budget: float | None = None
    epochs: float | None = None
    #: (decay every E epochs, factor); None: constant learning rate
    lr_decay: tuple[float, float] | None = None
    batch_size: int = 1000
    #: use only the first N training samples (and at most N validation samples)
    subset: int | None = None
    #: training samples on which the logged training loss is computed (None: all)
    eval_subset: int | None = None
    #: also evaluate at every ``eval_every`` seconds of training process time
    eval_every: float | None = None
    #: evaluate the final training loss on the full training set
    final_full_eval: bool = True
    warm_start: bool = True
    device: str = "cpu"
    data_dir: str | None = None
    threads: int | None = None
    #: write a resumable checkpoint every this many epochs (None: none); see ``runner.run``
    checkpoint_every: int | None = None
    #: the data the run trains on, as loaded: ``name:source:fingerprint`` (see
    #: ``rundata.data_identity``); None until resolved (``make_spec`` and ``runner.run`` do)
    data: str | None = None

    def key(self) -> dict[str, Any]:
        """The fields that make a run distinct (data location, device, threads and checkpoint
        frequency excluded: they do not change the result; the data's identity included)."""
        d = dataclasses.asdict(self)
        for k in NON_KEY_FIELDS:
            d.pop(k)
        d["hps"] = dict(sorted(d["hps"].items()))
        return d

    def run_id(self) -> str:
        """``problem__method__<main hps>__<hash of the key>__seed<seed>``."""
        blob = json.dumps(self.key(), sort_keys=True, default=str)
        digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
        tag = format_hps(self.hps, sorted(k for k in self.hps if k in HP_ABBREV), sep="_",
                         abbrev=True)
        return f"{self.problem}__{self.method}__{tag}__{digest}__seed{self.seed}"


def result_path(out_dir: str | os.PathLike, spec: RunSpec) -> Path:
    """Where the result of ``spec`` is written: ``out_dir/<run id>.json``."""
    return Path(out_dir) / f"{spec.run_id()}.json"


def checkpoint_path(out_dir: str | os.PathLike, spec: RunSpec) -> Path:
    """Where ``runner.run`` keeps the checkpoint of an unfinished run."""
    return Path(out_dir) / f"{spec.run_id()}.ckpt"


# --------------------------------------------------------------------------------------------
# Building specs from a problem's defaults
# --------------------------------------------------------------------------------------------


def resolve_hps(problem: Problem, method: str, overrides: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    """The problem's defaults for ``method`` with ``overrides`` (None values ignored) on top.

    A method without defaults on this problem takes the settings of its family (update
    frequencies and the like) and needs ``lr`` (and ``damping`` where it has one) given.
    """
    check_method(method)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    unknown = set(overrides) - set(METHOD_HPS[method])
    if unknown:
        raise ValueError(f"method {method!r} takes no hyper-parameter(s) {sorted(unknown)}; "
                         f"it takes: {', '.join(METHOD_HPS[method])}")
    if method in problem.hps:
        hps = problem.defaults(method)
    else:
        family = "kbfgs" if method.startswith("kbfgs") else method
        base = problem.hps.get(family, {})
        hps = {k: v for k, v in base.items() if k in METHOD_HPS[method]
               and k not in ("lr", "damping")}
        if "history" in METHOD_HPS[method]:
            hps.setdefault("history", 100)
        missing = [k for k in ("lr", "damping") if k in METHOD_HPS[method]
                   and k not in overrides]
        if missing:
            raise ValueError(f"problem {problem.name!r} has no default hyper-parameters for "
                             f"{method!r}; give {', '.join('--' + m for m in missing)}")
    hps.update(overrides)
    return hps


def default_budget(problem: Problem, method: str, time_budget: float | None,
                   epochs: float | None, lr_decay_every: float | None = None,
                   lr_decay_factor: float | None = None
                   ) -> tuple[float | None, float | None, tuple[float, float] | None]:
    """(time budget, epochs, lr decay) from the command line and the problem's defaults.

    With neither a time budget nor epochs given: the autoencoders run the paper's process-time
    budget (Section 6.1), the CNNs the paper's epochs and step decay (Section 6.2).
    """
    if time_budget is not None and epochs is not None:
        raise ValueError("give either --time-budget or --epochs, not both")
    sched = problem.schedule_for(method)
    decay: tuple[float, float] | None = None
    if sched is not None:
        decay = (float(sched[1]), float(sched[2]))
    if lr_decay_every is not None or lr_decay_factor is not None:
        every = lr_decay_every if lr_decay_every is not None else (decay[0] if decay else None)
        factor = lr_decay_factor if lr_decay_factor is not None else (
            decay[1] if decay else 0.1)
        decay = (float(every), float(factor)) if every else None
    if time_budget is None and epochs is None:
        if sched is not None:
            epochs = float(sched[0])
        else:
            time_budget = problem.time_budget
    return time_budget, epochs, decay


def make_spec(problem: Problem, method: str, hps: dict[str, Any], seed: int, *,
              time_budget: float | None, epochs: float | None,
              lr_decay: tuple[float, float] | None, subset: int | None = None,
              eval_subset: int | None = None, eval_every: float | None = None,
              batch_size: int | None = None, device: str = "cpu",
              data_dir: str | None = None, threads: int | None = None,
              warm_start: bool | None = None, checkpoint_every: int | None = None) -> RunSpec:
    """A RunSpec with the problem's defaults filled in and its data identified (the data is
    loaded, once per process, to fingerprint it). ``warm_start=None``: the method's default
    (``RunnerMethod.warm_start``)."""
    if warm_start is None:
        warm_start = RUNNER_METHODS[method].warm_start
    if eval_subset is None:
        eval_subset = problem.eval_subset
    if eval_every is None and time_budget is not None:
        eval_every = time_budget / 20.0
    spec = RunSpec(problem=problem.name, method=method, hps=hps, seed=seed,
                   time_budget=time_budget, epochs=epochs, lr_decay=lr_decay,
                   batch_size=batch_size or problem.batch_size, subset=subset,
                   eval_subset=eval_subset, eval_every=eval_every,
                   final_full_eval=not problem.classifier, warm_start=warm_start,
                   device=device, data_dir=data_dir, threads=threads,
                   checkpoint_every=checkpoint_every)
    from .rundata import with_data_identity

    return with_data_identity(spec)
