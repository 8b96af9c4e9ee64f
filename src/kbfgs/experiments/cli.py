"""The ``kbfgs`` command line (also ``python -m kbfgs``).

Subcommands: ``demo`` (the short comparison of the README), ``run``, ``grid``, ``report`` and
``list``. See ``kbfgs COMMAND --help``.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["build_parser", "main"]

_DEMO_METHODS = ("kbfgs", "kbfgs-l", "kfac", "adam", "sgd-m")
# Table 6 values that diverge on the built-in CURVES stand-in (it is not the original data):
# the demo takes the next smaller learning rate of the Appendix D.2 grid and says so.
_DEMO_OVERRIDES: dict[str, dict[str, dict[str, Any]]] = {
    "curves-ae": {"kfac": {"lr": 0.1}},
}
_DEMO_BUDGET = 60.0
_HP_FLAGS = (
    ("lr", float, "learning rate (initial learning rate for the CNNs)"),
    ("damping", float, "damping lambda (Adam: epsilon)"),
    ("weight_decay", float, "decoupled weight decay gamma: W -= lr (p + gamma W)"),
    ("momentum", float, "momentum beta (0.9 in the paper)"),
    ("update_freq", int, "K-BFGS curvature update frequency T"),
    ("history", int, "K-BFGS(L): number of L-BFGS pairs (100)"),
    ("stat_freq", int, "KFAC: statistics update frequency T1"),
    ("inv_freq", int, "KFAC: inverse update frequency T2"),
    ("likelihood", str, "KFAC: bernoulli, gaussian or categorical"),
)


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


def _problem_list() -> str:
    from .problems import problems

    return "\n".join(f"  {p.name:18s} {p.description}" for p in problems())


def _method_list() -> str:
    from .problems import METHOD_TITLES, METHODS

    return "\n".join(f"  {m:18s} {METHOD_TITLES[m]}" for m in METHODS)


def _add_common(p: argparse.ArgumentParser, *, grid: bool) -> None:
    p.add_argument("--problem", required=True, metavar="P",
                   help="problem name (see `kbfgs list`)")
    p.add_argument("--optimizer", "--method", dest="method", required=True, metavar="O",
                   help="method name (see `kbfgs list`)")
    hp = p.add_argument_group("hyper-parameters" + (" (lists of values to try; default: the "
                                                   "paper's Appendix D grid)" if grid else
                                                   " (default: the problem's, `kbfgs list "
                                                   "--problem P`)"))
    for name, typ, text in _HP_FLAGS:
        flag = "--" + name.replace("_", "-")
        if grid and typ is not str:
            hp.add_argument(flag, dest=name, type=typ, nargs="+", default=None, help=text)
        else:
            hp.add_argument(flag, dest=name, type=typ, default=None, help=text)
    b = p.add_argument_group("budget (default: the paper's: process time for the "
                             "autoencoders, epochs and lr decay for the CNNs)")
    ex = b.add_mutually_exclusive_group()
    ex.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                    help="process-time budget per run (training only: warm start and "
                         "evaluation excluded)")
    ex.add_argument("--epochs", type=float, default=None, help="number of epochs per run")
    b.add_argument("--lr-decay-every", type=float, default=None, metavar="EPOCHS",
                   help="multiply the learning rate by --lr-decay-factor every EPOCHS epochs "
                        "(0: no decay)")
    b.add_argument("--lr-decay-factor", type=float, default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[1], help="random seeds")
    p.add_argument("--out", default="results" if not grid else "grid-results",
                   help="directory of the result files (one JSON per run)")
    _add_env(p)
    p.add_argument("--subset", type=int, default=None, metavar="N",
                   help="use only the first N training samples (and at most N validation "
                        "samples)")
    p.add_argument("--eval-subset", type=int, default=None, metavar="N",
                   help="log the training loss on a fixed random subset of N training samples "
                        "(default: the problem's: all for CURVES, 10000 for the larger sets)")
    p.add_argument("--eval-every", type=float, default=None, metavar="SECONDS",
                   help="also evaluate every SECONDS of training process time (default with "
                        "--time-budget: budget / 20)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="minibatch size (default: the paper's, 1000 or 128)")
    p.add_argument("--no-warm-start", action="store_true",
                   help="skip the warm start of K-BFGS / KFAC from the training set")
    p.add_argument("--force", action="store_true",
                   help="rerun runs whose result file already exists (and discard their "
                        "checkpoints)")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="EPOCHS",
                   help="write OUT/<run id>.ckpt every EPOCHS epochs (rank 0); a rerun of an "
                        "interrupted run resumes from it, on any number of processes with the "
                        "same global batch; removed when the run finishes")


def _add_env(p: argparse.ArgumentParser, threads_default: int | None = None) -> None:
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--data-dir", default=None,
                   help="directory with the data files (Fashion-MNIST is also looked for in "
                        "/usr/share/datasets/fashion-mnist; CURVES falls back to the built-in "
                        "generator)")
    p.add_argument("--threads", type=int, default=threads_default,
                   help="torch.set_num_threads (None: torch's default). Process time counts "
                        "every thread: on a busy machine idle OpenMP threads spinning inflate "
                        "it, so --threads 1 gives the most iterations per process-second")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kbfgs", formatter_class=_Formatter,
        description="K-BFGS experiments: reproduce Section 6 of Ren, Bahamou and Goldfarb, "
                    "'Kronecker-factored Quasi-Newton Methods for Deep Learning'.",
        epilog="examples:\n"
               "  kbfgs demo                                  # ~5 min on 2 CPU cores\n"
               "  kbfgs run --problem curves-ae --optimizer kbfgs --time-budget 120 "
               "--seeds 1 2 3 --out results\n"
               "  kbfgs grid --problem fmnist-ae --optimizer adam --time-budget 30 "
               "--out grid\n"
               "  kbfgs report results\n")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="short comparison of K-BFGS, K-BFGS(L), KFAC, Adam and SGD-m, then a report",
        description=(
            "Train the CURVES autoencoder of Table 5 (batch 1000, BCE with logits summed over "
            "pixels) on the built-in CURVES stand-in (20,000 seeded generated images of smooth "
            "curves; NOT the original digs3pts_1.mat unless --data-dir holds it) with K-BFGS, "
            "K-BFGS(L), KFAC, Adam and SGD-m at the paper's CURVES hyper-parameters (Table 6), "
            "each for --time-budget seconds of process time (training only; process time "
            "counts every thread, so on 2 cores it passes up to twice as fast as the clock). "
            "Then print a table of final training loss and time per iteration and write "
            "OUT/report.md, OUT/curves-ae.png and the run files OUT/runs/*.json (replaced on "
            "every demo). One torch thread by default (--threads).\n\n"
            "With --fmnist, the same five methods also train the MNIST autoencoder on "
            "Fashion-MNIST (fmnist-ae; needs the files of Debian's dataset-fashion-mnist in "
            "/usr/share/datasets/fashion-mnist or --data-dir) with the values of `kbfgs list "
            "--problem fmnist-ae`.\n\n"
            "Duration on an idle 2-core CPU with the default 60 s: about 6 minutes for CURVES "
            "(5 runs x 60 s process time plus data generation, warm starts and evaluations), "
            "about 12 minutes with --fmnist; longer when other processes share the CPU."))
    demo.add_argument("--time-budget", type=float, default=_DEMO_BUDGET, metavar="SECONDS",
                      help="process-time budget per method")
    demo.add_argument("--out", default="demo-out", help="output directory")
    demo.add_argument("--methods", nargs="+", default=list(_DEMO_METHODS),
                      help="methods to compare")
    demo.add_argument("--fmnist", action="store_true",
                      help="also run fmnist-ae (Fashion-MNIST), doubling the time")
    demo.add_argument("--seed", type=int, default=1)
    demo.add_argument("--subset", type=int, default=None, metavar="N",
                      help="use only the first N training samples")
    _add_env(demo, threads_default=1)

    run = sub.add_parser("run", formatter_class=_Formatter,
                         help="train one method on one problem for one or more seeds",
                         description="Train, with a progress bar, measuring process time "
                                     "with warm start and evaluation excluded. Each seed "
                                     "writes OUT/<problem>__<method>__<hps>__<hash>__seed<S>"
                                     ".json atomically; a finished run is skipped on rerun "
                                     "(use --force to redo it).\n\nproblems:\n"
                                     + _problem_list() + "\n\nmethods:\n" + _method_list())
    _add_common(run, grid=False)

    grid = sub.add_parser("grid", formatter_class=_Formatter,
                          help="grid search of Appendix D.2 / D.3 for one method, resumable",
                          description="Run every setting of the grid (the paper's ranges of "
                                      "Appendix D.2 for the autoencoders and D.3 for the CNNs, "
                                      "or the values given) and select the best by the paper's "
                                      "criterion (smallest final training loss for the "
                                      "autoencoders, largest final validation accuracy for the "
                                      "CNNs, mean over seeds). Each finished run is one result "
                                      "file; rerunning the same command skips them, so an "
                                      "interrupted grid resumes. The summary goes to "
                                      "OUT/grids/best__<problem>__<method>.json.")
    _add_common(grid, grid=True)

    rep = sub.add_parser("report", formatter_class=_Formatter,
                         help="tables (markdown) and figures (PNG) from a results directory",
                         description="Read every finished result under DIR and write "
                                     "DIR/report.md (Table 3/4/7-style tables: mean over "
                                     "seeds +- std/sqrt(n); hyper-parameters; grids) and one "
                                     "PNG per problem (loss against epochs and process time, "
                                     "mean with a shaded std/sqrt(n) band).")
    rep.add_argument("dir", help="directory with result files")
    rep.add_argument("--out", default=None, help="markdown file (default DIR/report.md)")
    rep.add_argument("--figures-dir", default=None,
                     help="where the PNGs go (default: next to the markdown file)")
    rep.add_argument("--title", default=None)

    ls = sub.add_parser("list", formatter_class=_Formatter,
                        help="problems, methods and the default hyper-parameters")
    ls.add_argument("--problem", default=None, help="show the defaults of this problem")
    return parser


# --------------------------------------------------------------------------------------------
# Commands
# --------------------------------------------------------------------------------------------


def _device(arg: str | None) -> str:
    import torch

    if arg is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    return arg


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name, _, _ in _HP_FLAGS}


def _spec_kw(args: argparse.Namespace, problem: Any) -> dict[str, Any]:
    from .runner import default_budget

    budget, epochs, decay = default_budget(problem, args.method, args.time_budget, args.epochs,
                                           args.lr_decay_every, args.lr_decay_factor)
    return {"time_budget": budget, "epochs": epochs, "lr_decay": decay, "subset": args.subset,
                "eval_subset": args.eval_subset, "eval_every": args.eval_every,
                "batch_size": args.batch_size, "device": _device(args.device),
                "data_dir": args.data_dir, "threads": args.threads,
                "warm_start": not args.no_warm_start,
                "checkpoint_every": args.checkpoint_every}


def cmd_run(args: argparse.Namespace) -> int:
    from .. import distributed
    from .problems import get_problem
    from .runner import make_spec, resolve_hps, run

    problem = get_problem(args.problem)
    hps = resolve_hps(problem, args.method, _overrides(args))
    kw = _spec_kw(args, problem)
    # under torchrun (WORLD_SIZE > 1): process group from the environment, rank 0 reports
    with distributed.launch(kw["device"]) as world:
        if distributed.is_main_process():
            print(f"{problem.name} / {args.method}: {hps}; "
                  + (f"{kw['time_budget']:g} s process time" if kw["time_budget"] is not None
                     else f"{kw['epochs']:g} epochs, lr decay {kw['lr_decay']}")
                  + f"; seeds {args.seeds}; device {kw['device']}"
                  + (f"; {world} processes" if world > 1 else ""), flush=True)
        for seed in args.seeds:
            spec = make_spec(problem, args.method, hps, seed, **kw)
            run(spec, args.out, progress=not args.no_progress, force=args.force)
    return 0


def cmd_grid(args: argparse.Namespace) -> int:
    from .grid import grid_points, grid_specs, run_grid
    from .problems import get_problem
    from .report import _hp_string

    problem = get_problem(args.problem)
    overrides = {name: (v if v is None or isinstance(v, list) else [v])
                 for name, v in _overrides(args).items()}
    points = grid_points(problem, args.method, overrides)
    specs = grid_specs(problem, args.method, points, args.seeds, **_spec_kw(args, problem))
    print(f"grid {problem.name} / {args.method}: {len(points)} settings x {len(args.seeds)} "
          f"seeds = {len(specs)} runs -> {args.out}", flush=True)
    best, groups, done = run_grid(problem, args.method, specs, args.out,
                                  progress=not args.no_progress)
    crit = "validation accuracy" if problem.classifier else "training loss"
    print(f"\n{done} runs done now, {len(specs) - done} were already finished")
    for g in sorted(groups, key=lambda g: -g.score()):
        s = g.score()
        val = (100 * s if problem.classifier else -s) if math.isfinite(s) else math.nan
        print(f"  {crit} {val:10.4f}  {_hp_string(g.hps)}" + ("   <- best" if g is best else ""))
    print(f"best ({'largest' if problem.classifier else 'smallest'} {crit}): "
          f"{_hp_string(best.hps)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(args.dir, out=args.out, figures_dir=args.figures_dir, title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .problems import METHOD_TITLES, get_problem

    if args.problem is None:
        print("problems:\n" + _problem_list() + "\n\nmethods:\n" + _method_list())
        print("\n`kbfgs list --problem P` shows a problem's default hyper-parameters.")
        return 0
    p = get_problem(args.problem)
    print(f"{p.name}: {p.description}\n  data set {p.dataset}, model {p.model}, loss {p.loss}, "
          f"batch {p.batch_size}, criterion {p.criterion}\n  defaults from: {p.source}")
    if p.time_budget is not None:
        print(f"  budget: {p.time_budget:g} s process time")
    else:
        for fam, (ep, every, fac) in p.schedule.items():
            print(f"  budget ({fam.replace('_', '-')} methods): {ep} epochs, lr x{fac:g} every "
                  f"{every} epochs")
    for m, hp in p.hps.items():
        note = p.hp_notes.get(m)
        print(f"  {m:18s} {METHOD_TITLES[m]:20s} {hp}" + (f"  [{note}]" if note else ""))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .problems import METHOD_TITLES, check_method, get_problem
    from .report import format_table, write_report
    from .runner import default_budget, make_spec, resolve_hps, run

    for m in args.methods:
        check_method(m)
    device = _device(args.device)
    out = Path(args.out)
    problems = ["curves-ae"]
    if args.fmnist:
        problems.append("fmnist-ae")
    n_runs = len(problems) * len(args.methods)
    print(f"kbfgs demo: {', '.join(problems)} x {', '.join(args.methods)}, "
          f"{args.time_budget:g} s of process time each ({n_runs} runs), device {device}, "
          f"torch threads {args.threads or __import__('torch').get_num_threads()}", flush=True)
    t0 = time.perf_counter()
    runs_dir = out / "runs"
    if runs_dir.exists():  # the demo's own run files: replaced on every demo
        for old in runs_dir.glob("*.json"):
            old.unlink()
    results: list[dict[str, Any]] = []
    notes: list[str] = []
    for pname in problems:
        problem = get_problem(pname)
        for method in args.methods:
            override = _DEMO_OVERRIDES.get(pname, {}).get(method, {})
            if override and not _original_curves(pname, args.data_dir):
                notes.append(f"{pname} {method}: {override} instead of the paper's "
                             f"{ {k: problem.defaults(method)[k] for k in override} }, which "
                             "diverges on the built-in stand-in data")
            else:
                override = {}
            hps = resolve_hps(problem, method, override)
            budget, epochs, decay = default_budget(problem, method, args.time_budget, None)
            spec = make_spec(problem, method, hps, args.seed, time_budget=budget,
                             epochs=epochs, lr_decay=decay, subset=args.subset, device=device,
                             data_dir=args.data_dir, threads=args.threads)
            res, _ = run(spec, runs_dir, progress=not args.no_progress, force=True)
            results.append(res)
    report = write_report(runs_dir, out=out / "report.md", figures_dir=out,
                          title="kbfgs demo")
    for pname in problems:
        rows = []
        for res in results:
            if res["problem"] != pname:
                continue
            f = res["final"]
            loss = f["train_loss"]
            rows.append([METHOD_TITLES[res["method"]],
                         "diverged" if loss is None else f"{loss:.3f}",
                         str(f["iterations"]), f"{f['epochs']:.1f}",
                         f"{1e3 * f['time_per_iter_s']:.1f}" if f["time_per_iter_s"] else "",
                         _hp_short(res["hps"])])
        data_note = next(r["data"]["note"] for r in results if r["problem"] == pname)
        print(f"\n{pname} ({data_note}); final training loss on the full training set after "
              f"{args.time_budget:g} s of process time:\n")
        print(format_table(["method", "final training loss", "iterations", "epochs",
                            "process ms / iteration", "hyper-parameters"], rows))
    for note in notes:
        print(f"note: {note}")
    print(f"\nreport: {report} (figures in {out}); took {time.perf_counter() - t0:.0f} s")
    return 0


def _original_curves(problem: str, data_dir: str | None) -> bool:
    """Whether the original CURVES file (not the stand-in) would be used."""
    if problem != "curves-ae" or data_dir is None:
        return False
    from .data import load_curves

    return "original" in load_curves(data_dir, n_train=1, n_test=0).note


def _hp_short(hps: dict[str, Any]) -> str:
    keys = ("lr", "damping", "update_freq", "inv_freq")
    return ", ".join(f"{k}={hps[k]:g}" for k in keys if k in hps)


_COMMANDS = {"demo": cmd_demo, "run": cmd_run, "grid": cmd_grid, "report": cmd_report,
             "list": cmd_list}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, FileNotFoundError) as e:
        print(f"kbfgs {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (finished runs are saved; rerun the same command to resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
