"""Shared pieces of the benchmarks: problems, method table, closures, state bytes, environment.

Used by ``bench/step_time.py`` and ``bench/time_to_loss.py`` (run them as scripts from the
repository root; this file is imported by path, it is not part of the ``kbfgs`` package).
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------------------------
# Problems of the step-time benchmark (random data: the cost of an iteration does not depend on
# the values, and random data needs no download)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShapeProblem:
    name: str
    batch: int
    quick_batch: int
    likelihood: str  # KFAC's sampling distribution

    def build(self, quick: bool, device: torch.device, seed: int = 0, batch: int | None = None
              ) -> tuple[Callable[[], nn.Module], Tensor, Tensor,
                         Callable[[Tensor, Tensor], Tensor]]:
        """(model factory, inputs, targets, batch-mean loss) on ``device``."""
        from kbfgs.experiments import models

        g = torch.Generator().manual_seed(seed)
        m = batch or (self.quick_batch if quick else self.batch)
        if self.name == "mnist-ae":
            x = torch.rand(m, 784, generator=g)
            y = x
            factory: Callable[[], nn.Module] = models.mnist_autoencoder
            loss = bce_sum_mean
        elif self.name == "tiny-ae":  # smoke tests only
            x = torch.rand(m, 64, generator=g)
            y = x
            factory = partial(models.autoencoder, (64, 32, 8, 32, 64))
            loss = bce_sum_mean
        elif self.name in ("resnet32", "vgg16"):
            x = torch.randn(m, 3, 32, 32, generator=g)
            y = torch.randint(0, 10, (m,), generator=g)
            if self.name == "resnet32":
                factory = partial(models.resnet32, 3, 10)
            else:
                factory = partial(models.vgg16_bn, 3, 10, 32)
            loss = F.cross_entropy
        else:  # pragma: no cover - guarded by PROBLEMS
            raise ValueError(self.name)
        return factory, x.to(device), y.to(device), loss


def bce_sum_mean(out: Tensor, target: Tensor) -> Tensor:
    """Binary cross entropy with logits, summed over pixels, mean over the batch."""
    return F.binary_cross_entropy_with_logits(out, target, reduction="sum") / out.shape[0]


PROBLEMS: dict[str, ShapeProblem] = {
    "mnist-ae": ShapeProblem("mnist-ae", 1000, 1000, "bernoulli"),
    "resnet32": ShapeProblem("resnet32", 128, 32, "categorical"),
    "vgg16": ShapeProblem("vgg16", 128, 16, "categorical"),
    "tiny-ae": ShapeProblem("tiny-ae", 16, 16, "bernoulli"),  # 64-32-8-32-64, smoke tests
}

# --------------------------------------------------------------------------------------------
# Methods: label -> (make_optimizer name, hyper-parameters per problem family)
# --------------------------------------------------------------------------------------------


@dataclass
class Method:
    label: str
    name: str  # kbfgs.make_optimizer name
    fixed: dict[str, Any]  # update frequencies, history
    periods: tuple[int, ...]  # every update period (the window must be a multiple of each)

    def hps(self, family: str) -> dict[str, Any]:
        """Hyper-parameters: the problems' defaults for the family (autoencoder: ``fmnist-ae``'s,
        i.e. Table 6 MNIST with the Fashion-MNIST changes; cnn: ``resnet32-cifar10``'s, Table 8),
        which keep every method finite on the random data of the step-time benchmark (checked:
        no skipped step), with this configuration's update frequencies on top."""
        return {**family_hps(family)[self.name], **self.fixed}


#: family -> the problem whose defaults the benchmarks use (kbfgs.experiments.problems, which
#: reads the paper's Tables 6 and 8 from kbfgs.experiments.paper)
FAMILY_PROBLEM = {"ae": "fmnist-ae", "cnn": "resnet32-cifar10"}
#: the keys taken from a problem's defaults (momentum 0.9 and the update frequencies are the
#: optimizers' defaults or each configuration's ``fixed``)
_HP_KEYS = ("lr", "damping", "weight_decay", "likelihood")
#: methods without a value in the paper's table for the family
_EXTRA_HPS: dict[str, dict[str, dict[str, Any]]] = {
    # kbfgs-20 is not in Table 8; double damping needs lambda_G = sqrt(damping) <= 1: K-BFGS's
    # 1e3 is not allowed
    "cnn": {"kbfgs-20": {"lr": 0.1, "weight_decay": 1e-5, "damping": 1.0}},
}


def family_hps(family: str) -> dict[str, dict[str, Any]]:
    """make_optimizer name -> hyper-parameters of the benchmarks' ``family`` ("ae", "cnn")."""
    from kbfgs.experiments.problems import get_problem

    problem = get_problem(FAMILY_PROBLEM[family])
    out: dict[str, dict[str, Any]] = {}
    for name in ("sgd-m", "adam", "kbfgs", "kbfgs-l", "kbfgs-20", "kfac", "kbfgs-plus"):
        if name not in problem.hps:
            continue
        hp = {k: v for k, v in problem.defaults(name).items() if k in _HP_KEYS}
        if hp.get("weight_decay") == 0.0:
            del hp["weight_decay"]
        out[name] = hp
    out.update(_EXTRA_HPS.get(family, {}))
    return out


METHODS: dict[str, Method] = {m.label: m for m in [
    Method("sgd-m", "sgd-m", {}, (1,)),
    Method("adam", "adam", {}, (1,)),
    Method("kbfgs(T=1)", "kbfgs", {"update_freq": 1}, (1,)),
    Method("kbfgs(T=20)", "kbfgs", {"update_freq": 20}, (20,)),
    Method("kbfgs-l(T=20)", "kbfgs-l", {"update_freq": 20, "history": 100}, (20,)),
    Method("kbfgs-l(T=1)", "kbfgs-l", {"update_freq": 1, "history": 100}, (1,)),
    Method("kbfgs-20(T=1)", "kbfgs-20", {"update_freq": 1}, (1,)),
    Method("kfac(1,20)", "kfac", {"stat_freq": 1, "inv_freq": 20}, (1, 20)),
    Method("kbfgs-plus(T=3)", "kbfgs-plus", {"update_freq": 3}, (3,)),
    Method("kbfgs-plus(T=20)", "kbfgs-plus", {"update_freq": 20}, (20,)),
    Method("kbfgs-plus(T=5)", "kbfgs-plus", {"update_freq": 5}, (5,)),
    Method("kbfgs-plus(T=1)", "kbfgs-plus", {"update_freq": 1}, (1,)),
    Method("kbfgs-plus-fisher(T=20)", "kbfgs-plus", {"update_freq": 20, "fisher_G": True},
           (20,)),
    # the heavy-ball form measured before Nesterov became the default, and the row graft option
    Method("kbfgs-plus-hb(T=3)", "kbfgs-plus", {"update_freq": 3, "nesterov": False}, (3,)),
    Method("kbfgs-plus-hb(T=20)", "kbfgs-plus", {"update_freq": 20, "nesterov": False}, (20,)),
    Method("kbfgs-plus-row(T=20)", "kbfgs-plus", {"update_freq": 20, "graft": "row"}, (20,)),
    Method("kbfgs-plus-extra(T=3)", "kbfgs-plus", {"update_freq": 3, "closure_free": False},
           (3,)),
    Method("kbfgs-plus-extra(T=20)", "kbfgs-plus", {"update_freq": 20, "closure_free": False},
           (20,)),
    Method("kfac(10,100)", "kfac", {"stat_freq": 10, "inv_freq": 100}, (10, 100)),
]}
#: short command-line aliases
ALIASES = {
    "kbfgs": "kbfgs(T=1)", "kbfgs-t1": "kbfgs(T=1)", "kbfgs-t20": "kbfgs(T=20)",
    "kbfgs-l": "kbfgs-l(T=20)", "kbfgs-l1": "kbfgs-l(T=1)", "kbfgs-l-t20": "kbfgs-l(T=20)",
    "kbfgs-20": "kbfgs-20(T=1)",
    "kfac": "kfac(1,20)", "kfac-1-20": "kfac(1,20)", "kfac-10-100": "kfac(10,100)",
    "kbfgs-plus": "kbfgs-plus(T=3)", "kbfgs-plus-t20": "kbfgs-plus(T=20)",
    "kbfgs-plus-t1": "kbfgs-plus(T=1)", "kbfgs-plus-t5": "kbfgs-plus(T=5)",
    "kbfgs-plus-fisher-t20": "kbfgs-plus-fisher(T=20)",
    "kbfgs-plus-extra": "kbfgs-plus-extra(T=3)",
    "kbfgs-plus-extra-t20": "kbfgs-plus-extra(T=20)",
    "kbfgs-plus-hb": "kbfgs-plus-hb(T=3)", "kbfgs-plus-hb-t20": "kbfgs-plus-hb(T=20)",
    "kbfgs-plus-row-t20": "kbfgs-plus-row(T=20)",
}


def resolve_methods(spec: str) -> list[str]:
    """Comma-separated labels or aliases ("all" = every method) -> labels, sgd-m first."""
    if spec == "all":
        return list(METHODS)
    out = []
    for s in split_list(spec):
        s = s.strip()
        if not s:
            continue
        lab = ALIASES.get(s, s)
        if lab not in METHODS:
            raise SystemExit(f"unknown method {s!r}; valid: {', '.join(METHODS)} "
                             f"(aliases {', '.join(ALIASES)})")
        if lab not in out:
            out.append(lab)
    if "sgd-m" not in out:
        out.insert(0, "sgd-m")  # every ratio is to sgd-m measured in the same window
    return out


def split_list(spec: str) -> list[str]:
    """Split on the commas that are not inside parentheses ("sgd-m,kfac(1,20)")."""
    import re

    return [s.strip() for s in re.split(r",(?![^()]*\))", spec) if s.strip()]


def family(problem: str) -> str:
    return "ae" if problem.endswith("-ae") else "cnn"


def make_closure(opt: torch.optim.Optimizer, model: nn.Module, x: Tensor, y: Tensor,
                 loss_fn: Callable[[Tensor, Tensor], Tensor], timer: list | None = None
                 ) -> Callable[[], Tensor]:
    """The closure every optimizer of the package takes; ``timer`` (a one-element list)
    accumulates the host seconds spent inside it."""
    import time

    def closure() -> Tensor:
        t0 = time.perf_counter() if timer is not None else 0.0
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), y)
        loss.backward()
        if timer is not None:
            timer[0] += time.perf_counter() - t0
        return loss

    return closure


# --------------------------------------------------------------------------------------------
# Optimizer state bytes
# --------------------------------------------------------------------------------------------


def _tensors(obj: Any, out: list[Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    if isinstance(obj, Tensor):
        out.append(obj)
        return
    if isinstance(obj, dict):
        seen.add(id(obj))
        for v in obj.values():
            _tensors(v, out, seen)
    elif isinstance(obj, (list, tuple)):
        seen.add(id(obj))
        for v in obj:
            _tensors(v, out, seen)


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor of ``opt.state_dict()`` (recursively) plus, for the Kronecker
    optimizers, every tensor of ``opt.layer_state`` (caches such as the compact L-BFGS factors
    included); storages counted once (views and shared tensors deduplicated)."""
    tensors: list[Tensor] = []
    _tensors(opt.state_dict(), tensors, set())
    _tensors(getattr(opt, "layer_state", {}), tensors, set())
    storages: dict[tuple[str, int], int] = {}
    for t in tensors:
        st = t.untyped_storage()
        key = (str(t.device), st.data_ptr())
        if st.data_ptr() == 0:  # empty tensors
            continue
        storages[key] = max(storages.get(key, 0), st.nbytes())
    return int(sum(storages.values()))


def param_bytes(model: nn.Module) -> int:
    return int(sum(p.numel() * p.element_size() for p in model.parameters()))


# --------------------------------------------------------------------------------------------
# Statistics and environment
# --------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float]:
    """median, min, max, quartiles (inclusive method) of a list."""
    v = sorted(values)
    if not v:
        return {}
    q = statistics.quantiles(v, n=4, method="inclusive") if len(v) > 1 else [v[0]] * 3
    return {"median": statistics.median(v), "min": v[0], "max": v[-1], "q1": q[0], "q3": q[2],
            "n": len(v)}


def loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def git_commit() -> dict[str, Any]:
    """Commit of this checkout and the changes under src/ (kbfgs.experiments.results)."""
    from kbfgs.experiments.results import git_info

    info = git_info(ROOT, pathspec="src", changes=True)
    return {"commit": info["commit"], "src_dirty": info.get("dirty"),
            "src_changes": info.get("changes")}


def environment(device: torch.device) -> dict[str, Any]:
    env: dict[str, Any] = {
        "device": str(device),
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "git": git_commit(),
        "argv": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "loadavg_start": loadavg(),
    }
    return env


def _device_name(device: torch.device) -> str:
    from kbfgs.experiments.results import device_name

    return device_name(device)


def json_safe(obj: Any) -> Any:
    """Non-finite floats as None, tensors as lists (kbfgs.experiments.results.json_safe)."""
    from kbfgs.experiments.results import json_safe as safe

    return safe(obj)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timer:
    """Accumulated host seconds (a list so that closures can add to it)."""

    acc: list = field(default_factory=lambda: [0.0])

    @property
    def seconds(self) -> float:
        return self.acc[0]


# --------------------------------------------------------------------------------------------
# py-spy: summary of a collapsed-stack file (``py-spy record --format raw``)
# --------------------------------------------------------------------------------------------


def pyspy_summary(path: str, top: int = 25, focus: str = "") -> dict[str, Any]:
    """Self and inclusive sample shares per frame of a ``py-spy record --format raw`` file.

    Frames are ``function (file:line)``; the line number is dropped so that a function is one
    row. ``focus``: keep only the stacks that contain a frame with this text (e.g. ``step``).
    """
    import collections
    import re

    self_c: collections.Counter = collections.Counter()
    incl_c: collections.Counter = collections.Counter()
    total = 0
    for line in Path(path).read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        if focus and focus not in stack:
            continue
        count = int(n)
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        total += count
        self_c[frames[-1]] += count
        for f in set(frames):
            incl_c[f] += count
    share = (lambda c: c / total) if total else (lambda c: 0.0)
    return {"samples": total,
            "self": [(f, share(c)) for f, c in self_c.most_common(top)],
            "inclusive": [(f, share(c)) for f, c in incl_c.most_common(top)]}


# --------------------------------------------------------------------------------------------
# Markdown tables of the result files (docs/performance.md)
# --------------------------------------------------------------------------------------------


def _fmt_spread(r: dict | None, digits: int = 2) -> str:
    if not r:
        return "-"
    return f"{r['median']:.{digits}f} [{r['min']:.{digits}f}-{r['max']:.{digits}f}]"


def markdown_step_time(path: str) -> str:
    import json

    res = json.loads(Path(path).read_text())
    env = res["environment"]
    mem = res.get("peak_memory", {})
    lines = [
        (f"`{Path(path).name}`: {res['problem']}, batch {res['batch']}, "
        f"{'quick, ' if res['quick'] else ''}{env['device_name']}, {env['threads']} thread(s), "
        f"torch {env['torch']}, commit {str(env['git']['commit'])[:10]}"
        f"{' + uncommitted src changes' if env['git'].get('src_dirty') else ''}, "
        f"load average {env['loadavg_start']} -> {env.get('loadavg_end')}; medians over "
        f"{res['repeats']} interleaved windows of {res['window']} iterations."),
        "",
        ("| method | ms/it | / sgd-m, median [min-max] | fwd-bwd | extra pass | curvature "
        "| precondition | other | state MiB (/ sgd-m) | peak MiB (/ sgd-m) |"),
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lab, v in res["summary"].items():
        b = v["breakdown_per_step_median"]
        pk = mem.get(lab, {})
        peak = (f"{pk['peak_bytes'] / 2**20:.1f} ({pk.get('peak_ratio', float('nan')):.2f})"
                if "peak_bytes" in pk else "-")
        lines.append(
            f"| {lab} | {v['per_step']['median'] * 1e3:.1f} "
            f"| {_fmt_spread(v['ratio'].get('sgd-m'))} "
            f"| {b['fwd_bwd'] * 1e3:.1f} | {b['extra_pass'] * 1e3:.1f} "
            f"| {b['curvature'] * 1e3:.1f} "
            f"| {b['precondition'] * 1e3:.1f} | {b['other'] * 1e3:.1f} "
            f"| {v['state_bytes'] / 2**20:.2f} ({v['state_ratio']:.2f}) | {peak} |")
    extra = []
    for ref in ("adam", "kfac(1,20)"):
        for lab, v in res["summary"].items():
            if lab.startswith("kbfgs") and ref in v["ratio"]:
                extra.append(f"{lab} / {ref} = {_fmt_spread(v['ratio'][ref], 3)}")
    if extra:
        lines += ["", "Other ratios (median [min-max] of the per-window ratios): "
                  + "; ".join(extra) + "."]
    notes = [f"{lab}: {m['note']}" for lab, m in res.get("methods", {}).items() if m.get("note")]
    if notes:
        lines += ["", "Notes: " + "; ".join(notes) + "."]
    return "\n".join(lines)


def markdown_time_to_loss(path: str) -> str:
    import json

    res = json.loads(Path(path).read_text())
    env = res["environment"]
    tg = res["targets"]
    lines = [
        (f"`{Path(path).name}`: {res['problem']} ({res['n_train']} images, batch {res['batch']}), "
        f"budget {res['budget_process_s']:g} process-seconds per method, {env['threads']} "
        f"thread(s), commit {str(env['git']['commit'])[:10]}, load average "
        f"{env['loadavg_start']} -> {env.get('loadavg_end')}; loss evaluated on "
        f"{res['eval_size']} training images every {res['chunk']} iterations."),
        "",
        "| method | hyper-parameters | " + " | ".join(f"<= {t:g}" for t in tg)
        + " | final loss | iterations | process ms/it |",
        "|---|---|" + "---:|" * (len(tg) + 3),
    ]
    for lab, r in res["table"].items():
        hp = ", ".join(f"{k}={v}" for k, v in res["methods"][lab]["hp"].items())
        cells = " | ".join("-" if r["time_to_target"][str(float(t))] is None
                           else f"{r['time_to_target'][str(float(t))]:.1f}" for t in tg)
        final = "diverged" if r["diverged"] else f"{r['final_loss']:.2f}"
        lines.append(f"| {lab} | {hp} | {cells} | {final} | {r['steps']} "
                     f"| {r['process_per_step_ms']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python bench/common.py pyspy-summary FILE [TOP] [FOCUS]
    if len(sys.argv) >= 3 and sys.argv[1] == "markdown":
        import json as _json

        for f in sys.argv[2:]:
            kind = _json.loads(Path(f).read_text()).get("benchmark")
            print(markdown_time_to_loss(f) if kind == "time_to_loss" else markdown_step_time(f))
            print()
        sys.exit(0)
    if len(sys.argv) >= 3 and sys.argv[1] == "pyspy-summary":
        s = pyspy_summary(sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 25,
                          sys.argv[4] if len(sys.argv) > 4 else "")
        print(f"{s['samples']} samples")
        for kind in ("self", "inclusive"):
            print(f"--- {kind}")
            for f, v in s[kind]:
                print(f"{100 * v:6.1f}%  {f[:150]}")
    else:
        print("usage: python bench/common.py pyspy-summary FILE [TOP] [FOCUS]\n"
              "       python bench/common.py markdown RESULT.json...")
