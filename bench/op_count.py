#!/usr/bin/env python
"""Operator calls per iteration of every method, by part: a proxy for kernel launches on a GPU.

    python bench/op_count.py --problems mnist-ae,resnet32 --methods sgd-m,adam,kbfgs,kbfgs-t20,kfac

On a GPU every ATen operator call is (at least) one kernel launch of about 5-10 us of host time,
so a part made of many small operators is launch-bound there however little arithmetic it does.
This script counts the non-view calls that reach the ATen dispatcher (``TorchDispatchMode``,
so autograd's backward operators are counted too; views such as slice or reshape launch
nothing and are not counted) over one window of iterations after a warm-up
window, on CPU with a small batch and a tiny learning rate (the count depends on neither), and
splits them by part with the optimizer's own phases (``opt.phases.current``: curvature update and
inverses, preconditioned update, non-finite check; the rest is the closures, i.e. the
forward-backward passes and hooks).
It prints the counts per iteration and writes ``bench/results/op_count-<problem>.json``.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import common

#: optimizer phases (``opt.phases.current``, kbfgs.optim.phases) counted as a part; the calls
#: outside these phases (the closures: forward-backward passes and hooks) are "closure"
PARTS = {"curvature": "curvature", "inverse": "curvature", "precondition": "update",
         "check_finite": "finite"}


class _Counter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.phases: Any = None  # the optimizer's PhaseTimer (None: everything is "closure")
        self.counts: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not getattr(func, "is_view", False):  # views (slice, reshape, t) launch nothing
            current = self.phases.current if self.phases is not None else None
            self.counts[PARTS.get(current, "closure")] += 1
        return func(*args, **(kwargs or {}))


def _wrap(opt: Any, counter: _Counter) -> None:
    """Attribute the calls to the optimizer's phase in progress (``opt.phases.current``)."""
    counter.phases = getattr(opt, "phases", None)


def count(problem: str, label: str, window: int) -> dict[str, Any]:
    import kbfgs

    method = common.METHODS[label]
    factory, x, y, loss_fn = common.PROBLEMS[problem].build(True, torch.device("cpu"), 0,
                                                           batch=8)
    torch.manual_seed(0)
    model = factory().train()
    # a tiny learning rate: the count does not depend on it (the code paths are sync-free and
    # take the same operators whatever the values), and no run diverges over 2 windows
    hps = {**method.hps(common.family(problem)), "lr": 1e-12}
    opt = kbfgs.make_optimizer(method.name, model, **hps)
    closure = common.make_closure(opt, model, x, y, loss_fn)
    for _ in range(window):  # warm-up: layer state exists, KFAC inverses done once
        opt.step(closure)
    counter = _Counter()
    _wrap(opt, counter)
    with counter:
        for _ in range(window):
            opt.step(closure)
    layers = len(getattr(opt, "layers", []))
    per_it = {k: v / window for k, v in sorted(counter.counts.items())}
    return {"method": label, "window": window, "kronecker_layers": layers,
            "per_iteration": per_it, "total_per_iteration": sum(per_it.values())}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--problems", default="mnist-ae,resnet32")
    ap.add_argument("--methods", default="sgd-m,adam,kbfgs,kbfgs-t20,kbfgs-l,kfac,kfac-10-100")
    ap.add_argument("--window", type=int, default=100,
                    help="iterations counted (a multiple of every update period)")
    ap.add_argument("--out", default="bench/results/op_count-{problem}.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for problem in common.split_list(args.problems):
        rows = [count(problem, label, args.window)
                for label in common.resolve_methods(args.methods)]
        print(f"== {problem}: non-view ATen operator calls per iteration (window {args.window})")
        parts = sorted({p for r in rows for p in r["per_iteration"]})
        print(f"{'method':16s} {'total':>8s} " + " ".join(f"{p:>10s}" for p in parts)
              + "  layers")
        for r in rows:
            print(f"{r['method']:16s} {r['total_per_iteration']:8.0f} "
                  + " ".join(f"{r['per_iteration'].get(p, 0.0):10.0f}" for p in parts)
                  + f"  {r['kronecker_layers']}")
        out = Path(args.out.format(problem=problem))
        out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"problem": problem, "rows": rows,
                   "env": common.environment(torch.device("cpu"))}
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(common.json_safe(payload), indent=1))
        tmp.replace(out)
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
