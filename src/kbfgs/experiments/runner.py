"""One training run of a named problem with one method, measured as the paper measures it.

The budget is *process time* (``time.process_time``: CPU time of every thread of this
process), counting only training: the optimizer's warm start, the evaluations and the logging
are excluded (Appendix D.1). Every run writes one JSON result file, atomically (a temporary file
then ``os.replace``), so a directory of results is always consistent and an interrupted grid can
resume by skipping the files that exist.

The training loop lives in :func:`train`; data sharding and rank checks (for a later
``torch.distributed`` version) belong in :func:`_epoch_order` and :func:`_is_main_process`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import distributed
from .problems import (
    METHOD_FACTORY,
    METHOD_HPS,
    Problem,
    check_method,
    get_problem,
    loss_fn,
    prepare_inputs,
)

__all__ = [
    "RESULT_SCHEMA",
    "RunSpec",
    "evaluate",
    "load_problem_data",
    "load_result",
    "make_method_optimizer",
    "resolve_hps",
    "result_path",
    "run",
    "train",
    "write_json_atomic",
]

RESULT_SCHEMA = 1
_DIVERGED_AFTER = 5  # consecutive non-finite minibatch losses that end a run


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
    #: write a resumable checkpoint every this many epochs (None: none); see :func:`run`
    checkpoint_every: int | None = None

    def key(self) -> dict[str, Any]:
        """The fields that make a run distinct (data location, device, threads and checkpoint
        frequency excluded: they do not change the result)."""
        d = dataclasses.asdict(self)
        for k in NON_KEY_FIELDS:
            d.pop(k)
        d["hps"] = dict(sorted(d["hps"].items()))
        return d

    def run_id(self) -> str:
        blob = json.dumps(self.key(), sort_keys=True, default=str)
        digest = hashlib.sha1(blob.encode()).hexdigest()[:8]
        tag = "_".join(f"{_HP_ABBREV.get(k, k)}{_fmt(v)}" for k, v in sorted(self.hps.items())
                       if k in ("lr", "damping", "weight_decay", "update_freq"))
        return f"{self.problem}__{self.method}__{tag}__{digest}__seed{self.seed}"


_HP_ABBREV = {"lr": "lr", "damping": "d", "weight_decay": "wd", "update_freq": "T"}

#: RunSpec fields that do not change a run's result (left out of its key and of report groups)
NON_KEY_FIELDS = ("data_dir", "device", "threads", "checkpoint_every")


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def result_path(out_dir: str | os.PathLike, spec: RunSpec) -> Path:
    return Path(out_dir) / f"{spec.run_id()}.json"


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


# --------------------------------------------------------------------------------------------
# Optimizers
# --------------------------------------------------------------------------------------------


def make_method_optimizer(method: str, model: nn.Module, hps: dict[str, Any],
                          seed: int | None = None) -> torch.optim.Optimizer:
    """The optimizer of ``method`` with ``hps`` (via ``kbfgs.make_optimizer``).

    ``seed`` seeds KFAC's sampled targets (so that seeds differ there too).
    """
    from ..optim.factory import make_optimizer

    check_method(method)
    extra = {"seed": seed} if method == "kfac" and seed is not None else {}
    return make_optimizer(METHOD_FACTORY[method], model, **hps, **extra)


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------


@dataclass
class ProblemData:
    """Tensors of a problem on the training device."""

    x_train: Tensor
    y_train: Tensor | None
    x_val: Tensor | None
    y_val: Tensor | None
    note: str
    fill: Tensor | None = None  # padding value per channel for the crop augmentation


_DATA_CACHE: dict[tuple, ProblemData] = {}


def load_problem_data(problem: Problem, data_dir: str | None = None,
                      subset: int | None = None, device: str = "cpu") -> ProblemData:
    """Load (and cache per process) the data of ``problem`` on ``device``."""
    key = (problem.dataset, data_dir, subset, str(device), problem.image_shape)
    if key in _DATA_CACHE:
        return _DATA_CACHE[key]
    from . import data as _data

    kw: dict[str, Any] = {}
    if problem.dataset == "curves" and subset is not None and subset >= 1:
        # The stand-in generator is sequential: generating N images gives the first N of the
        # full set, without generating the other 30,000 (only used when no file is found).
        kw = {"n_train": subset, "n_test": min(subset, 10_000)}
    ds = _data.load_dataset(problem.dataset, data_dir, **kw)
    x, y = ds.x_train, ds.y_train
    xv, yv = ds.x_test, ds.y_test
    note = ds.note
    if subset is not None:
        if subset < 1:
            raise ValueError(f"--subset must be >= 1, got {subset}")
        x = x[:subset]
        y = y[:subset] if y is not None else None
        if xv is not None:
            xv = xv[:subset]
            yv = yv[:subset] if yv is not None else None
        note += f"; subset: first {x.shape[0]} training samples"
        if xv is not None:
            note += f" and first {xv.shape[0]} validation samples"
    dev = torch.device(device)
    x = prepare_inputs(problem, x).to(dev)
    xv = prepare_inputs(problem, xv).to(dev) if xv is not None else None
    fill = None
    if problem.augment:
        mean, std = _normalisation(problem.dataset)
        if mean is not None:
            fill = (-torch.tensor(mean) / torch.tensor(std)).to(dev)
    pd = ProblemData(x, y.to(dev) if y is not None else None, xv,
                     yv.to(dev) if yv is not None else None, note, fill)
    _DATA_CACHE[key] = pd
    return pd


def _normalisation(dataset: str) -> tuple[Any, Any]:
    from . import data as _data

    if dataset == "cifar10":
        return _data.CIFAR10_MEAN, _data.CIFAR10_STD
    if dataset == "cifar100":
        return _data.CIFAR100_MEAN, _data.CIFAR100_STD
    return None, None


def _targets(problem: Problem, x: Tensor, y: Tensor | None) -> Tensor:
    if problem.classifier:
        assert y is not None
        return y
    return x


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: nn.Module, problem: Problem, x: Tensor, y: Tensor | None,
             batch: int = 2000) -> dict[str, float]:
    """Mean loss (and accuracy for classifiers) of ``model`` in eval mode over (x, y)."""
    was_training = model.training
    model.eval()
    crit = loss_fn(problem.loss)
    total, correct, n = 0.0, 0, 0
    try:
        for i in range(0, x.shape[0], batch):
            xb = x[i:i + batch]
            yb = y[i:i + batch] if y is not None else None
            out = model(xb)
            m = xb.shape[0]
            total += float(crit(out, _targets(problem, xb, yb))) * m
            if problem.classifier:
                correct += int((out.argmax(1) == yb).sum())
            n += m
    finally:
        model.train(was_training)
    res = {"loss": total / max(n, 1)}
    if problem.classifier:
        res["acc"] = correct / max(n, 1)
    return res


# --------------------------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------------------------


def git_info() -> dict[str, Any]:
    """Commit of the source tree kbfgs runs from, when it is a git checkout."""
    import kbfgs

    here = Path(kbfgs.__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], check=False, cwd=here,
                                capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None}
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               check=False, cwd=here, capture_output=True, text=True,
                               timeout=10)
        return {"commit": commit.stdout.strip(),
                "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None}
    except (OSError, subprocess.SubprocessError):
        return {"commit": None}


def environment(device: str) -> dict[str, Any]:
    import numpy

    import kbfgs

    dev = torch.device(device)
    env: dict[str, Any] = {
        "kbfgs": getattr(kbfgs, "__version__", None),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": str(dev),
        "device_name": (torch.cuda.get_device_name(dev) if dev.type == "cuda"
                        else platform.processor() or platform.machine()),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git": git_info(),
        "argv": list(sys.argv),
        "world_size": distributed.world_size(),
    }
    return env


# --------------------------------------------------------------------------------------------
# Results
# --------------------------------------------------------------------------------------------


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        return _json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "item"):
        return _json_safe(obj.item())
    return str(obj)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(_json_safe(obj), f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_result(path: str | os.PathLike) -> dict[str, Any] | None:
    """A finished result file's content, or None when it is missing or not a finished run."""
    try:
        with open(path) as f:
            res = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(res, dict) or res.get("status") != "finished":
        return None
    return res


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


class _Clock:
    """Accumulates process time (and wall time) of the training segments only."""

    def __init__(self) -> None:
        self.process = 0.0
        self.wall = 0.0
        self._p0: float | None = None
        self._w0 = 0.0

    def start(self) -> None:
        self._p0 = time.process_time()
        self._w0 = time.perf_counter()

    def stop(self) -> None:
        if self._p0 is not None:
            self.process += time.process_time() - self._p0
            self.wall += time.perf_counter() - self._w0
            self._p0 = None

    def now(self) -> float:
        """Training process time so far (including the running segment)."""
        if self._p0 is None:
            return self.process
        return self.process + time.process_time() - self._p0


def _is_main_process() -> bool:
    """Whether this process logs and writes results (the single place for rank checks)."""
    return distributed.is_main_process()


def _epoch_order(n: int, generator: torch.Generator) -> Tensor:
    """Sample order of one epoch (the single place for a distributed sampler)."""
    return torch.randperm(n, generator=generator)


@torch.no_grad()
def _blown_up(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model`` has a non-finite parameter or gives a non-finite output on ``x``."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return True
    was_training = model.training
    model.eval()
    try:
        return not bool(torch.isfinite(model(x)).all())
    finally:
        model.train(was_training)


def _warm_batches(x: Tensor, batch: int) -> Iterator[Tensor]:
    for i in range(0, x.shape[0], batch):
        yield x[i:i + batch]


def _progress(total: float, desc: str, unit: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    fmt = ("{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} " + unit
           + " [{elapsed}<{remaining}{postfix}]") if unit == "s" else None
    return tqdm(total=total, desc=desc, unit=unit, bar_format=fmt, leave=True,
                dynamic_ncols=True, file=sys.stderr)


def train(spec: RunSpec, progress: bool = True,
          on_log: Callable[[dict[str, Any]], None] | None = None,
          checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train one run as ``spec`` says and return its result record (not written).

    ``spec.threads`` sets ``torch.set_num_threads`` for the run only. With ``checkpoint`` (a
    file path) the run resumes from that file when it exists, and with
    ``spec.checkpoint_every = E`` writes it (rank 0, atomically) after every E-th epoch.
    """
    threads = torch.get_num_threads()
    try:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        return _train(spec, progress, on_log, checkpoint)
    finally:
        torch.set_num_threads(threads)


#: checkpoint format of the runner (the ``extra`` entry of ``distributed.save_checkpoint``)
CHECKPOINT_SCHEMA = 1


def checkpoint_path(out_dir: str | os.PathLike, spec: RunSpec) -> Path:
    """Where :func:`run` keeps the checkpoint of an unfinished run."""
    return Path(out_dir) / f"{spec.run_id()}.ckpt"


def _fail_at_iteration() -> int | None:
    """Fault injection for tests: ``$KBFGS_FAIL_AT_ITER=N[:RANK]`` makes the rank RANK (default
    every rank) raise before iteration N + 1 (a crashed worker)."""
    v = os.environ.get("KBFGS_FAIL_AT_ITER")
    if not v:
        return None
    n, _, r = v.partition(":")
    if r and int(r) != distributed.rank():
        return None
    return int(n)


def _train(spec: RunSpec, progress: bool,
           on_log: Callable[[dict[str, Any]], None] | None,
           checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    problem = get_problem(spec.problem)
    check_method(spec.method)
    if (spec.time_budget is None) == (spec.epochs is None):
        raise ValueError("give exactly one of time_budget and epochs")
    if spec.time_budget is not None and spec.time_budget <= 0:
        raise ValueError(f"time budget must be > 0, got {spec.time_budget}")
    if spec.epochs is not None and spec.epochs <= 0:
        raise ValueError(f"epochs must be > 0, got {spec.epochs}")
    if spec.checkpoint_every is not None and (not isinstance(spec.checkpoint_every, int)
                                              or spec.checkpoint_every < 1):
        raise ValueError(f"checkpoint_every must be a whole number of epochs >= 1, got "
                         f"{spec.checkpoint_every!r}")
    device = torch.device(spec.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")

    data = load_problem_data(problem, spec.data_dir, spec.subset, spec.device)
    n = data.x_train.shape[0]
    batch = min(spec.batch_size, n)
    iters_per_epoch = max(n // batch, 1)
    total_iters = (math.ceil(spec.epochs * iters_per_epoch) if spec.epochs is not None
                   else None)

    # Fixed evaluation subset of the training set (the same for every method and seed).
    if spec.eval_subset is not None and spec.eval_subset < n:
        g_eval = torch.Generator().manual_seed(12345)
        eval_idx = torch.randperm(n, generator=g_eval)[:spec.eval_subset].to(data.x_train.device)
        x_eval = data.x_train[eval_idx]
        y_eval = data.y_train[eval_idx] if data.y_train is not None else None
        eval_note = (f"training loss on a fixed random subset of {spec.eval_subset} of the "
                     f"{n} training samples (model in eval mode)")
    else:
        x_eval, y_eval = data.x_train, data.y_train
        eval_note = f"training loss on the full training set ({n} samples, model in eval mode)"
    if problem.classifier:
        eval_note += (f"; validation accuracy on {data.x_val.shape[0]} validation samples"
                      if data.x_val is not None else "; no validation set")

    torch.manual_seed(spec.seed)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(spec.seed)
    model = problem.build_model().to(device)
    model.train()
    train_model = distributed.prepare_model(model, device, seed=spec.seed)  # DDP if torchrun
    opt = make_method_optimizer(spec.method, train_model, spec.hps, seed=spec.seed)
    base_lrs = [g["lr"] for g in opt.param_groups]
    crit = loss_fn(problem.loss)
    g_order = torch.Generator().manual_seed(spec.seed)
    g_aug = torch.Generator(device=device).manual_seed(spec.seed + 7919)

    result: dict[str, Any] = {
        "schema": RESULT_SCHEMA,
        "status": "running",
        "run_id": spec.run_id(),
        "problem": spec.problem,
        "method": spec.method,
        "optimizer": METHOD_FACTORY[spec.method],
        "optimizer_class": type(opt).__name__,
        "hps": dict(spec.hps),
        "seed": spec.seed,
        "spec": dataclasses.asdict(spec),
        "problem_info": {"dataset": problem.dataset, "model": problem.model,
                         "loss": problem.loss, "classifier": problem.classifier,
                         "criterion": problem.criterion, "hp_source": problem.source,
                         "hp_note": problem.hp_notes.get(spec.method),
                         "augment": problem.augment, "description": problem.description},
        "data": {"note": data.note, "n_train": n, "batch_size": batch,
                 "iters_per_epoch": iters_per_epoch,
                 "n_val": int(data.x_val.shape[0]) if data.x_val is not None else 0,
                 "eval": eval_note},
        "env": environment(spec.device),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }

    resume = (distributed.load_checkpoint(checkpoint, train_model, opt, map_location=device)
              if checkpoint is not None and os.path.exists(checkpoint) else None)
    if resume is not None:
        if resume.get("schema") != CHECKPOINT_SCHEMA or resume.get("run_id") != spec.run_id():
            raise ValueError(f"checkpoint {checkpoint} belongs to run "
                             f"{resume.get('run_id')!r} (schema {resume.get('schema')}), "
                             f"not to {spec.run_id()!r}: remove it or choose another --out")

    # Warm start (excluded from the budget, Appendix D.1); a resumed optimizer has its own.
    warm_time = 0.0
    if spec.warm_start and hasattr(opt, "warm_start") and resume is None:
        p0 = time.process_time()
        opt.warm_start(_warm_batches(distributed.shard_dataset(data.x_train), batch))
        warm_time = time.process_time() - p0

    clock = _Clock()
    log: list[dict[str, Any]] = []
    eval_time = 0.0
    it = 0
    running: list[float] = []
    diverged = False
    error: str | None = None
    nonfinite = 0
    last_loss = float("nan")

    def lr_now() -> float:
        return float(opt.param_groups[0]["lr"])

    def record(kind: str) -> dict[str, Any]:
        nonlocal eval_time, diverged
        p0 = time.process_time()
        ev = evaluate(model, problem, x_eval, y_eval)
        entry: dict[str, Any] = {
            "kind": kind, "iter": it, "epoch": it / iters_per_epoch,
            "process_time": clock.process, "wall_time": clock.wall,
            "train_loss": ev["loss"], "lr": lr_now(),
            "minibatch_loss": (sum(running) / len(running)) if running else None,
        }
        if problem.classifier:
            entry["train_acc"] = ev["acc"]
            if data.x_val is not None:
                val = evaluate(model, problem, data.x_val, data.y_val)
                entry["val_loss"] = val["loss"]
                entry["val_acc"] = val["acc"]
        if hasattr(opt, "stats"):
            entry["stats"] = opt.stats(condition=False)
        running.clear()
        eval_time += time.process_time() - p0
        if not math.isfinite(ev["loss"]):
            diverged = True
        log.append(entry)
        if on_log is not None:
            on_log(entry)
        return entry

    def light(kind: str) -> None:
        """A log entry without evaluation: the mean minibatch loss since the last entry."""
        log.append({"kind": kind, "iter": it, "epoch": it / iters_per_epoch,
                    "process_time": clock.process, "wall_time": clock.wall, "lr": lr_now(),
                    "minibatch_loss": (sum(running) / len(running)) if running else None,
                    "evaluated": False})
        running.clear()

    eval_every = spec.eval_every
    next_eval = eval_every if eval_every else math.inf
    shown = 0.0
    resumed: list[dict[str, Any]] = []

    def save() -> None:
        state = {"schema": CHECKPOINT_SCHEMA, "run_id": spec.run_id(), "it": it,
                 "process": clock.process, "wall": clock.wall, "log": log,
                 "eval_time": eval_time, "warm_time": warm_time, "next_eval": next_eval,
                 "nonfinite": nonfinite, "last_loss": last_loss, "running": list(running),
                 "base_lrs": base_lrs, "resumed": resumed,
                 "g_order": g_order.get_state(), "g_aug": g_aug.get_state(),
                 "rng": torch.get_rng_state(),
                 "world_size": distributed.world_size()}
        distributed.save_checkpoint(checkpoint, train_model, opt, state)  # type: ignore[arg-type]

    if resume is not None:
        it = int(resume["it"])
        clock.process, clock.wall = float(resume["process"]), float(resume["wall"])
        log[:] = resume["log"]
        running[:] = resume["running"]
        eval_time, warm_time = float(resume["eval_time"]), float(resume["warm_time"])
        next_eval, nonfinite = float(resume["next_eval"]), int(resume["nonfinite"])
        last_loss, base_lrs = float(resume["last_loss"]), list(resume["base_lrs"])
        g_order.set_state(resume["g_order"].cpu())
        g_aug.set_state(resume["g_aug"].cpu())
        torch.set_rng_state(resume["rng"].cpu())  # rank 0's
        if distributed.rank() > 0:  # other ranks: their own stream, as at the start
            r = distributed.rank()
            torch.manual_seed(distributed.rank_seed(spec.seed * 1_000_003 + it, r))
        resumed = list(resume["resumed"]) + [{"iter": it, "from_world_size": resume["world_size"],
                                              "world_size": distributed.world_size()}]
        if spec.time_budget is not None:
            shown = min(clock.process, spec.time_budget)
    else:
        record("start")
    fail_at = _fail_at_iteration()
    if spec.time_budget is not None:
        bar = _progress(spec.time_budget, f"{spec.problem} {spec.method} s{spec.seed}", "s",
                        progress and _is_main_process())
    else:
        bar = _progress(total_iters or 0, f"{spec.problem} {spec.method} s{spec.seed}", "it",
                        progress and _is_main_process())
    if bar is not None and shown:
        bar.update(shown)
    elif bar is not None and it:
        bar.update(it)
    # the order of the current epoch (a checkpoint is taken at an epoch end: its next epoch
    # draws a new order at the top of the loop)
    order = _epoch_order(n, g_order) if resume is None else None

    def done() -> bool:
        if diverged:
            return True
        if spec.time_budget is not None:
            return clock.process >= spec.time_budget
        return it >= (total_iters or 0)

    try:
        while not distributed.agree(done()):  # rank 0 decides (process times differ)
            epoch, pos = divmod(it, iters_per_epoch)
            if fail_at is not None and it >= fail_at:
                raise RuntimeError(f"KBFGS_FAIL_AT_ITER: injected failure before iteration "
                                   f"{it + 1}")
            if order is None or (pos == 0 and it > 0):
                order = _epoch_order(n, g_order)
            if pos == 0 and spec.lr_decay is not None:
                every, factor = spec.lr_decay
                scale = factor ** math.floor(epoch / every)
                for g, lr0 in zip(opt.param_groups, base_lrs):
                    g["lr"] = lr0 * scale
            clock.start()
            idx = order[pos * batch:(pos + 1) * batch].to(data.x_train.device)
            xb = data.x_train[idx]
            yb = data.y_train[idx] if data.y_train is not None else None
            if problem.augment:
                from .data import augment_crop_flip

                xb = augment_crop_flip(xb, g_aug, padding=4,
                                       fill=data.fill if data.fill is not None else 0.0)
            target = _targets(problem, xb, yb)
            xb, target = distributed.shard(xb), distributed.shard(target)  # this rank's part

            def closure(xb: Tensor = xb, target: Tensor = target) -> Tensor:
                opt.zero_grad(set_to_none=True)
                loss = crit(train_model(xb), target)
                loss.backward()
                return loss

            try:
                loss = opt.step(closure)
                lv = float(loss.detach() if isinstance(loss, Tensor) else loss)  # syncs
            except RuntimeError as e:
                clock.stop()
                if not _blown_up(model, xb):
                    raise
                # The model blew up (non-finite parameters or outputs) and the optimizer
                # raised on it (e.g. sampling targets from NaN outputs): the run diverged.
                diverged = True
                error = f"{type(e).__name__}: {e}"
                break
            clock.stop()
            it += 1
            last_loss = lv
            if math.isfinite(lv):
                running.append(lv)
                nonfinite = 0
            else:
                nonfinite += 1
                if nonfinite >= _DIVERGED_AFTER:
                    diverged = True
            if bar is not None:
                if spec.time_budget is not None:
                    step = min(clock.process, spec.time_budget) - shown
                    bar.update(step)
                    shown += step
                else:
                    bar.update(1)
                bar.set_postfix(loss=f"{lv:.4g}", it=it, refresh=False)
            if it % iters_per_epoch == 0:
                # Every epoch is logged; with time points as well, the full evaluation is
                # skipped at an epoch end within eval_every / 2 of the previous one.
                if not eval_every or clock.process - log[-1]["process_time"] >= eval_every / 2:
                    record("epoch")
                    next_eval = clock.process + eval_every if eval_every else math.inf
                else:
                    light("epoch")
                # (the stop decision is rank 0's, as in the loop condition: every rank then
                # takes the same branch around the collectives of save())
                if (checkpoint is not None and spec.checkpoint_every
                        and (it // iters_per_epoch) % spec.checkpoint_every == 0
                        and not distributed.agree(done())):
                    save()  # not on the clock, like evaluation
            elif clock.process >= next_eval:
                record("time")
                next_eval = clock.process + eval_every if eval_every else math.inf
    finally:
        if bar is not None:
            bar.close()
    if log[-1]["iter"] != it or "train_loss" not in log[-1]:
        record("end")
    final_eval = log[-1]
    final: dict[str, Any] = {
        "iterations": it,
        "epochs": it / iters_per_epoch,
        "process_time_s": clock.process,
        "wall_time_s": clock.wall,
        "time_per_iter_s": clock.process / it if it else None,
        "wall_per_iter_s": clock.wall / it if it else None,
        "warm_start_process_s": warm_time,
        "eval_process_s": eval_time,
        "last_minibatch_loss": last_loss,
        "diverged": diverged,
        "error": error,
        "train_loss": final_eval["train_loss"],
        "train_loss_set": eval_note.split(";")[0],
    }
    if spec.final_full_eval and spec.eval_subset is not None and spec.eval_subset < n \
            and not diverged:
        full = evaluate(model, problem, data.x_train, data.y_train)
        final["train_loss"] = full["loss"]
        final["train_loss_set"] = f"full training set ({n} samples, model in eval mode)"
        final["train_loss_eval_subset"] = final_eval["train_loss"]
    if problem.classifier:
        final["val_acc"] = final_eval.get("val_acc")
        final["val_loss"] = final_eval.get("val_loss")
        final["train_acc"] = final_eval.get("train_acc")
    if diverged:
        final["train_loss"] = None
    result["final"] = final
    result["log"] = log
    if hasattr(opt, "stats"):
        try:
            result["stats"] = opt.stats(condition=True)
        except Exception as e:  # noqa: BLE001 - diagnostics must never lose a finished run
            result["stats"] = {"error": repr(e)}
    if resumed:
        result["resumed"] = resumed
    result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["status"] = "finished"
    return result


def run(spec: RunSpec, out_dir: str | os.PathLike, progress: bool = True,
        force: bool = False, echo: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """Run ``spec`` unless ``out_dir`` already holds its finished result.

    An unfinished run's checkpoint (``out_dir/<run id>.ckpt``, written every
    ``spec.checkpoint_every`` epochs by rank 0) is resumed, on any world size with the same
    global batch, and removed once the result is written (``force`` discards it first).
    Returns (result, ran): ``ran`` is False when the result was already there.
    """
    path = result_path(out_dir, spec)
    echo = echo if _is_main_process() else (lambda _msg: None)
    if not force:
        existing = distributed.broadcast_object(load_result(path))
        if existing is not None:
            echo(f"skip (already finished): {path}")
            return existing, False
    ckpt = checkpoint_path(out_dir, spec)
    if _is_main_process():
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        if force and ckpt.exists():
            ckpt.unlink()
    distributed.barrier()
    if ckpt.exists():
        echo(f"resuming from {ckpt}")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        result = train(spec, progress=progress, checkpoint=ckpt)
    if _is_main_process():
        write_json_atomic(path, result)
        if ckpt.exists():
            ckpt.unlink()  # the result is written: the checkpoint has served
    f = result["final"]
    msg = (f"{spec.problem} {spec.method} seed {spec.seed}: "
           f"train loss {_show(f['train_loss'])}")
    if "val_acc" in f and f["val_acc"] is not None:
        msg += f", val acc {100 * f['val_acc']:.2f}%"
    msg += (f", {f['iterations']} it, {f['epochs']:.2f} epochs, "
            f"{_show(f['time_per_iter_s'], 1e3)} ms/it"
            + (" (DIVERGED" + (f": {f['error']}" if f.get("error") else "") + ")"
               if f["diverged"] else "") + f" -> {path}")
    echo(msg)
    return result, True


def _show(v: float | None, scale: float = 1.0) -> str:
    if v is None or not math.isfinite(v):
        return "nan"
    return f"{v * scale:.4g}"


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
              warm_start: bool = True, checkpoint_every: int | None = None) -> RunSpec:
    """A RunSpec with the problem's defaults filled in."""
    if eval_subset is None:
        eval_subset = problem.eval_subset
    if eval_every is None and time_budget is not None:
        eval_every = time_budget / 20.0
    return RunSpec(problem=problem.name, method=method, hps=hps, seed=seed,
                   time_budget=time_budget, epochs=epochs, lr_decay=lr_decay,
                   batch_size=batch_size or problem.batch_size, subset=subset,
                   eval_subset=eval_subset, eval_every=eval_every,
                   final_full_eval=not problem.classifier, warm_start=warm_start,
                   device=device, data_dir=data_dir, threads=threads,
                   checkpoint_every=checkpoint_every)


__all__ += ["ProblemData", "default_budget", "environment", "git_info", "make_spec"]
