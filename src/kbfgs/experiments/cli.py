"""The ``kbfgs`` command line (also ``python -m kbfgs``).

Subcommands: ``demo`` (the short comparison of the README), ``run``, ``grid``, ``reproduce``
(all of Section 6, resumable), ``report`` and ``list``. See ``kbfgs COMMAND --help``.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
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
_DEMO_HP_KEYS = ("lr", "damping", "update_freq", "inv_freq")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    pass


# --------------------------------------------------------------------------------------------
# Argument types: every numeric option is checked for finiteness and range by the parser, so a
# bad value ends in ``error: argument --x: ...`` (exit 2), never in a traceback or a hang.
# --------------------------------------------------------------------------------------------


def number(kind: type, *, low: float | None = None, high: float | None = None,
           low_open: bool = False, high_open: bool = False) -> Callable[[str], Any]:
    """An argparse ``type=``: a finite ``kind`` (int or float) in the range [low, high].

    ``low_open`` / ``high_open`` exclude the bound itself. The returned function raises
    ``argparse.ArgumentTypeError`` with a message that states the accepted range.
    """
    lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
    hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
    want = (f"a finite {'integer' if kind is int else 'number'}"
            + (f" {lo}" if lo else "") + (" and" if lo and hi else "") + (f" {hi}" if hi else ""))

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except (TypeError, ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        ok = math.isfinite(value)
        if ok and low is not None:
            ok = value > low if low_open else value >= low
        if ok and high is not None:
            ok = value < high if high_open else value <= high
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return value

    parse.__name__ = f"{kind.__name__} ({want})"  # argparse names the type in some messages
    return parse


_POS_FLOAT = number(float, low=0.0, low_open=True)
_NONNEG_FLOAT = number(float, low=0.0)
_POS_INT = number(int, low=1)
_NONNEG_INT = number(int, low=0)
_FRACTION = number(float, low=0.0, high=1.0, low_open=True)
_MOMENTUM = number(float, low=0.0, high=1.0, high_open=True)
_LIKELIHOODS = ("bernoulli", "gaussian", "categorical")
#: KBFGSPlus's GRAFTS and INITS_H_A, restated so that parsing needs no torch (a test checks
#: they agree)
_GRAFTS = ("layer", "row")
_INITS_H_A = ("minibatch", "identity")


def boolean(text: str) -> bool:
    """An argparse ``type=`` for a yes/no value: true/false, yes/no, on/off or 1/0."""
    value = {"true": True, "yes": True, "on": True, "1": True,
             "false": False, "no": False, "off": False, "0": False}.get(text.strip().lower())
    if value is None:
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return value


boolean.__name__ = "true or false"  # argparse names the type in some messages
#: (name, argparse type, help) of the hyper-parameter flags
_HP_FLAGS: tuple[tuple[str, Callable[[str], Any], str], ...] = (
    ("lr", _POS_FLOAT, "learning rate (initial learning rate for the CNNs)"),
    ("damping", _POS_FLOAT, "damping lambda (Adam: epsilon)"),
    ("weight_decay", _NONNEG_FLOAT, "decoupled weight decay gamma: W -= lr (p + gamma W)"),
    ("momentum", _MOMENTUM, "momentum beta (0.9 in the paper)"),
    ("update_freq", _POS_INT, "K-BFGS curvature update frequency T"),
    ("history", _POS_INT, "K-BFGS(L): number of L-BFGS pairs (100)"),
    ("beta2", _MOMENTUM, "kbfgs-plus: decay of Adam's second moment (0.95)"),
    ("graft", str, "kbfgs-plus: Adam's step length per layer or per output row (layer, row)"),
    ("nesterov", boolean, "kbfgs-plus: Nesterov momentum (true or false)"),
    ("init_H_A", str, "kbfgs-plus: a layer's first H_A from its first minibatch's A, or "
                      "I / lambda_A (minibatch, identity)"),
    ("fisher_G", boolean, "kbfgs-plus: layers whose H_G pairs are at rounding level (convs "
                          "feeding BatchNorm) take the left factor (Gamma + delta I)^-1/2 "
                          "(true or false)"),
    ("stat_freq", _POS_INT, "KFAC: statistics update frequency T1"),
    ("inv_freq", _POS_INT, "KFAC: inverse update frequency T2"),
    ("likelihood", str, "KFAC: bernoulli, gaussian or categorical"),
)


def device_arg(text: str) -> str:
    """An argparse ``type=`` for ``--device``: cpu, cuda or cuda:N (available on this machine)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"expected cpu, cuda or cuda:N, got {text!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:N, got {text!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(
                f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return text


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
        choices = {"likelihood": _LIKELIHOODS, "graft": _GRAFTS,
                   "init_H_A": _INITS_H_A}.get(name)
        if grid and typ is not str:
            hp.add_argument(flag, dest=name, type=typ, nargs="+", default=None, help=text)
        else:
            hp.add_argument(flag, dest=name, type=typ, default=None, choices=choices,
                            help=text)
    b = p.add_argument_group("budget (default: the paper's: process time for the "
                             "autoencoders, epochs and lr decay for the CNNs)")
    ex = b.add_mutually_exclusive_group()
    ex.add_argument("--time-budget", type=_POS_FLOAT, default=None, metavar="SECONDS",
                    help="process-time budget per run (training only: warm start and "
                         "evaluation excluded)")
    ex.add_argument("--epochs", type=_POS_FLOAT, default=None, help="number of epochs per run")
    b.add_argument("--lr-decay-every", type=_NONNEG_FLOAT, default=None, metavar="EPOCHS",
                   help="multiply the learning rate by --lr-decay-factor every EPOCHS epochs "
                        "(0: no decay)")
    b.add_argument("--lr-decay-factor", type=_FRACTION, default=None,
                   help="learning-rate decay factor, in (0, 1] (the paper's: 0.1)")
    p.add_argument("--seeds", type=_NONNEG_INT, nargs="+", default=[1],
                   help="random seeds (the paper averages 5 seeds: `kbfgs reproduce` runs "
                        "1 2 3 4 5 by default; `run` and `grid` run one seed unless told)")
    p.add_argument("--out", default="results" if not grid else "grid-results",
                   help="directory of the result files (one JSON per run)")
    _add_env(p)
    p.add_argument("--subset", type=_POS_INT, default=None, metavar="N",
                   help="use only the first N training samples (and at most N validation "
                        "samples)")
    p.add_argument("--eval-subset", type=_POS_INT, default=None, metavar="N",
                   help="log the training loss on a fixed random subset of N training samples "
                        "(default: the problem's: all for CURVES, 10000 for the larger sets)")
    p.add_argument("--eval-every", type=_POS_FLOAT, default=None, metavar="SECONDS",
                   help="also evaluate every SECONDS of training process time (default with "
                        "--time-budget: budget / 20)")
    p.add_argument("--batch-size", type=_POS_INT, default=None,
                   help="minibatch size (default: the paper's, 1000 or 128)")
    warm = p.add_mutually_exclusive_group()
    warm.add_argument("--warm-start", dest="warm_start", action="store_const", const=True,
                      default=None,
                      help="warm-start the optimizer from the training set, off the clock "
                           "(default for K-BFGS and KFAC, as the paper; not for kbfgs-plus)")
    warm.add_argument("--no-warm-start", dest="warm_start", action="store_const", const=False,
                      help="no warm start (how each optimizer starts then: docs/api.md)")
    p.add_argument("--force", action="store_true",
                   help="rerun runs whose result file already exists (and discard their "
                        "checkpoints)")
    p.add_argument("--checkpoint-every", type=_POS_INT, default=None, metavar="EPOCHS",
                   help="write OUT/<run id>.ckpt every EPOCHS epochs (rank 0); a rerun of an "
                        "interrupted run resumes from it, on any number of processes with the "
                        "same global batch; removed when the run finishes")


def _add_env(p: argparse.ArgumentParser, threads_default: int | None = None) -> None:
    p.add_argument("--device", type=device_arg, default=None,
                   help="cpu, cuda or cuda:N (default: cuda if available)")
    p.add_argument("--data-dir", default=None,
                   help="directory with the data files (Fashion-MNIST is also looked for in "
                        "/usr/share/datasets/fashion-mnist; CURVES falls back to the built-in "
                        "generator)")
    p.add_argument("--threads", type=_POS_INT, default=threads_default,
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
               "  kbfgs reproduce --problems curves-ae --budget-scale 0.02 --out repro\n"
               "  kbfgs report results\n")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", formatter_class=_Formatter,
        help="short comparison of K-BFGS, K-BFGS(L), KFAC, Adam and SGD-m, then a report",
        description=(
            "Train an autoencoder of Table 5 (batch 1000, BCE with logits summed over pixels) "
            "with K-BFGS, K-BFGS(L), KFAC, Adam and SGD-m, each for --time-budget seconds of "
            "process time (training only; process time counts every thread, so on 2 cores it "
            "passes up to twice as fast as the clock): the MNIST autoencoder on Fashion-MNIST "
            "(fmnist-ae, the values of `kbfgs list --problem fmnist-ae`) when Debian's "
            "dataset-fashion-mnist is installed (/usr/share/datasets/fashion-mnist) or "
            "--data-dir holds its files, otherwise the CURVES autoencoder on the built-in "
            "CURVES stand-in (20,000 seeded generated images of smooth curves; NOT the original "
            "digs3pts_1.mat unless --data-dir holds it) at the paper's CURVES hyper-parameters "
            "(Table 6). --problems chooses; --fmnist runs both. Then print a table of final "
            "training loss and time per iteration (with a note on KFAC's flat start, Algorithm "
            "5's fixed damping) and write OUT/report.md, OUT/<problem>.png and the run files "
            "OUT/runs/*.json (replaced on every demo). One torch thread by default "
            "(--threads).\n\n"
            "Duration on an idle 2-core CPU with the default 60 s: about 6 minutes per problem "
            "(5 runs x 60 s process time plus data loading, warm starts and evaluations), "
            "about 12 minutes with --fmnist; longer when other processes share the CPU."))
    demo.add_argument("--time-budget", type=_POS_FLOAT, default=_DEMO_BUDGET, metavar="SECONDS",
                      help="process-time budget per method")
    demo.add_argument("--out", default="demo-out", help="output directory")
    demo.add_argument("--methods", nargs="+", default=list(_DEMO_METHODS),
                      help="methods to compare")
    demo.add_argument("--problems", nargs="+", default=None, metavar="P",
                      choices=("curves-ae", "fmnist-ae"),
                      help="curves-ae and/or fmnist-ae (default: fmnist-ae when Fashion-MNIST "
                           "is installed, else curves-ae)")
    demo.add_argument("--fmnist", action="store_true",
                      help="run both curves-ae and fmnist-ae, doubling the time")
    demo.add_argument("--seed", type=_NONNEG_INT, default=1)
    demo.add_argument("--subset", type=_POS_INT, default=None, metavar="N",
                      help="use only the first N training samples")
    _add_env(demo, threads_default=1)

    run = sub.add_parser("run", formatter_class=_Formatter,
                         help="train one method on one problem for one or more seeds",
                         description="Train, with a progress bar, measuring process time "
                                     "with warm start and evaluation excluded. Each seed "
                                     "writes OUT/<problem>__<method>__<hps>__<hash>__seed<S>"
                                     ".json atomically; a finished run is skipped on rerun "
                                     "(use --force to redo it).\n\nOne seed (1) by "
                                     "default, a quick check: the paper averages 5 seeds "
                                     "(--seeds 1 2 3 4 5, or `kbfgs reproduce`).\n\n"
                                     "problems:\n"
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

    repro = sub.add_parser(
        "reproduce", formatter_class=_Formatter,
        help="every problem x method x seed of Section 6 (Tables 3, 4 and 7), resumable, "
             "then the report",
        description=(
            "Run the rows of Table 3 and Table 7 (MNIST, FACES and CURVES autoencoders: "
            "K-BFGS, K-BFGS with T = 20, K-BFGS(L), K-BFGS-20, K-BFGS(L)-20, the two Table 7 "
            "ablations, KFAC, Adam, SGD-m) and of Table 4 (VGG16-BN and ResNet32 on CIFAR-10 "
            "and CIFAR-100: K-BFGS, KFAC, Adam, SGD-m), each for every seed, with the paper's "
            "hyper-parameters (Tables 6 and 8) and budgets (Section 6.1: 500 s / 2000 s of "
            "process time; Section 6.2: 150 or 200 epochs with step decay), then write "
            "OUT/report.md (the tables next to the paper's numbers) and one PNG per problem. "
            "Rerunning the same command after an interruption skips the finished runs and "
            "resumes the interrupted one from its checkpoint.\n\n"
            "Problems whose data is absent (MNIST, FACES and CIFAR need --data-dir) are "
            "skipped with one line each; CURVES falls back to the built-in stand-in.\n\n"
            "Time: at --budget-scale 1 the autoencoders alone ask for 150,000 s of training "
            "process time (10 methods x 5 seeds x (500 + 2000 + 500) s). On a 2-core CPU use "
            "--budget-scale 0.02 (see docs/api.md for the estimate)."))
    repro.add_argument("--problems", nargs="+", default=None, metavar="P",
                       help="problems to run (default: the seven of Section 6)")
    repro.add_argument("--methods", nargs="+", default=None, metavar="O",
                       help="restrict to these methods (default: every row of the tables)")
    repro.add_argument("--seeds", type=_POS_INT, default=5, metavar="N",
                       help="seeds 1..N per run (the paper's 5)")
    repro.add_argument("--budget-scale", type=_FRACTION, default=1.0, metavar="F",
                       help="multiply every budget (process time; CNN epochs and decay "
                            "interval) by F in (0, 1]")
    repro.add_argument("--out", required=True, help="results directory (resumable)")
    repro.add_argument("--subset", type=_POS_INT, default=None, metavar="N",
                       help="use only the first N training samples (a smoke test, not the "
                            "paper's setting)")
    repro.add_argument("--checkpoint-every", type=_POS_INT, default=None, metavar="EPOCHS",
                       help="checkpoint interval (default: 1 epoch for the CNNs, 10 for the "
                            "autoencoders)")
    _add_env(repro)

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
                "warm_start": args.warm_start,
                "checkpoint_every": args.checkpoint_every}


def cmd_run(args: argparse.Namespace) -> int:
    from . import launch
    from .problems import get_problem
    from .runner import make_spec, resolve_hps, run

    problem = get_problem(args.problem)
    hps = resolve_hps(problem, args.method, _overrides(args))
    kw = _spec_kw(args, problem)
    # under torchrun (WORLD_SIZE > 1): process group from the environment, rank 0 reports
    with launch.launch(kw["device"]) as world:
        if launch.is_main_process():
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
    from .spec import format_hps

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
        print(f"  {crit} {val:10.4f}  {format_hps(g.hps)}" + ("   <- best" if g is best else ""))
    print(f"best ({'largest' if problem.classifier else 'smallest'} {crit}): "
          f"{format_hps(best.hps)}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    out = write_report(args.dir, out=args.out, figures_dir=args.figures_dir, title=args.title)
    print(f"wrote {out}")
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import reproduce

    reproduce(args.out, problems=args.problems, methods=args.methods, seeds=args.seeds,
              budget_scale=args.budget_scale, data_dir=args.data_dir,
              device=_device(args.device), threads=args.threads, subset=args.subset,
              checkpoint_every=args.checkpoint_every, progress=not args.no_progress)
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
    from .spec import format_hps

    for m in args.methods:
        check_method(m)
    device = _device(args.device)
    out = Path(args.out)
    problems = demo_problems(args.problems, args.fmnist, args.data_dir)
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
                         format_hps(res["hps"], keys=_DEMO_HP_KEYS)])
        data_note = next(r["data"]["note"] for r in results if r["problem"] == pname)
        print(f"\n{pname} ({data_note}); final training loss on the full training set after "
              f"{args.time_budget:g} s of process time:\n")
        print(format_table(["method", "final training loss", "iterations", "epochs",
                            "process ms / iteration", "hyper-parameters"], rows))
    if "kfac" in args.methods:
        for pname in problems:
            notes.append(_kfac_note(pname))
    for note in notes:
        print(f"note: {note}")
    if notes:
        with open(report, "a") as f:
            f.write("\n## Notes\n\n" + "".join(f"- {n}\n" for n in notes))
    print(f"\nreport: {report} (figures in {out}); took {time.perf_counter() - t0:.0f} s")
    return 0


def fashion_mnist_available(data_dir: str | None) -> bool:
    """Whether Fashion-MNIST is found (in ``data_dir`` or Debian's
    /usr/share/datasets/fashion-mnist); the loaded data stays cached for the runs."""
    from .problems import get_problem
    from .runner import load_problem_data

    try:
        load_problem_data(get_problem("fmnist-ae"), data_dir=data_dir)
    except FileNotFoundError:
        return False
    return True


def demo_problems(problems: Sequence[str] | None, both: bool, data_dir: str | None
                  ) -> list[str]:
    """The demo's problems: those given; with ``--fmnist`` CURVES and Fashion-MNIST; else
    fmnist-ae when Fashion-MNIST is installed, the CURVES stand-in otherwise."""
    if problems:
        return list(dict.fromkeys(problems))
    if both:
        return ["curves-ae", "fmnist-ae"]
    return ["fmnist-ae"] if fashion_mnist_available(data_dir) else ["curves-ae"]


def _kfac_note(problem: str) -> str:
    """What the demo says next to KFAC's line (docs/results.md, 'KFAC on the autoencoders')."""
    return (f"{problem} KFAC: a flat start is Algorithm 5's fixed damping, not a defect: at "
            "initialisation the factors of the first (encoder) layers are 10^2.5 to 10^5 times "
            "below their damping terms (bench/kfac_plateau.py), so KFAC moves like momentum "
            "SGD with step lr/damping until they grow; no fixed damping both leaves the "
            "plateau fast and keeps the bottleneck stable (docs/results.md, 'KFAC plateau')")


def _original_curves(problem: str, data_dir: str | None) -> bool:
    """Whether the original CURVES file (not the stand-in) would be used."""
    if problem != "curves-ae" or data_dir is None:
        return False
    from .data import load_curves

    return "original" in load_curves(data_dir, n_train=1, n_test=0).note


_COMMANDS = {"demo": cmd_demo, "run": cmd_run, "grid": cmd_grid, "reproduce": cmd_reproduce,
             "report": cmd_report, "list": cmd_list}


def _dist_timeout_error() -> str | None:
    """Why ``$KBFGS_DIST_TIMEOUT`` is unusable, or None (checked before any training starts)."""
    from .launch import timeout_seconds
    try:
        value = timeout_seconds()
    except (ValueError, OverflowError) as e:
        text = str(e)
        if "KBFGS_DIST_TIMEOUT" not in text:
            text = (f"KBFGS_DIST_TIMEOUT must be a number of seconds > 0, got "
                    f"{os.environ.get('KBFGS_DIST_TIMEOUT')!r} ({text})")
        return text
    if not math.isfinite(value):
        return (f"KBFGS_DIST_TIMEOUT must be a finite number of seconds > 0, got "
                f"{os.environ.get('KBFGS_DIST_TIMEOUT')!r}")
    return None


_TRAINING_COMMANDS = ("demo", "run", "grid", "reproduce")


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``kbfgs`` command line; returns the exit status.

    Bad arguments and bad input (a ValueError or OSError such as a missing file or an
    unwritable ``--out``) end with one ``kbfgs: error: ...`` line on stderr and status 2,
    never a traceback.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command in _TRAINING_COMMANDS:
        why = _dist_timeout_error()
        if why is not None:
            print(f"kbfgs: error: {why}", file=sys.stderr)
            return 2
    try:
        return _COMMANDS[args.command](args)
    except (ValueError, OSError, OverflowError) as e:
        print(f"kbfgs: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted (finished runs are saved; rerun the same command to resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
