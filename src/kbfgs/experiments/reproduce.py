"""Section 6 in one resumable command (``kbfgs reproduce``).

Runs every problem x method x seed of the paper's Tables 3 and 7 (the MLP autoencoders of
Section 6.1 and Appendix D.2.1) and Table 4 (the CNNs of Section 6.2) with the paper's settings
(Tables 6 and 8, the update frequencies and budgets of Section 6), then writes the report.

Resuming: each run is one result file named by its run id, written atomically when the run
ends, and an unfinished run leaves a checkpoint (``OUT/<run id>.ckpt``, every
``checkpoint_every`` epochs) that the next attempt resumes from. Rerunning the same command
after a kill at any point therefore redoes no finished run and writes no duplicate: it skips
the finished runs, resumes the interrupted one and runs the rest.

``budget_scale`` multiplies every budget: the process time of the autoencoders, and the epochs
and the learning-rate decay interval of the CNNs (so the schedule keeps its shape).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .paper_results import PAPER_SEEDS, REPRODUCE_ROWS, TABLE4_METHODS
from .problems import Problem, check_method, get_problem

__all__ = [
    "DEFAULT_SEEDS",
    "PlannedRun",
    "estimate_process_seconds",
    "plan",
    "reproduce",
    "rows_for",
    "scaled_budget",
]

DEFAULT_SEEDS = PAPER_SEEDS
_AE_ROWS = REPRODUCE_ROWS["curves-ae"]


@dataclass(frozen=True)
class PlannedRun:
    """One (problem, method, seed) of the reproduction."""

    problem: str
    method: str
    seed: int


def rows_for(problem: Problem) -> tuple[str, ...]:
    """The methods reproduced on ``problem``: its rows in Tables 3/7 or Table 4; a problem
    outside Section 6 takes the rows of its kind (autoencoder or classifier) that it has
    hyper-parameters for."""
    if problem.name in REPRODUCE_ROWS:
        return REPRODUCE_ROWS[problem.name]
    rows = TABLE4_METHODS if problem.classifier else _AE_ROWS
    return tuple(m for m in rows if m in problem.hps)


def plan(problems: Sequence[str] | None = None, methods: Sequence[str] | None = None,
         seeds: int = DEFAULT_SEEDS) -> list[PlannedRun]:
    """The runs of the reproduction, problem by problem, then seed by seed, then method.

    ``problems`` default to the seven of Section 6; ``methods`` restrict each problem's rows
    (a method that is no row of any of the problems is an error).
    """
    if seeds < 1:
        raise ValueError(f"seeds must be >= 1, got {seeds}")
    names = list(problems) if problems else list(REPRODUCE_ROWS)
    for name in names:
        get_problem(name)  # ValueError listing the valid names
    if methods:
        for m in methods:
            check_method(m)
        used = {m for name in names for m in rows_for(get_problem(name))}
        unused = [m for m in methods if m not in used]
        if unused:
            raise ValueError(f"method(s) {', '.join(unused)} are no row of Tables 3, 4 or 7 "
                             f"for {', '.join(names)}; the rows are: "
                             f"{', '.join(sorted(used, key=_row_order))}")
    out = []
    for name in names:
        rows = [m for m in rows_for(get_problem(name)) if not methods or m in methods]
        for seed in range(1, seeds + 1):
            out += [PlannedRun(name, m, seed) for m in rows]
    return out


def _row_order(method: str) -> int:
    order = list(_AE_ROWS) + [m for m in TABLE4_METHODS if m not in _AE_ROWS]
    return order.index(method) if method in order else len(order)


def scaled_budget(problem: Problem, method: str, scale: float
                  ) -> tuple[float | None, float | None, tuple[float, float] | None]:
    """(time budget, epochs, lr decay) of the paper for ``method`` on ``problem``, each
    length multiplied by ``scale`` (Section 6.1: process time; Section 6.2: epochs and the
    decay interval)."""
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"budget scale must be a finite number > 0, got {scale}")
    sched = problem.schedule_for(method)
    if sched is not None:
        epochs, every, factor = sched
        return None, float(epochs) * scale, (float(every) * scale, float(factor))
    if problem.time_budget is None:
        raise ValueError(f"problem {problem.name!r} has neither a time budget nor a schedule")
    return problem.time_budget * scale, None, None


def estimate_process_seconds(runs: Sequence[PlannedRun], scale: float) -> tuple[float, int]:
    """(process seconds of the time-budgeted runs, number of epoch-budgeted runs): the
    training process time the plan asks for (warm starts, evaluations and data loading come
    on top; the CNN runs are counted, not timed)."""
    seconds, epoch_runs = 0.0, 0
    for r in runs:
        budget, _, _ = scaled_budget(get_problem(r.problem), r.method, scale)
        if budget is None:
            epoch_runs += 1
        else:
            seconds += budget
    return seconds, epoch_runs


def _data_missing(problem: Problem, data_dir: str | None, subset: int | None,
                  device: str) -> str | None:
    """The first line of the loader's FileNotFoundError when the data is absent, else None
    (the loaded data stays in the runner's cache for the runs)."""
    from .runner import load_problem_data

    try:
        load_problem_data(problem, data_dir=data_dir, subset=subset, device=device)
    except FileNotFoundError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        return first.removesuffix(" Tried:").rstrip(".")
    return None


def reproduce(out_dir: str | os.PathLike, problems: Sequence[str] | None = None,
              methods: Sequence[str] | None = None, seeds: int = DEFAULT_SEEDS,
              budget_scale: float = 1.0, *, data_dir: str | None = None,
              device: str = "cpu", threads: int | None = None, subset: int | None = None,
              checkpoint_every: int | None = None, progress: bool = True,
              echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Run (or skip when finished) every planned run, then write ``OUT/report.md``.

    ``checkpoint_every`` (epochs) defaults to 1 for the CNNs and 10 for the autoencoders.
    Returns ``{"report": path, "done": runs done now, "finished": runs already finished,
    "skipped": {problem: reason}}``.
    """
    from .report import write_report
    from .runner import make_spec, resolve_hps, run

    runs = plan(problems, methods, seeds)
    out = Path(out_dir)
    seconds, epoch_runs = estimate_process_seconds(runs, budget_scale)
    cores = os.cpu_count() or 1
    echo(f"reproduce: {len(runs)} runs ({len({r.problem for r in runs})} problems, "
         f"{seeds} seeds), budget scale {budget_scale:g} -> {out}")
    if seconds:
        echo(f"  time-budgeted runs: {seconds:,.0f} s of training process time in all "
             f"(about {seconds / cores / 3600:.2f} h on {cores} busy cores, plus warm starts, "
             "evaluations and data loading)")
    if epoch_runs:
        echo(f"  epoch-budgeted (CNN) runs: {epoch_runs}")
    done = finished = 0
    skipped: dict[str, str] = {}
    checked: set[str] = set()
    for i, r in enumerate(runs, 1):
        problem = get_problem(r.problem)
        if r.problem in skipped:
            continue
        if r.problem not in checked:
            checked.add(r.problem)
            missing = _data_missing(problem, data_dir, subset, device)
            if missing is not None:
                skipped[r.problem] = missing
                echo(f"{r.problem}: skipped, its data is absent ({missing}; pass --data-dir)")
                continue
        budget, epochs, decay = scaled_budget(problem, r.method, budget_scale)
        every = checkpoint_every or (1 if problem.classifier else 10)
        spec = make_spec(problem, r.method, resolve_hps(problem, r.method), r.seed,
                         time_budget=budget, epochs=epochs, lr_decay=decay, subset=subset,
                         device=device, data_dir=data_dir, threads=threads,
                         checkpoint_every=every)
        echo(f"[{i}/{len(runs)}] {r.problem} {r.method} seed {r.seed}")
        _, ran = run(spec, out, progress=progress, echo=echo)
        done += int(ran)
        finished += int(not ran)
    n_skipped = sum(1 for r in runs if r.problem in skipped)
    echo(f"\n{done} runs done now, {finished} were already finished"
         + (f", {n_skipped} skipped ({', '.join(skipped)}: data absent)" if skipped else ""))
    if done + finished == 0:
        raise ValueError("nothing to report: every problem was skipped (its data is absent; "
                         "pass --data-dir)")
    report = write_report(out, out=out / "report.md", figures_dir=out,
                          title="Section 6 reproduction")
    echo(f"wrote {report}")
    return {"report": report, "done": done, "finished": finished, "skipped": skipped}
