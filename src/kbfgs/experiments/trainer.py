"""The training loop of one run: a :class:`TrainState` and a :class:`Trainer` of small steps.

The budget is *process time* (``time.process_time``: CPU time of every thread of this process),
counting only training: the optimizer's warm start, the evaluations, the logging and the
checkpoints are excluded (Appendix D.1). The state that a checkpoint must carry to continue a
run bit-identically is one object, :class:`TrainState`, with its own ``state_dict`` /
``load_state_dict``; everything else is rebuilt from the :class:`RunSpec`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from . import checkpoint as ckpt_files
from . import launch
from .problems import METHOD_FACTORY, Problem, check_method, get_problem, loss_fn
from .results import RESULT_SCHEMA, environment
from .rundata import ProblemData, load_problem_data, with_data_identity
from .spec import RunSpec

__all__ = ["CHECKPOINT_SCHEMA", "Clock", "TrainState", "Trainer", "evaluate",
           "make_method_optimizer", "train"]

#: format of the runner's checkpoint ``extra`` entry (:meth:`TrainState.state_dict` + meta)
CHECKPOINT_SCHEMA = 1
_DIVERGED_AFTER = 5  # consecutive non-finite minibatch losses that end a run


# --------------------------------------------------------------------------------------------
# Pieces without state
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


def targets(problem: Problem, x: Tensor, y: Tensor | None) -> Tensor:
    """The loss's target: the labels of a classifier, the input of an autoencoder."""
    if problem.classifier:
        assert y is not None
        return y
    return x


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
            total += float(crit(out, targets(problem, xb, yb))) * m
            if problem.classifier:
                correct += int((out.argmax(1) == yb).sum())
            n += m
    finally:
        model.train(was_training)
    res = {"loss": total / max(n, 1)}
    if problem.classifier:
        res["acc"] = correct / max(n, 1)
    return res


@torch.no_grad()
def blown_up(model: nn.Module, x: Tensor) -> bool:
    """Whether ``model`` has a non-finite parameter or gives a non-finite output on ``x``."""
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        return True
    was_training = model.training
    model.eval()
    try:
        return not bool(torch.isfinite(model(x)).all())
    finally:
        model.train(was_training)


def epoch_order(n: int, generator: torch.Generator) -> Tensor:
    """Sample order of one epoch (the same on every rank: each keeps its slice of a batch)."""
    return torch.randperm(n, generator=generator)


def warm_batches(x: Tensor, batch: int) -> Iterator[Tensor]:
    for i in range(0, x.shape[0], batch):
        yield x[i:i + batch]


def progress_bar(total: float, desc: str, unit: str, enabled: bool) -> Any:
    """A tqdm bar on stderr, or None. Only on a terminal: when stderr is a file or a pipe
    (``disable=None``) no carriage-return updates go into the log; the run's summary line,
    printed by the runner, stays."""
    if not enabled:
        return None
    from tqdm.auto import tqdm

    fmt = ("{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} " + unit
           + " [{elapsed}<{remaining}{postfix}]") if unit == "s" else None
    bar = tqdm(total=total, desc=desc, unit=unit, bar_format=fmt, leave=True,
               dynamic_ncols=True, file=sys.stderr, disable=None)
    if bar.disable:
        bar.close()
        return None
    return bar


def fail_at_iteration() -> int | None:
    """Fault injection for tests: ``$KBFGS_FAIL_AT_ITER=N[:RANK]`` makes the rank RANK (default
    every rank) raise before iteration N + 1 (a crashed worker)."""
    v = os.environ.get("KBFGS_FAIL_AT_ITER")
    if not v:
        return None
    n, _, r = v.partition(":")
    if r and int(r) != distributed.rank():
        return None
    return int(n)


def check_spec(spec: RunSpec) -> None:
    """The budget, checkpoint frequency and device of ``spec`` are usable (ValueError)."""
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
    if torch.device(spec.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but torch.cuda.is_available() is False")


# --------------------------------------------------------------------------------------------
# State
# --------------------------------------------------------------------------------------------


class Clock:
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


@dataclass
class TrainState:
    """Everything of a run in progress that the model, the optimizer and the spec do not hold.

    :meth:`state_dict` is what a checkpoint carries (plain data and tensors: it loads with
    ``torch.load(weights_only=True)``); :meth:`load_state_dict` restores it, including the data
    order and augmentation generators and the global RNG (rank 0's).
    """

    g_order: torch.Generator
    g_aug: torch.Generator
    base_lrs: list[float]
    clock: Clock = field(default_factory=Clock)
    it: int = 0
    log: list[dict[str, Any]] = field(default_factory=list)
    #: minibatch losses since the last log entry
    running: list[float] = field(default_factory=list)
    eval_time: float = 0.0
    warm_time: float = 0.0
    next_eval: float = math.inf
    #: consecutive non-finite minibatch losses
    nonfinite: int = 0
    last_loss: float = math.nan
    #: one entry per resume: {"iter", "from_world_size", "world_size"}
    resumed: list[dict[str, Any]] = field(default_factory=list)
    diverged: bool = False
    error: str | None = None

    #: the entries of :meth:`state_dict` (the checkpoint format, with the meta entries
    #: ``schema``, ``run_id``, ``world_size`` added by the trainer)
    KEYS = ("it", "process", "wall", "log", "eval_time", "warm_time", "next_eval", "nonfinite",
            "last_loss", "running", "base_lrs", "resumed", "g_order", "g_aug", "rng")

    def state_dict(self) -> dict[str, Any]:
        return {"it": self.it, "process": self.clock.process, "wall": self.clock.wall,
                "log": self.log, "eval_time": self.eval_time, "warm_time": self.warm_time,
                "next_eval": self.next_eval, "nonfinite": self.nonfinite,
                "last_loss": self.last_loss, "running": list(self.running),
                "base_lrs": self.base_lrs, "resumed": self.resumed,
                "g_order": self.g_order.get_state(), "g_aug": self.g_aug.get_state(),
                "rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = [k for k in self.KEYS if k not in state]
        if missing:
            raise KeyError(f"training state without {', '.join(missing)}")
        self.it = int(state["it"])
        self.clock.process, self.clock.wall = float(state["process"]), float(state["wall"])
        self.log[:] = state["log"]
        self.running[:] = state["running"]
        self.eval_time, self.warm_time = float(state["eval_time"]), float(state["warm_time"])
        self.next_eval, self.nonfinite = float(state["next_eval"]), int(state["nonfinite"])
        self.last_loss, self.base_lrs = float(state["last_loss"]), list(state["base_lrs"])
        self.resumed = list(state["resumed"])
        self.g_order.set_state(state["g_order"].cpu())
        self.g_aug.set_state(state["g_aug"].cpu())
        torch.set_rng_state(state["rng"].cpu())


# --------------------------------------------------------------------------------------------
# Trainer
# --------------------------------------------------------------------------------------------


class Trainer:
    """One run of ``spec``: build (data, model, optimizer), then :meth:`run`.

    With ``checkpoint`` (a file path) the run resumes from that file when it exists, and with
    ``spec.checkpoint_every = E`` writes it (rank 0, atomically) after every E-th epoch.
    """

    def __init__(self, spec: RunSpec, progress: bool = True,
                 on_log: Callable[[dict[str, Any]], None] | None = None,
                 checkpoint: str | os.PathLike | None = None) -> None:
        check_spec(spec)
        self.spec = spec = with_data_identity(spec)
        self.problem = get_problem(spec.problem)
        self.progress = progress
        self.on_log = on_log
        self.checkpoint = checkpoint
        self.device = torch.device(spec.device)
        self.data: ProblemData = load_problem_data(self.problem, spec.data_dir, spec.subset,
                                                   spec.device)
        self.n = self.data.x_train.shape[0]
        self.batch = min(spec.batch_size, self.n)
        self.iters_per_epoch = max(self.n // self.batch, 1)
        self.total_iters = (math.ceil(spec.epochs * self.iters_per_epoch)
                            if spec.epochs is not None else None)
        self.x_eval, self.y_eval, self.eval_note = self._eval_set()
        self._build()
        self.result = self._result_header()
        self.bar: Any = None
        self.shown = 0.0  # budget seconds shown on the progress bar

    # -- set-up ---------------------------------------------------------------------------

    def _eval_set(self) -> tuple[Tensor, Tensor | None, str]:
        """The fixed subset of the training set the logged training loss is computed on (the
        same for every method and seed), and its description."""
        spec, data, n = self.spec, self.data, self.n
        if spec.eval_subset is not None and spec.eval_subset < n:
            g_eval = torch.Generator().manual_seed(12345)
            idx = torch.randperm(n, generator=g_eval)[:spec.eval_subset].to(data.x_train.device)
            x_eval = data.x_train[idx]
            y_eval = data.y_train[idx] if data.y_train is not None else None
            note = (f"training loss on a fixed random subset of {spec.eval_subset} of the "
                    f"{n} training samples (model in eval mode)")
        else:
            x_eval, y_eval = data.x_train, data.y_train
            note = f"training loss on the full training set ({n} samples, model in eval mode)"
        if self.problem.classifier:
            note += (f"; validation accuracy on {data.x_val.shape[0]} validation samples"
                     if data.x_val is not None else "; no validation set")
        return x_eval, y_eval, note

    def _build(self) -> None:
        """Seeded model (DDP under torchrun), optimizer, loss and the run's generators."""
        spec, device = self.spec, self.device
        torch.manual_seed(spec.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed_all(spec.seed)
        self.model = self.problem.build_model().to(device)
        self.model.train()
        self.train_model = launch.prepare_model(self.model, device, seed=spec.seed)
        self.opt = make_method_optimizer(spec.method, self.train_model, spec.hps, seed=spec.seed)
        self.crit = loss_fn(self.problem.loss)
        self.state = TrainState(
            g_order=torch.Generator().manual_seed(spec.seed),
            g_aug=torch.Generator(device=device).manual_seed(spec.seed + 7919),
            base_lrs=[g["lr"] for g in self.opt.param_groups],
            next_eval=spec.eval_every if spec.eval_every else math.inf)

    def _result_header(self) -> dict[str, Any]:
        spec, problem, data = self.spec, self.problem, self.data
        return {
            "schema": RESULT_SCHEMA,
            "status": "running",
            "run_id": spec.run_id(),
            "problem": spec.problem,
            "method": spec.method,
            "optimizer": METHOD_FACTORY[spec.method],
            "optimizer_class": type(self.opt).__name__,
            "hps": dict(spec.hps),
            "seed": spec.seed,
            "spec": dataclasses.asdict(spec),
            "problem_info": {"dataset": problem.dataset, "model": problem.model,
                             "loss": problem.loss, "classifier": problem.classifier,
                             "criterion": problem.criterion, "hp_source": problem.source,
                             "hp_note": problem.hp_notes.get(spec.method),
                             "augment": problem.augment, "description": problem.description},
            "data": {"note": data.note, "n_train": self.n, "batch_size": self.batch,
                     "iters_per_epoch": self.iters_per_epoch,
                     "n_val": int(data.x_val.shape[0]) if data.x_val is not None else 0,
                     "eval": self.eval_note},
            "env": {**environment(spec.device),
                    # train() flushes subnormals to zero on the CPU (flush_denormal)
                    "flush_denormal": self.device.type == "cpu"},
            "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }

    # -- checkpoint -----------------------------------------------------------------------

    def read_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint file's content when it exists and belongs to this run (its run id
        is checked before anything is loaded into the model); None without one."""
        path = self.checkpoint
        if path is None or not os.path.exists(path):
            return None
        advice = "rerun with --force to discard it and start the run afresh, or remove it"
        state = ckpt_files.read_checkpoint(path, map_location=self.device, advice=advice)
        extra = state["extra"]
        run_id = self.spec.run_id()
        if extra.get("schema") != CHECKPOINT_SCHEMA or extra.get("run_id") != run_id:
            raise ckpt_files.CheckpointError(
                f"checkpoint {path} belongs to run {extra.get('run_id')!r} (schema "
                f"{extra.get('schema')}), not to {run_id!r}: {advice}, or choose another --out")
        missing = [k for k in TrainState.KEYS if k not in extra]
        if missing:
            raise ckpt_files.CheckpointError(f"checkpoint {path} lacks the training state "
                                             f"({', '.join(missing)}); {advice}")
        return state

    def resume(self, state: dict[str, Any]) -> None:
        """Load a checkpoint of this run into the model, the optimizer and :attr:`state`."""
        extra = ckpt_files.apply_checkpoint(state, self.train_model, self.opt)
        st = self.state
        st.load_state_dict(extra)
        r = distributed.rank()
        if r > 0:  # other ranks: their own stream, as at the start
            torch.manual_seed(launch.rank_seed(self.spec.seed * 1_000_003 + st.it, r))
        st.resumed.append({"iter": st.it, "from_world_size": extra["world_size"],
                           "world_size": distributed.world_size()})
        if self.spec.time_budget is not None:
            self.shown = min(st.clock.process, self.spec.time_budget)

    def save_checkpoint(self) -> None:
        """Write the checkpoint (rank 0; every rank waits); off the clock, like evaluation."""
        extra = {"schema": CHECKPOINT_SCHEMA, "run_id": self.spec.run_id(),
                 **self.state.state_dict(), "world_size": distributed.world_size()}
        assert self.checkpoint is not None  # called only with a checkpoint path
        ckpt_files.save_checkpoint(self.checkpoint, self.train_model, self.opt, extra)

    def _checkpoint_due(self) -> bool:
        every = self.spec.checkpoint_every
        if self.checkpoint is None or not every:
            return False
        return (self.state.it // self.iters_per_epoch) % every == 0

    # -- warm start -----------------------------------------------------------------------

    def warm_start(self) -> None:
        """The optimizer's warm start (excluded from the budget, Appendix D.1)."""
        if self.spec.warm_start and hasattr(self.opt, "warm_start"):
            p0 = time.process_time()
            self.opt.warm_start(warm_batches(launch.shard_dataset(self.data.x_train),
                                             self.batch))
            self.state.warm_time = time.process_time() - p0

    # -- logging --------------------------------------------------------------------------

    def lr_now(self) -> float:
        return float(self.opt.param_groups[0]["lr"])

    def _entry(self, kind: str) -> dict[str, Any]:
        st = self.state
        return {"kind": kind, "iter": st.it, "epoch": st.it / self.iters_per_epoch,
                "process_time": st.clock.process, "wall_time": st.clock.wall}

    def _minibatch_loss(self) -> float | None:
        running = self.state.running
        return (sum(running) / len(running)) if running else None

    def record(self, kind: str) -> dict[str, Any]:
        """A log entry with an evaluation (off the clock)."""
        st = self.state
        p0 = time.process_time()
        ev = evaluate(self.model, self.problem, self.x_eval, self.y_eval)
        entry: dict[str, Any] = {**self._entry(kind), "train_loss": ev["loss"],
                                 "lr": self.lr_now(), "minibatch_loss": self._minibatch_loss()}
        if self.problem.classifier:
            entry["train_acc"] = ev["acc"]
            if self.data.x_val is not None:
                val = evaluate(self.model, self.problem, self.data.x_val, self.data.y_val)
                entry["val_loss"] = val["loss"]
                entry["val_acc"] = val["acc"]
        if hasattr(self.opt, "stats"):
            entry["stats"] = self.opt.stats(condition=False)
        st.running.clear()
        st.eval_time += time.process_time() - p0
        if not math.isfinite(ev["loss"]):
            st.diverged = True
        st.log.append(entry)
        if self.on_log is not None:
            self.on_log(entry)
        return entry

    def light(self, kind: str) -> None:
        """A log entry without evaluation: the mean minibatch loss since the last entry."""
        self.state.log.append({**self._entry(kind), "lr": self.lr_now(),
                               "minibatch_loss": self._minibatch_loss(), "evaluated": False})
        self.state.running.clear()

    def log_epoch_end(self) -> None:
        """Every epoch is logged; with time points as well, the full evaluation is skipped at an
        epoch end within eval_every / 2 of the previous one."""
        st, eval_every = self.state, self.spec.eval_every
        if not eval_every or st.clock.process - st.log[-1]["process_time"] >= eval_every / 2:
            self.record("epoch")
            st.next_eval = st.clock.process + eval_every if eval_every else math.inf
        else:
            self.light("epoch")

    def log_time_point(self) -> None:
        st, eval_every = self.state, self.spec.eval_every
        if st.clock.process >= st.next_eval:
            self.record("time")
            st.next_eval = st.clock.process + eval_every if eval_every else math.inf

    # -- progress -------------------------------------------------------------------------

    def open_bar(self) -> None:
        spec, st = self.spec, self.state
        desc = f"{spec.problem} {spec.method} s{spec.seed}"
        enabled = self.progress and launch.is_main_process()
        if spec.time_budget is not None:
            self.bar = progress_bar(spec.time_budget, desc, "s", enabled)
        else:
            self.bar = progress_bar(self.total_iters or 0, desc, "it", enabled)
        if self.bar is not None and self.shown:
            self.bar.update(self.shown)
        elif self.bar is not None and st.it:
            self.bar.update(st.it)

    def update_bar(self, loss: float) -> None:
        if self.bar is None:
            return
        if self.spec.time_budget is not None:
            step = min(self.state.clock.process, self.spec.time_budget) - self.shown
            self.bar.update(step)
            self.shown += step
        else:
            self.bar.update(1)
        self.bar.set_postfix(loss=f"{loss:.4g}", it=self.state.it, refresh=False)

    # -- one iteration --------------------------------------------------------------------

    def done(self) -> bool:
        """The budget check: diverged, the process time spent, or the epochs run."""
        st = self.state
        if st.diverged:
            return True
        if self.spec.time_budget is not None:
            return st.clock.process >= self.spec.time_budget
        return st.it >= (self.total_iters or 0)

    def set_lr(self, epoch: int) -> None:
        """Step decay of the learning rate at an epoch start."""
        if self.spec.lr_decay is None:
            return
        every, factor = self.spec.lr_decay
        scale = factor ** math.floor(epoch / every)
        for g, lr0 in zip(self.opt.param_groups, self.state.base_lrs):
            g["lr"] = lr0 * scale

    def minibatch(self, order: Tensor, pos: int) -> tuple[Tensor, Tensor]:
        """This rank's part of the global minibatch at position ``pos`` of ``order`` (inputs,
        targets), augmented for the CNN problems."""
        data, batch = self.data, self.batch
        idx = order[pos * batch:(pos + 1) * batch].to(data.x_train.device)
        xb = data.x_train[idx]
        yb = data.y_train[idx] if data.y_train is not None else None
        if self.problem.augment:
            from .data import augment_crop_flip

            xb = augment_crop_flip(xb, self.state.g_aug, padding=4,
                                   fill=data.fill if data.fill is not None else 0.0)
        target = targets(self.problem, xb, yb)
        xs, ts = launch.shard(xb), launch.shard(target)
        assert xs is not None and ts is not None
        return xs, ts

    def closure(self, xb: Tensor, target: Tensor) -> Callable[[], Tensor]:
        def closure() -> Tensor:
            self.opt.zero_grad(set_to_none=True)
            loss = self.crit(self.train_model(xb), target)
            loss.backward()
            return loss

        return closure

    def iteration(self, order: Tensor, pos: int) -> bool:
        """One optimizer step on the clock; False when the model blew up (the run diverged)."""
        st = self.state
        st.clock.start()
        xb, target = self.minibatch(order, pos)
        try:
            # torch's stubs type the closure as returning float; a Tensor is what it returns
            loss = self.opt.step(self.closure(xb, target))  # type: ignore[arg-type]
            lv = float(loss.detach() if isinstance(loss, Tensor) else loss)  # syncs
        except RuntimeError as e:
            st.clock.stop()
            if not blown_up(self.model, xb):
                raise
            # The model blew up (non-finite parameters or outputs) and the optimizer
            # raised on it (e.g. sampling targets from NaN outputs): the run diverged.
            st.diverged = True
            st.error = f"{type(e).__name__}: {e}"
            return False
        st.clock.stop()
        st.it += 1
        st.last_loss = lv
        if math.isfinite(lv):
            st.running.append(lv)
            st.nonfinite = 0
        else:
            st.nonfinite += 1
            if st.nonfinite >= _DIVERGED_AFTER:
                st.diverged = True
        self.update_bar(lv)
        return True

    # -- the loop -------------------------------------------------------------------------

    def start(self) -> bool:
        """Resume from the checkpoint, or warm start and log the start; True when resumed."""
        saved = self.read_checkpoint()
        if saved is not None:
            self.resume(saved)
            return True
        self.warm_start()
        self.record("start")
        return False

    def run(self) -> dict[str, Any]:
        """Train until the budget is spent (or the run diverges); the result record."""
        resumed = self.start()
        st = self.state
        fail_at = fail_at_iteration()
        self.open_bar()
        # the order of the current epoch (a checkpoint is taken at an epoch end: its next epoch
        # draws a new order at the top of the loop)
        order = epoch_order(self.n, st.g_order) if not resumed else None
        try:
            while not launch.agree(self.done()):  # rank 0 decides (process times differ)
                epoch, pos = divmod(st.it, self.iters_per_epoch)
                if fail_at is not None and st.it >= fail_at:
                    raise RuntimeError(f"KBFGS_FAIL_AT_ITER: injected failure before "
                                       f"iteration {st.it + 1}")
                if order is None or (pos == 0 and st.it > 0):
                    order = epoch_order(self.n, st.g_order)
                if pos == 0:
                    self.set_lr(epoch)
                if not self.iteration(order, pos):
                    break
                if st.it % self.iters_per_epoch == 0:
                    self.log_epoch_end()
                    # (the stop decision is rank 0's, as in the loop condition: every rank
                    # then takes the same branch around the collectives of the checkpoint)
                    if self._checkpoint_due() and not launch.agree(self.done()):
                        self.save_checkpoint()
                else:
                    self.log_time_point()
        finally:
            if self.bar is not None:
                self.bar.close()
        return self.finish()

    def finish(self) -> dict[str, Any]:
        """The final evaluation and the result record."""
        st, spec, n = self.state, self.spec, self.n
        if st.log[-1]["iter"] != st.it or "train_loss" not in st.log[-1]:
            self.record("end")
        final_eval = st.log[-1]
        it, clock = st.it, st.clock
        final: dict[str, Any] = {
            "iterations": it,
            "epochs": it / self.iters_per_epoch,
            "process_time_s": clock.process,
            "wall_time_s": clock.wall,
            "time_per_iter_s": clock.process / it if it else None,
            "wall_per_iter_s": clock.wall / it if it else None,
            "warm_start_process_s": st.warm_time,
            "eval_process_s": st.eval_time,
            "last_minibatch_loss": st.last_loss,
            "diverged": st.diverged,
            "error": st.error,
            "train_loss": final_eval["train_loss"],
            "train_loss_set": self.eval_note.split(";")[0],
        }
        if spec.final_full_eval and spec.eval_subset is not None and spec.eval_subset < n \
                and not st.diverged:
            full = evaluate(self.model, self.problem, self.data.x_train, self.data.y_train)
            final["train_loss"] = full["loss"]
            final["train_loss_set"] = f"full training set ({n} samples, model in eval mode)"
            final["train_loss_eval_subset"] = final_eval["train_loss"]
        if self.problem.classifier:
            final["val_acc"] = final_eval.get("val_acc")
            final["val_loss"] = final_eval.get("val_loss")
            final["train_acc"] = final_eval.get("train_acc")
        if st.diverged:
            final["train_loss"] = None
        result = self.result
        result["final"] = final
        result["log"] = st.log
        if hasattr(self.opt, "stats"):
            try:
                result["stats"] = self.opt.stats(condition=True)
            except Exception as e:  # diagnostics must never lose a finished run
                result["stats"] = {"error": repr(e)}
        if st.resumed:
            result["resumed"] = st.resumed
        result["finished"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        result["status"] = "finished"
        return result


def train(spec: RunSpec, progress: bool = True,
          on_log: Callable[[dict[str, Any]], None] | None = None,
          checkpoint: str | os.PathLike | None = None) -> dict[str, Any]:
    """Train one run as ``spec`` says and return its result record (not written).

    ``spec.threads`` sets ``torch.set_num_threads`` for the run only. With ``checkpoint`` (a
    file path) the run resumes from that file when it exists, and with
    ``spec.checkpoint_every = E`` writes it (rank 0, atomically) after every E-th epoch. A
    checkpoint that is not this run's, or cannot be loaded safely, raises
    :class:`~kbfgs.experiments.errors.RunnerError` before anything is loaded from it.
    """
    threads = torch.get_num_threads()
    try:
        if spec.threads is not None:
            torch.set_num_threads(spec.threads)
        with flush_denormal():
            return Trainer(spec, progress, on_log, checkpoint).run()
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def flush_denormal() -> Iterator[bool]:
    """Subnormal floats flushed to zero on the CPU during a run (``torch.set_flush_denormal``;
    yields whether the CPU supports it), off again afterwards (torch's default).

    Why: a parameter whose gradient is exactly zero (a weight of an always-black pixel of
    Fashion-MNIST) has a momentum buffer that decays geometrically, and after about a thousand
    steps it is subnormal; matrix products with subnormal entries run some 20x slower on x86
    CPUs. Measured: Muon's iteration on the CURVES autoencoder went from 80 to 490 ms within
    one 500 s run, SOAP's from 140 to 550 ms, kbfgs-plus's from 100 to 150 ms (docs/results.md),
    which turns a process-time budget into a measure of how many zero-gradient entries each
    method keeps in its matrices. Flushed, the values below about 1e-38 (float32) become 0:
    nothing a training run can see."""
    supported = bool(torch.set_flush_denormal(True))
    try:
        yield supported
    finally:
        torch.set_flush_denormal(False)

