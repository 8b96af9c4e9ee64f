"""Grid search of Appendix D.2 / D.3 (``kbfgs grid``), resumable.

Every finished run is one result file written atomically; a rerun with the same arguments
skips the runs whose file exists, so an interrupted grid resumes where it stopped. The best
setting is chosen by the paper's criterion: smallest final training loss for the autoencoders
(Section 6.1), largest final validation accuracy for the classifiers (Section 6.2), each
averaged over the seeds.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .problems import METHOD_HPS, Problem
from .report import Group, group_results, result_problem
from .runner import (
    RunSpec,
    make_method_optimizer,
    make_spec,
    resolve_hps,
    result_path,
    run,
    write_json_atomic,
)
from .spec import format_hps

__all__ = ["grid_points", "grid_specs", "refusal", "run_grid"]


def grid_points(problem: Problem, method: str,
                overrides: dict[str, list[Any] | None] | None = None
                ) -> list[dict[str, Any]]:
    """Hyper-parameter settings of the grid: the paper's ranges with ``overrides`` on top.

    ``overrides`` maps a hyper-parameter to the list of values to try (None: the paper's).
    A hyper-parameter given a single value is fixed at it.
    """
    axes = problem.grid(method)
    for k, v in (overrides or {}).items():
        if v is None:
            continue
        if k not in METHOD_HPS[method]:
            raise ValueError(f"method {method!r} takes no hyper-parameter {k!r}; it takes: "
                             f"{', '.join(METHOD_HPS[method])}")
        axes[k] = tuple(v)
    axes = {k: v for k, v in axes.items() if k in METHOD_HPS[method]}
    keys = list(axes)
    points = []
    for values in itertools.product(*(axes[k] for k in keys)):
        points.append(resolve_hps(problem, method, dict(zip(keys, values))))
    return points


def grid_specs(problem: Problem, method: str, points: list[dict[str, Any]],
               seeds: list[int], **spec_kw: Any) -> list[RunSpec]:
    return [make_spec(problem, method, hps, seed, **spec_kw) for hps in points for seed in seeds]


def refusal(method: str, model: Any, hps: dict[str, Any]) -> str | None:
    """Why ``method`` refuses ``hps`` on ``model`` (the ValueError of constructing its
    optimizer, e.g. double damping needs lambda_G <= 1), or None when it accepts them."""
    try:
        make_method_optimizer(method, model, hps)
    except ValueError as e:
        return str(e)
    return None


def _unusable_result(path: Path) -> str | None:
    """Why the result file at ``path`` cannot count as finished, or None (also when absent)."""
    if not path.exists():
        return None
    try:
        res = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    return result_problem(res)


def run_grid(problem: Problem, method: str, specs: list[RunSpec], out_dir: str | os.PathLike,
             progress: bool = True, echo: Callable[[str], None] = print
             ) -> tuple[Group, list[Group], int]:
    """Run (or skip when finished) every spec; return (best group, all groups, runs done).

    A setting the method refuses (a ValueError from constructing its optimizer) is skipped
    with one line; a result file that is unreadable or incomplete counts as not finished and
    its run is done again (the file is replaced).
    """
    done = 0
    results = []
    refused: dict[str, str | None] = {}
    model = problem.build_model() if specs else None
    for i, spec in enumerate(specs, 1):
        text = format_hps(spec.hps, keys=("lr", "damping", "weight_decay"), sep=" ")
        key = json.dumps(spec.hps, sort_keys=True, default=str)
        if key not in refused:
            refused[key] = refusal(method, model, spec.hps)
        if refused[key] is not None:
            echo(f"[{i}/{len(specs)}] {method} {text} seed {spec.seed}: skipped, the method "
                 f"refuses it: {refused[key]}")
            continue
        echo(f"[{i}/{len(specs)}] {method} {text} seed {spec.seed}")
        path = result_path(out_dir, spec)
        bad = _unusable_result(path)
        if bad is not None:
            echo(f"result file {path} is not a finished run ({bad}): running it again")
        res, ran = run(spec, out_dir, progress=progress, echo=echo, force=bad is not None)
        done += int(ran)
        results.append(res)
    if not results:
        raise ValueError(f"{method} refuses every setting of the grid on {problem.name}: "
                         "nothing to run")
    groups = group_results(results)[(problem.name, method)]
    best = max(groups, key=lambda g: g.score())
    summary = {
        "problem": problem.name, "method": method, "criterion": problem.criterion,
        "best_hps": best.hps, "best_score": best.score(), "seeds": best.seeds,
        "settings": [{"hps": g.hps, "score": g.score(),
                      "runs": [Path(r.get("_path", r["run_id"])).name for r in g.runs]}
                     for g in groups],
        "refused": [{"hps": json.loads(k), "reason": why} for k, why in refused.items()
                    if why is not None],
    }
    write_json_atomic(Path(out_dir) / "grids" / f"best__{problem.name}__{method}.json",
                      summary)
    return best, groups, done
