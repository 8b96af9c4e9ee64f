#!/usr/bin/env python
"""Time per iteration and memory of every method, as ratios to SGD-m measured in the same run.

    python bench/step_time.py --problems mnist-ae --quick
    python bench/step_time.py --problems resnet32 --methods sgd-m,kbfgs-t20 --quick --repeats 9

What is measured (docs/performance.md says the same):

* Every method gets its own copy of the model (same initial weights) and optimizer; all live in
  one process. After a warm-up window each, the methods run *interleaved*: repeat r runs one
  window of ``--window`` iterations of every method, in an order rotated by one every repeat
  (A B C, B C A, C A B, ...), so that a burst of load on the machine hits all alike.
* The window is a whole multiple of every update period (T, T1, T2), so each window holds the
  same mix of plain and curvature iterations. Exception, stated in the output: where a KFAC
  inversion period T2 is a multiple of the window but not a divisor (``--quick``: window 20,
  kfac(10,100)), that method runs with T2 = window and its inversion time is rescaled to T2:
  ``t = t_window - (1 - window / T2) * t_inverse`` (t_inverse from its own timer).
* Figures: wall time of the window (``torch.cuda.synchronize()`` before and after on CUDA) over
  its iterations; for each window the ratio to sgd-m's window of the same repeat; the median of
  those ratios over repeats, with min-max and quartiles. The same for the ratios to adam and to
  kfac(1,20) (the targets of issue 5).
* Breakdown per method from the optimizers' own host timers (``opt.stats()["time"]``, deltas
  over the window): forward-backward, extra pass (K-BFGS second pass; KFAC sampled-target pass),
  curvature (K-BFGS H_A/H_G updates; KFAC factor averages + inverses), precondition (momentum,
  P = H_G BUF H_A, the parameter update); for sgd-m / adam the closure time and the rest. On
  CUDA the timers see launch time only (asynchronous kernels): use the CPU breakdown.
* Memory: optimizer state bytes (every tensor of ``state_dict()`` plus ``layer_state``,
  storages once) and the peak memory of training, each method in a fresh subprocess that runs
  one window: on CUDA ``torch.cuda.max_memory_allocated()`` over a window after a warm-up window
  minus what was allocated before the model was built (the data batch); on CPU the growth of the
  process's peak resident set size (``VmHWM`` in /proc/self/status, reset to the current size
  through /proc/self/clear_refs just before the model is built) to the end of the window, so it
  counts parameters, gradients, optimizer state, activations and allocator overhead, but not the
  interpreter, torch or the data. (``ru_maxrss`` is not used: Linux carries the parent's peak
  over fork + exec into the child.)
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch

import common
from common import METHODS, PROBLEMS, Method

REFERENCES = ("sgd-m", "adam", "kfac(1,20)")
BUCKETS = ("fwd_bwd", "extra_pass", "curvature", "precondition", "other")


# --------------------------------------------------------------------------------------------
# One method on one problem
# --------------------------------------------------------------------------------------------


class Runner:
    """A model copy, its optimizer and a fixed batch; runs windows of iterations."""

    def __init__(self, method: Method, problem: str, quick: bool, device: torch.device,
                 window: int, seed: int = 0, data: tuple | None = None) -> None:
        import kbfgs

        self.method = method
        self.device = device
        prob = PROBLEMS[problem]
        factory, x, y, loss_fn = data if data is not None else prob.build(quick, device, seed)
        torch.manual_seed(seed)
        self.model = factory().to(device).train()
        hp = method.hps(common.family(problem))
        self.inv_scale = 1.0
        self.note = ""
        if method.name == "kfac":
            t2 = hp["inv_freq"]
            if window % t2 != 0 and t2 % window == 0:
                self.inv_scale = window / t2
                self.note = (f"run with T2={window} (window {window}); inversion time rescaled "
                             f"by {window}/{t2}")
                hp = {**hp, "inv_freq": window}
        for p in method.periods:
            if (p != method.fixed.get("inv_freq") or self.inv_scale == 1.0) and window % p != 0:
                raise SystemExit(f"--window {window} is not a multiple of the period {p} "
                                 f"of {method.label}")
        self.hp = hp
        self.opt = kbfgs.make_optimizer(method.name, self.model, **hp)
        self.closure_time = [0.0]
        self.closure = common.make_closure(self.opt, self.model, x, y, loss_fn,
                                           self.closure_time)
        self.last_loss = math.nan

    def _timers(self) -> dict[str, float]:
        stats = getattr(self.opt, "stats", None)
        t = {}
        if stats is not None:
            t = dict(stats(condition=False).get("time", {}))
        t["_closure"] = self.closure_time[0]
        return t

    def run(self, steps: int) -> dict[str, Any]:
        common.sync(self.device)
        before = self._timers()
        t0 = time.perf_counter()
        loss = None
        for _ in range(steps):
            loss = self.opt.step(self.closure)
        common.sync(self.device)
        seconds = time.perf_counter() - t0
        after = self._timers()
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        self.last_loss = float(loss.detach()) if loss is not None else math.nan
        if "forward_backward" in d:  # Kronecker optimizers
            curvature = d.get("curvature", 0.0) + d.get("factors", 0.0) + d.get("inverse", 0.0)
            b = {"fwd_bwd": d.get("forward_backward", 0.0),
                 "extra_pass": d.get("extra_pass", 0.0) + d.get("stats_pass", 0.0),
                 "curvature": curvature,
                 "precondition": d.get("precondition", 0.0)}
        else:
            b = {"fwd_bwd": d["_closure"], "extra_pass": 0.0, "curvature": 0.0,
                 "precondition": seconds - d["_closure"]}
        inverse = d.get("inverse", 0.0)
        est = seconds
        if self.inv_scale != 1.0:
            est = seconds - (1.0 - self.inv_scale) * inverse
            b["curvature"] -= (1.0 - self.inv_scale) * inverse
        b["other"] = est - sum(b.values())
        b["hooks"] = d.get("hooks", 0.0)  # part of fwd_bwd / extra_pass
        return {"seconds_raw": seconds, "seconds": est, "steps": steps,
                "per_step": est / steps, "breakdown": b, "inverse_seconds": inverse}

    def stats(self) -> dict[str, Any]:
        s = self.opt.stats(condition=False) if hasattr(self.opt, "stats") else {}
        return {"steps": s.get("steps"), "skipped_steps": s.get("skipped_steps"),
                "curvature_updates": s.get("curvature_updates"),
                "last_loss": self.last_loss}


# --------------------------------------------------------------------------------------------
# Peak memory: one fresh subprocess per method
# --------------------------------------------------------------------------------------------


def _proc_status(key: str) -> int:
    """``VmRSS`` / ``VmHWM`` of /proc/self/status in bytes (0 where unavailable)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _reset_peak_rss() -> bool:
    """Reset the peak resident set size (VmHWM) to the current one (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _touch_runtime() -> None:
    """One tiny training step of a Linear and a Conv2d + BatchNorm model with torch.optim, so
    that torch's one-off lazy allocations (autograd engine, thread pools, BLAS / oneDNN
    buffers, and ~70 MB of torch._dynamo that the first ``torch.optim.Optimizer`` imports) are
    made before the peak is reset and do not count as the optimizer's."""
    import torch.nn as nn

    for m, x in ((nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)), torch.rand(4, 8)),
                 (nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()),
                  torch.rand(2, 3, 8, 8))):
        opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
        m(x).square().sum().backward()
        opt.step()


def memory_child(problem: str, label: str, quick: bool, device: torch.device,
                 window: int, batch: int | None = None) -> dict[str, Any]:
    method = METHODS[label]
    data = PROBLEMS[problem].build(quick, device, batch=batch)
    gc.collect()
    if device.type == "cuda":
        common.sync(device)
        base = torch.cuda.memory_allocated(device)
        r = Runner(method, problem, quick, device, window, data=data)
        r.run(window)
        common.sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        r.run(window)
        common.sync(device)
        peak = torch.cuda.max_memory_allocated(device) - base
        how = "cuda max_memory_allocated over a window after a warm-up window, minus the data"
        extra: dict[str, Any] = {}
    else:
        _touch_runtime()
        gc.collect()
        # Not ru_maxrss: Linux carries the parent's peak over fork + exec into it.
        reset = _reset_peak_rss()
        rss0, hwm0 = _proc_status("VmRSS"), _proc_status("VmHWM")
        r = Runner(method, problem, quick, device, window, data=data)
        r.run(window)
        peak = _proc_status("VmHWM") - rss0
        how = ("growth of the peak resident set size (VmHWM of /proc/self/status, reset with "
               "/proc/self/clear_refs) from before the model is built to the end of one window")
        extra = {"rss_before": rss0, "hwm_before": hwm0, "hwm_reset": reset}
    return {"label": label, "peak_bytes": int(peak), "state_bytes": common.state_bytes(r.opt),
            "param_bytes": common.param_bytes(r.model), "method": how, **extra,
            "stats": r.stats()}


def peak_memory(problem: str, labels: list[str], args: argparse.Namespace
                ) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for label in labels:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--memory-child", label,
               "--problems", problem, "--device", args.device, "--window", str(args.window),
               "--threads", str(args.threads)]
        if args.quick:
            cmd.append("--quick")
        if args.batch is not None:
            cmd += ["--batch", str(args.batch)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"  peak memory of {label} failed:\n{r.stderr[-2000:]}", file=sys.stderr)
            out[label] = {"error": r.stderr[-2000:]}
            continue
        out[label] = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"  peak memory {label:14s} {out[label]['peak_bytes'] / 2**20:9.1f} MiB", flush=True)
    return out


# --------------------------------------------------------------------------------------------
# Profile of one method (torch.profiler, CPU activity; CUDA activity too on a GPU)
# --------------------------------------------------------------------------------------------

def _annotate(runner: Runner) -> None:
    """Label the two closure calls of a step in the profile. The optimizers' own phases appear
    as ``kbfgs::<phase>`` ranges (``forward_backward``, ``check_finite``, ``precondition``,
    ``extra_pass``, ``curvature``, ``inverse``), emitted by ``kbfgs.optim.phases.PhaseTimer``
    while a profiler runs; no optimizer method is patched."""
    from torch.profiler import record_function

    opt = runner.opt
    closure = runner.closure
    calls = [0]
    step = opt.step

    def step_wrapped(c=None):
        calls[0] = 0
        return step(c)

    def closure_wrapped():
        calls[0] += 1
        with record_function("closure#1 fwd-bwd" if calls[0] == 1 else "closure#2 extra pass"):
            return closure()

    opt.step = step_wrapped  # type: ignore[method-assign]
    runner.closure = closure_wrapped


def profile_method(problem: str, label: str, args: argparse.Namespace,
                   device: torch.device) -> dict[str, Any]:
    from torch.profiler import ProfilerActivity, profile

    env = common.environment(device)
    data = PROBLEMS[problem].build(args.quick, device, batch=args.batch)
    r = Runner(METHODS[label], problem, args.quick, device, args.window, data=data)
    for _ in range(max(args.warmup, 1)):
        r.run(args.window)
    plain = r.run(args.window)  # timed without the profiler
    _annotate(r)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        t = r.run(args.window)
    n = args.window
    ka = prof.key_averages()
    rows = []
    for e in ka:
        rows.append({"name": e.key, "calls_per_it": e.count / n,
                     "self_ms_per_it": e.self_cpu_time_total / 1e3 / n,
                     "total_ms_per_it": e.cpu_time_total / 1e3 / n,
                     "self_device_ms_per_it": getattr(e, "self_device_time_total", 0) / 1e3 / n})
    rows.sort(key=lambda x: -x["self_ms_per_it"])
    self_sum = sum(x["self_ms_per_it"] for x in rows)
    ops = [x for x in rows if not x["name"].startswith(("opt::", "capture::", "closure#",
                                                        "Optimizer.", "## "))]
    res = {"benchmark": "profile", "problem": problem, "method": label, "quick": args.quick,
           "batch": int(data[1].shape[0]), "window": n, "environment": env,
           "plain_ms_per_it": plain["per_step"] * 1e3,
           "profiled_ms_per_it": t["per_step"] * 1e3,
           "profiled_breakdown_ms_per_it": {k: v * 1e3 / n for k, v in t["breakdown"].items()},
           "sum_self_ms_per_it": self_sum,
           "aten_ops_per_it": sum(x["calls_per_it"] for x in ops if x["name"].startswith("aten::")),
           "rows": rows}
    res["environment"]["loadavg_end"] = common.loadavg()
    print(f"== profile {label} on {problem} (batch {res['batch']}, {n} iterations, "
          f"{torch.get_num_threads()} threads, load {env['loadavg_start']})")
    print(f"   {plain['per_step'] * 1e3:.1f} ms/it without the profiler, "
          f"{t['per_step'] * 1e3:.1f} with it; {res['aten_ops_per_it']:.0f} aten calls/it")
    print(f"{'name':44s} {'calls/it':>9s} {'self ms/it':>10s} {'total ms/it':>11s}")
    for x in rows[:args.top]:
        print(f"{x['name'][:44]:44s} {x['calls_per_it']:9.1f} {x['self_ms_per_it']:10.2f} "
              f"{x['total_ms_per_it']:11.2f}")
    return res


# --------------------------------------------------------------------------------------------
# The benchmark
# --------------------------------------------------------------------------------------------


def bench_problem(problem: str, labels: list[str], args: argparse.Namespace,
                  device: torch.device) -> dict[str, Any]:
    env = common.environment(device)
    prob = PROBLEMS[problem]
    data = prob.build(args.quick, device, batch=args.batch)
    runners = {lab: Runner(METHODS[lab], problem, args.quick, device, args.window, data=data)
               for lab in labels}
    print(f"== {problem}: batch {data[1].shape[0]}, window {args.window}, repeats "
          f"{args.repeats}, device {device} ({env['device_name']}), threads "
          f"{torch.get_num_threads()}, load {env['loadavg_start']}", flush=True)
    for r in runners.values():  # warm-up: allocations, first curvature/inverse updates
        for _ in range(args.warmup):
            r.run(args.window)
    windows = []
    for rep in range(args.repeats):
        k = rep % len(labels)
        order = labels[k:] + labels[:k]
        times = {lab: runners[lab].run(args.window) for lab in order}
        windows.append({"repeat": rep, "order": order, "loadavg": common.loadavg(),
                        "times": times})
        line = " ".join(f"{lab}={times[lab]['per_step'] * 1e3:.1f}" for lab in labels)
        print(f"  repeat {rep}: ms/step {line}", flush=True)
    env["loadavg_end"] = common.loadavg()

    summary: dict[str, Any] = {}
    for lab in labels:
        per_step = [w["times"][lab]["per_step"] for w in windows]
        bd = {b: common.spread([w["times"][lab]["breakdown"][b] / args.window
                                for w in windows])["median"] for b in BUCKETS + ("hooks",)}
        ratios = {}
        for ref in REFERENCES:
            if ref in labels:
                ratios[ref] = common.spread([w["times"][lab]["per_step"]
                                             / w["times"][ref]["per_step"] for w in windows])
        summary[lab] = {"per_step": common.spread(per_step),
                        "mean_per_step": sum(per_step) / len(per_step),
                        "breakdown_per_step_median": bd, "ratio": ratios,
                        "hp": runners[lab].hp, "note": runners[lab].note,
                        "state_bytes": common.state_bytes(runners[lab].opt),
                        "stats": runners[lab].stats()}
    state_ref = summary["sgd-m"]["state_bytes"] if "sgd-m" in summary else None
    for lab in labels:
        s = summary[lab]
        s["state_ratio"] = s["state_bytes"] / state_ref if state_ref else None
        if s["stats"].get("skipped_steps"):
            print(f"  WARNING: {lab} skipped {s['stats']['skipped_steps']} steps (non-finite)",
                  file=sys.stderr)
    result = {"benchmark": "step_time", "problem": problem, "quick": args.quick,
              "batch": int(data[1].shape[0]), "window": args.window, "repeats": args.repeats,
              "warmup_windows": args.warmup, "environment": env,
              "param_bytes": common.param_bytes(runners[labels[0]].model),
              "methods": {lab: {"optimizer": METHODS[lab].name, "hp": runners[lab].hp,
                                "periods": METHODS[lab].periods, "note": runners[lab].note}
                          for lab in labels},
              "summary": summary, "windows": windows}
    del runners
    gc.collect()
    if not args.no_peak:
        result["peak_memory"] = peak_table(problem, labels, args)
    return result


def peak_table(problem: str, labels: list[str], args: argparse.Namespace
               ) -> dict[str, dict[str, Any]]:
    mem = peak_memory(problem, labels, args)
    ref = mem.get("sgd-m", {}).get("peak_bytes")
    for m in mem.values():
        if "peak_bytes" in m and ref:
            m["peak_ratio"] = m["peak_bytes"] / ref
    return mem


def print_table(res: dict[str, Any]) -> None:
    s = res["summary"]
    mem = res.get("peak_memory", {})
    print(f"\n{res['problem']} ({'quick, ' if res['quick'] else ''}batch {res['batch']}, "
          f"{res['environment']['device_name']}, {res['environment']['threads']} threads); "
          f"medians over {res['repeats']} windows of {res['window']} iterations")
    hdr = (f"{'method':14s} {'ms/it':>8s} {'/sgd-m':>6s} {'[min-max]':>13s} {'fb':>7s} "
           f"{'extra':>6s} {'curv':>6s} {'prec':>6s} {'other':>6s} {'stateMiB':>8s} "
           f"{'/sgd':>5s} {'peakMiB':>8s} {'/sgd':>5s}")
    print(hdr)
    for lab, v in s.items():
        r = v["ratio"].get("sgd-m", {})
        b = v["breakdown_per_step_median"]
        pk = mem.get(lab, {})
        print(f"{lab:14s} {v['per_step']['median'] * 1e3:8.1f} {r.get('median', math.nan):6.2f} "
              f"[{r.get('min', math.nan):.2f}-{r.get('max', math.nan):.2f}]".ljust(48)
              + f" {b['fwd_bwd'] * 1e3:7.1f} {b['extra_pass'] * 1e3:6.1f} "
              f"{b['curvature'] * 1e3:6.1f} {b['precondition'] * 1e3:6.1f} "
              f"{b['other'] * 1e3:6.1f} {v['state_bytes'] / 2**20:8.2f} "
              f"{(v['state_ratio'] or math.nan):5.2f} "
              f"{pk.get('peak_bytes', math.nan) / 2**20:8.1f} "
              f"{pk.get('peak_ratio', math.nan):5.2f}")
    for ref in ("adam", "kfac(1,20)"):
        for lab, v in s.items():
            if lab.startswith("kbfgs") and ref in v["ratio"]:
                r = v["ratio"][ref]
                print(f"  {lab} / {ref}: median {r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", default="mnist-ae",
                    help=f"comma-separated: {', '.join(PROBLEMS)} (default mnist-ae)")
    ap.add_argument("--methods", default="all",
                    help=f"comma-separated labels or aliases, or 'all': {', '.join(METHODS)}; "
                         "sgd-m is always added")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved windows per method")
    ap.add_argument("--window", type=int, default=None,
                    help="iterations per window (default 100, --quick 20)")
    ap.add_argument("--warmup", type=int, default=1, help="warm-up windows per method")
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument("--quick", action="store_true",
                    help="CPU sizes: CNN batch 32 (resnet32) / 16 (vgg16), window 20")
    ap.add_argument("--batch", type=int, default=None,
                    help="override the batch size (tests; the figures use the defaults)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default bench/results/step_time-<problem>-<device>"
                         "[-quick].json); with several problems, {problem} is replaced")
    ap.add_argument("--no-peak", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--peak-only", action="store_true",
                    help="only the peak-memory subprocesses; replaces 'peak_memory' in the "
                         "--out JSON if it exists")
    ap.add_argument("--profile", default=None, metavar="METHOD",
                    help="instead of the benchmark: torch.profiler of one window of METHOD; "
                         "prints the top ops by self CPU time and writes "
                         "bench/results/profile-<problem>-<method>-<device>.json")
    ap.add_argument("--top", type=int, default=30, help="rows printed by --profile")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.window is None:
        args.window = 20 if args.quick else 100
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch.cuda.is_available() is False")
    problems = [p.strip() for p in args.problems.split(",") if p.strip()]
    for p in problems:
        if p not in PROBLEMS:
            raise SystemExit(f"unknown problem {p!r}; valid: {', '.join(PROBLEMS)}")
    if args.memory_child is not None:
        print(json.dumps(common.json_safe(memory_child(problems[0], args.memory_child,
                                                       args.quick, device, args.window,
                                                       args.batch))))
        return 0
    if args.profile is not None:
        label = common.resolve_methods(args.profile)[-1]
        for problem in problems:
            res = profile_method(problem, label, args, device)
            slug = label.replace("(", "-").replace(")", "").replace(",", "-").replace("=", "")
            out = args.out or str(common.ROOT / "bench" / "results" /
                                  f"profile-{problem}-{slug}-{device.type}"
                                  f"{'-quick' if args.quick else ''}.json")
            out = out.replace("{problem}", problem)
            Path(out).write_text(json.dumps(common.json_safe(res), indent=1))
            print(f"wrote {out}")
        return 0
    labels = common.resolve_methods(args.methods)
    for problem in problems:
        dev = device.type
        out = args.out or str(common.ROOT / "bench" / "results" /
                              f"step_time-{problem}-{dev}{'-quick' if args.quick else ''}.json")
        out = out.replace("{problem}", problem)
        if args.peak_only:
            old = json.loads(Path(out).read_text()) if Path(out).exists() else {
                "benchmark": "step_time", "problem": problem, "quick": args.quick}
            old["peak_memory"] = peak_table(problem, labels, args)
            old["peak_environment"] = {**common.environment(device),
                                       "loadavg_end": common.loadavg()}
            Path(out).write_text(json.dumps(common.json_safe(old), indent=1))
            print(f"wrote {out}")
            continue
        res = bench_problem(problem, labels, args, device)
        print_table(res)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(common.json_safe(res), indent=1))
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
