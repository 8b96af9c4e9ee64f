"""Grid search of Appendix D.2 / D.3 (``kbfgs grid``), resumable.

Every finished run is one result file written atomically; a rerun with the same arguments
skips the runs whose file exists, so an interrupted grid resumes where it stopped. The best
setting is chosen by the paper's criterion: smallest final training loss for the autoencoders
(Section 6.1), largest final validation accuracy for the classifiers (Section 6.2), each
averaged over the seeds.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any, Callable

from .problems import METHOD_HPS, Problem
from .report import Group, group_results
from .runner import RunSpec, make_spec, resolve_hps, run, write_json_atomic

__all__ = ["grid_points", "grid_specs", "run_grid"]


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


def run_grid(problem: Problem, method: str, specs: list[RunSpec], out_dir: str | os.PathLike,
             progress: bool = True, echo: Callable[[str], None] = print
             ) -> tuple[Group, list[Group], int]:
    """Run (or skip when finished) every spec; return (best group, all groups, runs done)."""
    done = 0
    results = []
    for i, spec in enumerate(specs, 1):
        echo(f"[{i}/{len(specs)}] {method} {_hp_text(spec.hps)} seed {spec.seed}")
        res, ran = run(spec, out_dir, progress=progress, echo=echo)
        done += int(ran)
        results.append(res)
    groups = group_results(results)[(problem.name, method)]
    best = max(groups, key=lambda g: g.score())
    summary = {
        "problem": problem.name, "method": method, "criterion": problem.criterion,
        "best_hps": best.hps, "best_score": best.score(), "seeds": best.seeds,
        "settings": [{"hps": g.hps, "score": g.score(),
                      "runs": [Path(r.get("_path", r["run_id"])).name for r in g.runs]}
                     for g in groups],
    }
    write_json_atomic(Path(out_dir) / "grids" / f"best__{problem.name}__{method}.json",
                      summary)
    return best, groups, done


def _hp_text(hps: dict[str, Any]) -> str:
    return " ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in hps.items() if k in ("lr", "damping", "weight_decay"))
