"""Tables and figures from a directory of result files (``kbfgs report DIR``).

Tables like the paper's Tables 3, 4 and 7 (mean over seeds, +- std/sqrt(n); the Table 7
layout with the improvement #1 / #2 columns when the ablation variants are present), a table
of our values next to the paper's numbers where the paper has them (marked as the paper's, with
its data set and budget beside ours), the
hyper-parameters used (Tables 6 and 8), time per iteration, the grids when a directory holds
several settings of one method, and PNG figures like Figures 1-7 (training loss, and validation
error for classifiers, against epochs and against process time; mean over seeds with a shaded
+- std/sqrt(n) band; one line per method).
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .paper_results import (
    PAPER_MACHINE,
    PAPER_SEEDS,
    TABLE3_METHODS,
    TABLE7_IMPROVEMENTS,
    TABLE7_METHODS,
    paper_budget,
    paper_data,
    paper_value,
)
from .problems import METHOD_TITLES, METHODS, PROBLEM_NAMES
from .spec import format_hps

__all__ = [
    "Group",
    "format_table",
    "group_results",
    "load_results",
    "result_problem",
    "select_best",
    "summary_rows",
    "write_report",
]


# --------------------------------------------------------------------------------------------
# Loading and grouping
# --------------------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def result_problem(res: Any) -> str | None:
    """Why ``res`` (a parsed result file) is not a usable finished run, or None when it is.

    Checks what the report and the grid read: the identity (``problem``, ``method``, an
    integer ``seed``, ``hps`` and ``spec`` as objects), ``status == "finished"`` and the final
    values with their types (``train_loss`` a number or null, ``iterations`` an integer, ...).
    """
    if not isinstance(res, dict):
        return f"not a JSON object (a {type(res).__name__})"
    if res.get("status") != "finished":
        return f"status is {res.get('status')!r}, not 'finished'"
    for key, typ, name in (("problem", str, "a string"), ("method", str, "a string"),
                           ("hps", dict, "an object"), ("spec", dict, "an object"),
                           ("final", dict, "an object")):
        if key not in res:
            return f"missing key {key!r}"
        if not isinstance(res[key], typ):
            return f"{key!r} is not {name}"
    if not isinstance(res.get("seed"), int) or isinstance(res.get("seed"), bool):
        return "missing key 'seed'" if "seed" not in res else "'seed' is not an integer"
    final = res["final"]
    for key in ("train_loss", "iterations", "epochs"):
        if key not in final:
            return f"missing key 'final.{key}'"
    for key in ("train_loss", "val_acc", "time_per_iter_s", "epochs", "iterations"):
        v = final.get(key)
        if v is not None and not _is_number(v):
            return f"'final.{key}' is not a number"
    if not isinstance(final["iterations"], int) or isinstance(final["iterations"], bool):
        return "'final.iterations' is not an integer"
    if "diverged" in final and not isinstance(final["diverged"], bool):
        return "'final.diverged' is not true or false"
    for key in ("problem_info", "data", "env"):
        if key in res and not isinstance(res[key], dict):
            return f"{key!r} is not an object"
    if "log" in res and not (isinstance(res["log"], list)
                             and all(isinstance(e, dict) for e in res["log"])):
        return "'log' is not a list of objects"
    return None


def _is_grid_summary(res: Any) -> bool:
    """A ``grids/best__<problem>__<method>.json`` summary written by ``kbfgs grid``."""
    return isinstance(res, dict) and "best_hps" in res and "settings" in res


def _warn_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_results(directory: str | Path, warn: Callable[[str], None] | None = _warn_stderr
                 ) -> list[dict[str, Any]]:
    """Every finished result file under ``directory`` (recursively; hidden files skipped).

    A file that cannot be used (unreadable, truncated JSON, missing keys, wrong types) is
    skipped with one line through ``warn`` naming the file and the reason (``warn=None``:
    silently); grid summaries (``grids/best__*.json``) are not result files and are skipped
    without a word.
    """
    out = []
    directory = Path(directory)
    for path in sorted(directory.rglob("*.json")):
        if any(part.startswith(".") for part in path.relative_to(directory).parts):
            continue
        try:
            res = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            reason: str | None = f"unreadable ({type(e).__name__}: {e})"
        else:
            if _is_grid_summary(res):
                continue
            reason = result_problem(res)
        if reason is not None:
            if warn is not None:
                warn(f"kbfgs report: warning: skipped {path}: {reason}")
            continue
        res["_path"] = str(path)
        out.append(res)
    return out


def _config_key(res: dict[str, Any]) -> str:
    from .spec import NON_KEY_FIELDS

    spec = dict(res.get("spec", {}))
    for k in ("seed", *NON_KEY_FIELDS):
        spec.pop(k, None)
    spec["hps"] = dict(sorted(res.get("hps", {}).items()))
    return json.dumps(spec, sort_keys=True, default=str)


@dataclass
class Group:
    """The runs (one per seed) of one problem, method and setting."""

    problem: str
    method: str
    hps: dict[str, Any]
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def classifier(self) -> bool:
        return bool(self.runs[0].get("problem_info", {}).get("classifier"))

    @property
    def seeds(self) -> list[int]:
        return sorted(r["seed"] for r in self.runs)

    def values(self, key: str, scale: float = 1.0) -> list[float]:
        """Final ``key`` of every run; a diverged run or a missing value gives nan."""
        vals = []
        for r in self.runs:
            v = r["final"].get(key)
            vals.append(float(v) * scale if v is not None else math.nan)
        return vals

    def stat(self, key: str, scale: float = 1.0) -> tuple[float, float, int]:
        """(mean, std/sqrt(n), n) of final ``key`` over seeds (nan when any run diverged)."""
        v = np.asarray(self.values(key, scale), dtype=float)
        n = len(v)
        if n == 0 or not np.all(np.isfinite(v)):
            return math.nan, math.nan, n
        sem = float(v.std(ddof=0) / math.sqrt(n)) if n > 1 else 0.0
        return float(v.mean()), sem, n

    def score(self) -> float:
        """The paper's criterion, larger is better: -train loss, or validation accuracy."""
        if self.classifier:
            m, _, _ = self.stat("val_acc")
            return m if math.isfinite(m) else -math.inf
        m, _, _ = self.stat("train_loss")
        return -m if math.isfinite(m) else -math.inf

    @property
    def diverged(self) -> int:
        return sum(1 for r in self.runs if r["final"].get("diverged"))

    def budget(self) -> str:
        spec = self.runs[0].get("spec", {})
        if _is_number(spec.get("time_budget")):
            return f"{spec['time_budget']:g} s process time"
        if _is_number(spec.get("epochs")):
            return f"{spec['epochs']:g} epochs"
        return "unknown budget"


def group_results(results: Iterable[dict[str, Any]]) -> dict[tuple[str, str], list[Group]]:
    """(problem, method) -> groups, one per distinct setting (hyper-parameters and budget)."""
    groups: dict[tuple[str, str, str], Group] = {}
    for res in results:
        key = (res["problem"], res["method"], _config_key(res))
        if key not in groups:
            groups[key] = Group(res["problem"], res["method"], dict(res.get("hps", {})))
        groups[key].runs.append(res)
    out: dict[tuple[str, str], list[Group]] = defaultdict(list)
    for (p, m, _), g in groups.items():
        g.runs.sort(key=lambda r: r["seed"])
        out[(p, m)].append(g)
    return dict(out)


def select_best(groups: dict[tuple[str, str], list[Group]]) -> dict[tuple[str, str], Group]:
    """Per (problem, method) the setting that is best by the paper's criterion."""
    return {k: max(v, key=lambda g: g.score()) for k, v in groups.items()}


def _order(names: Iterable[str], reference: Sequence[str]) -> list[str]:
    names = set(names)
    known = [n for n in reference if n in names]
    return known + sorted(names - set(known))


# --------------------------------------------------------------------------------------------
# Tables
# --------------------------------------------------------------------------------------------


def _cell(mean: float, sem: float, n: int, digits: int = 2) -> str:
    if n == 0:
        return ""
    if not math.isfinite(mean):
        return "diverged"
    if n == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} \u00b1 {sem:.{digits}f}"


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def summary_rows(best: dict[tuple[str, str], Group], problem: str) -> list[list[str]]:
    """One row per method of ``problem``: final loss, accuracy, iterations, time per iteration."""
    rows = []
    for method in _order((m for p, m in best if p == problem), METHODS):
        g = best[(problem, method)]
        loss = _cell(*g.stat("train_loss"), digits=3)
        row = [METHOD_TITLES.get(method, method), loss]
        if g.classifier:
            row.append(_cell(*g.stat("val_acc", 100.0)))
        it_m, _, _ = g.stat("iterations")
        tpi_m, tpi_s, n = g.stat("time_per_iter_s", 1e3)
        row += [f"{it_m:.0f}" if math.isfinite(it_m) else "",
                _cell(tpi_m, tpi_s, n, digits=1), str(len(g.runs))
                + (f" ({g.diverged} diverged)" if g.diverged else "")]
        rows.append(row)
    return rows


def _summary_header(classifier: bool) -> list[str]:
    h = ["method", "final training loss"]
    if classifier:
        h.append("val. accuracy (%)")
    return h + ["iterations", "process ms / iteration", "seeds"]


def _main_tables(best: dict[tuple[str, str], Group]) -> list[str]:
    """Table 3/7 style (autoencoders, training loss) and Table 4 style (classifiers)."""
    out = []
    problems = _order({p for p, _ in best}, PROBLEM_NAMES)
    ae = [p for p in problems if not any(g.classifier for (q, _), g in best.items() if q == p)]
    cnn = [p for p in problems if p not in ae]
    if ae:
        methods = _order({m for p, m in best if p in ae}, METHODS)
        ablation = any(m in _ABLATIONS for m in methods)
        rows = []
        for m in methods:
            if ablation and m in _ABLATIONS:
                continue  # in the Table 7 layout below
            row = [METHOD_TITLES.get(m, m)]
            for p in ae:
                g = best.get((p, m))
                row.append(_cell(*g.stat("train_loss")) if g else "")
            rows.append(row)
        if rows:
            out.append("### Training loss (Table 3 style)\n\n"
                       "Final training loss, mean over seeds \u00b1 std/sqrt(n).\n\n"
                       + format_table(["method"] + ae, rows))
        if ablation:
            out.append(_table7(best, ae))
    if cnn:
        methods = _order({m for p, m in best if p in cnn}, METHODS)
        rows = []
        for m in methods:
            row = [METHOD_TITLES.get(m, m)]
            for p in cnn:
                g = best.get((p, m))
                row.append(_cell(*g.stat("val_acc", 100.0)) if g else "")
            rows.append(row)
        out.append("### Validation accuracy (Table 4 style)\n\n"
                   "Final validation classification accuracy (%), mean over seeds "
                   "\u00b1 std/sqrt(n).\n\n" + format_table(["method"] + cnn, rows))
    return out


#: the Table 7 variants that only the ablation has
_ABLATIONS = tuple(m for m in TABLE7_METHODS if m not in TABLE3_METHODS)


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _table7(best: dict[tuple[str, str], Group], ae: Sequence[str]) -> str:
    """Table 7 layout: the K-BFGS variants with improvement #1 (D_P D_LM damping) and #2
    (minibatch Hessian-action BFGS for H_A) on or off, one column per autoencoder."""
    rows = []
    for m in TABLE7_METHODS:
        if not any((p, m) in best for p in ae):
            continue
        one, two = TABLE7_IMPROVEMENTS[m]
        row = [METHOD_TITLES.get(m, m), _yes_no(one), _yes_no(two)]
        for p in ae:
            g = best.get((p, m))
            row.append(_cell(*g.stat("train_loss")) if g else "")
        rows.append(row)
    return ("### Ablation (Table 7 layout)\n\n"
            "Final training loss, mean over seeds \u00b1 std/sqrt(n). Improvement #1: the "
            "D_P D_LM damping of H_G (Section 3.2.1; off: double damping); improvement #2: the "
            "minibatch Hessian-action BFGS update of H_A (off: a moving-average A).\n\n"
            + format_table(["name of algorithm", "improvement #1", "improvement #2", *ae],
                           rows))


def _escape(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _paper_comparison(best: dict[tuple[str, str], Group]) -> str | None:
    """Our value next to the paper's (Tables 3, 4, 7), with both data sets and budgets."""
    rows = []
    for p in _order({p for p, _ in best}, PROBLEM_NAMES):
        for m in _order((m for q, m in best if q == p), METHODS):
            ref = paper_value(p, m)
            if ref is None:
                continue
            g = best[(p, m)]
            if ref.metric == "val_acc":
                ours = _cell(*g.stat("val_acc", 100.0))
                metric = "val. accuracy (%)"
            else:
                ours = _cell(*g.stat("train_loss"))
                metric = "training loss"
            data = g.runs[0].get("data", {}).get("note", "")
            rows.append([p, METHOD_TITLES.get(m, m), metric, ours, str(len(g.runs)),
                         _escape(data), _escape(g.budget()),
                         f"{ref.value:.2f} ({ref.table})", _escape(paper_data(p)),
                         _escape(paper_budget(p, m))])
    if not rows:
        return None
    return ("### Compared with the paper\n\n"
            "Ours: measured here (mean over our seeds \u00b1 std/sqrt(n)). **Paper**: the "
            f"values the paper reports (its Tables 3, 4 and 7: mean over {PAPER_SEEDS} seeds "
            f"on {PAPER_MACHINE}), copied from the paper, not measured here. Compare only "
            "where the data set and the budget agree.\n\n"
            + format_table(["problem", "method", "metric", "ours", "our seeds", "our data",
                            "our budget", "paper's value", "paper's data", "paper's budget"],
                           rows))


def _conditions(results: list[dict[str, Any]]) -> str:
    envs = defaultdict(set)
    for r in results:
        e = r.get("env", {})
        envs["device"].add(f"{e.get('device')} ({e.get('device_name')})")
        envs["torch"].add(str(e.get("torch")))
        envs["kbfgs"].add(str(e.get("kbfgs")))
        envs["torch threads"].add(str(e.get("torch_threads")))
        envs["CPU cores"].add(str(e.get("cpu_count")))
        git = e.get("git") if isinstance(e.get("git"), dict) else {}
        if git.get("commit"):
            envs["git commit"].add(git["commit"][:12] + (" (dirty)" if git.get("dirty") else ""))
        envs["host"].add(str(e.get("host")))
    lines = [f"- {k}: {', '.join(sorted(v))}" for k, v in envs.items() if v]
    return "\n".join(lines)


def _problem_section(problem: str, groups: dict[tuple[str, str], list[Group]],
                     best: dict[tuple[str, str], Group], figure: str | None) -> str:
    mine = {k: g for k, g in best.items() if k[0] == problem}
    any_g = next(iter(mine.values()))
    r0 = any_g.runs[0]
    classifier = any_g.classifier
    parts = [f"## {problem}\n"]
    info = r0.get("problem_info", {})
    data = r0.get("data", {})
    budgets = sorted({g.budget() for g in mine.values()})
    parts.append(f"- {info.get('description', '')}\n- data: {data.get('note', '')}\n"
                 f"- budget: {', '.join(budgets)}; batch {data.get('batch_size')}\n"
                 f"- logged loss: {data.get('eval', '')}\n"
                 f"- final training loss: {r0['final'].get('train_loss_set', '')}\n"
                 f"- selection criterion: "
                 f"{'largest validation accuracy' if classifier else 'smallest training loss'}"
                 "\n")
    parts.append(format_table(_summary_header(classifier), summary_rows(best, problem)))
    # hyper-parameters
    rows = []
    for m in _order((m for p, m in mine), METHODS):
        g = mine[(problem, m)]
        note = g.runs[0].get("problem_info", {}).get("hp_note") or ""
        n_settings = len(groups[(problem, m)])
        if n_settings > 1:
            note = (note + "; " if note else "") + f"best of {n_settings} settings"
        rows.append([METHOD_TITLES.get(m, m), format_hps(g.hps), note])
    parts.append("\nHyper-parameters (Table 6 / Table 8 style):\n\n"
                 + format_table(["method", "hyper-parameters", "note"], rows))
    # grids
    for m in _order((m for p, m in groups if p == problem), METHODS):
        gs = groups[(problem, m)]
        if len(gs) < 2:
            continue
        b = best[(problem, m)]
        rows = []
        for g in sorted(gs, key=lambda g: -g.score()):
            metric = (_cell(*g.stat("val_acc", 100.0)) if classifier
                      else _cell(*g.stat("train_loss"), digits=3))
            rows.append([format_hps(g.hps), g.budget(), metric, str(len(g.runs)),
                         "best" if g is b else ""])
        parts.append(f"\nGrid for {METHOD_TITLES.get(m, m)} ({len(gs)} settings):\n\n"
                     + format_table(["hyper-parameters", "budget",
                                     "val. accuracy (%)" if classifier else "training loss",
                                     "seeds", ""], rows))
    if figure:
        parts.append(f"\n![{problem}]({figure})\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------


def _curve(run: dict[str, Any], x_key: str, y_key: str, scale: float = 1.0,
           transform: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for e in run.get("log", []):
        if y_key not in e:  # an entry without evaluation
            continue
        y = e[y_key]
        if y is None or (_is_number(y) and not math.isfinite(float(y))):  # diverged from here
            break
        if not _is_number(y) or not _is_number(e.get(x_key)):  # a malformed entry
            continue
        y = float(y) * scale
        if transform == "error":
            y = 100.0 - y
        xs.append(float(e[x_key]))
        ys.append(y)
    return np.asarray(xs), np.asarray(ys)


def mean_band(curves: Sequence[tuple[np.ndarray, np.ndarray]], points: int = 200
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean and std/sqrt(n) of curves interpolated onto a common grid of x.

    The grid ends where the shortest curve ends, so the mean does not jump where a seed stops
    (runs of one budget end at slightly different epochs); a curve that stops before half of
    the longest one (a diverged seed) does not shorten the grid: beyond its end only the
    others count.
    """
    curves = [(x, y) for x, y in curves if len(x) > 0]
    if not curves:
        return np.array([]), np.array([]), np.array([])
    longest = max(float(x[-1]) for x, _ in curves)
    hi = min(float(x[-1]) for x, _ in curves if float(x[-1]) >= 0.5 * longest)
    lo = min(float(x[0]) for x, _ in curves)
    grid = np.linspace(lo, hi, points)
    stack = np.full((len(curves), points), np.nan)
    for i, (x, y) in enumerate(curves):
        inside = (grid >= x[0]) & (grid <= x[-1])
        stack[i, inside] = np.interp(grid[inside], x, y)
    n = np.sum(np.isfinite(stack), axis=0)
    keep = n > 0
    grid, stack, n = grid[keep], stack[:, keep], n[keep]
    mean = np.nanmean(stack, axis=0)
    std = np.sqrt(np.nanmean((stack - mean) ** 2, axis=0))
    return grid, mean, std / np.sqrt(n)


def _zoom(ax: Any) -> None:
    """Clip the first steps down from the initial loss: the y range goes up to the highest
    value any line has from its ``zoom_from`` x on (set by :func:`plot_problem`: the first
    evaluation after the start, at least 10% into the x range), or, for a line without one,
    after a quarter of its x range. Sparse logs (one point per epoch) are drawn as straight
    segments from the initial value, which can be orders of magnitude above the rest (a
    network evaluated in eval mode before its BatchNorm statistics exist)."""
    tops, los = [], []
    for ln in ax.get_lines():
        x = np.asarray(ln.get_xdata(), dtype=float)
        y = np.asarray(ln.get_ydata(), dtype=float)
        ok = np.isfinite(y)
        x, y = x[ok], y[ok]
        if not len(y):
            continue
        los.append(float(y.min()))
        cut = getattr(ln, "zoom_from", x[0] + 0.25 * (x[-1] - x[0]))
        after = y[x >= cut]
        tops.append(float(after.max()) if len(after) else float(y.max()))
    if not tops:
        return
    lo, top = min(los), max(tops)
    if top > lo:
        pad = 0.05 * (top - lo)
        ax.set_ylim(lo - pad, top + pad)


def plot_problem(problem: str, best: dict[tuple[str, str], Group], path: str | Path) -> None:
    """Figure like Figures 1-7: loss (and validation error) vs epochs and vs process time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mine = {m: g for (p, m), g in best.items() if p == problem}
    classifier = any(g.classifier for g in mine.values())
    rows: list[tuple[str, float, str | None, str]] = [("train_loss", 1.0, None, "training loss")]
    if classifier:
        rows.append(("val_acc", 100.0, "error", "validation error (%)"))
    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 4 * len(rows)), squeeze=False)
    cmap = plt.get_cmap("tab10")
    for ci, method in enumerate(_order(mine, METHODS)):
        g = mine[method]
        color = cmap(ci % 10)
        for ri, (key, scale, transform, label) in enumerate(rows):
            for cj, (xkey, xlabel) in enumerate((("epoch", "epochs"),
                                                 ("process_time", "process time (s)"))):
                ax = axes[ri][cj]
                curves = [_curve(r, xkey, key, scale, transform) for r in g.runs]
                x, m, s = mean_band(curves)
                if len(x) == 0:
                    continue
                (line,) = ax.plot(x, m, color=color, label=f"{METHOD_TITLES.get(method, method)} "
                                  f"(n={len(g.runs)})")
                seconds = [float(cx[1]) for cx, _ in curves if len(cx) > 1]
                line.zoom_from = max([x[0] + 0.1 * (x[-1] - x[0]), *seconds])
                ax.fill_between(x, m - s, m + s, color=color, alpha=0.25, linewidth=0)
                ax.set_xlabel(xlabel)
                ax.set_ylabel(label)
    for row in axes:
        for ax in row:
            _zoom(ax)
            ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{problem}: mean over seeds, band \u00b1 std/sqrt(n)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def write_report(directory: str | Path, out: str | Path | None = None,
                 figures_dir: str | Path | None = None, title: str | None = None
                 ) -> Path:
    """Write ``report.md`` (and one PNG per problem) for the results under ``directory``."""
    directory = Path(directory)
    results = load_results(directory)
    if not results:
        raise ValueError(f"no finished result files (*.json) under {directory}")
    out = Path(out) if out is not None else directory / "report.md"
    figures_dir = Path(figures_dir) if figures_dir is not None else out.parent
    groups = group_results(results)
    best = select_best(groups)
    problems = _order({p for p, _ in best}, PROBLEM_NAMES)
    parts = [f"# {title or 'Results'}\n",
             (f"{len(results)} finished runs from `{directory}`. Times are process times "
              "(`time.process_time`, all threads of the process) of the training only: warm "
              "start and evaluations excluded, as in the paper (Appendix D.1). Values are means "
              "over seeds \u00b1 std/sqrt(n) (std with ddof 0; a diverged seed makes the "
              "cell 'diverged'). Where a method has several settings, the best by the paper's "
              "criterion is shown.\n"),
             _conditions(results) + "\n"]
    parts += _main_tables(best)
    comparison = _paper_comparison(best)
    if comparison is not None:
        parts.append(comparison)
    for p in problems:
        fig_path = figures_dir / f"{p}.png"
        plot_problem(p, best, fig_path)
        rel = os.path.relpath(fig_path.resolve(), out.parent.resolve())
        parts.append(_problem_section(p, groups, best, rel))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(parts) + "\n")
    return out
