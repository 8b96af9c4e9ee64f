"""One training run of a named problem with one method, measured as the paper measures it.

:func:`run` runs a :class:`~kbfgs.experiments.spec.RunSpec` unless its result exists, and
writes one JSON result file, atomically (a temporary file, ``fsync``, then ``os.replace``), so a
directory of results is always consistent and an interrupted grid resumes by skipping the files
that exist. The parts:

* :mod:`.spec`: the run's specification, its run id and file names, the hyper-parameter
  formatter (``format_hps``);
* :mod:`.rundata`: the run's data and its identity (part of the run id);
* :mod:`.trainer`: the training loop (``Trainer``, ``TrainState``, ``train``); the budget is
  process time of training only (Appendix D.1);
* :mod:`.results`: result schema, atomic JSON, environment and git information;
* :mod:`.checkpoint` and :mod:`.launch`: checkpoint files and processes under ``torchrun``.

Everything these modules export that the runner used to define is importable from here too.

Checkpoints: a checkpoint file in the output directory is loaded with
``torch.load(weights_only=True)``, so a planted file cannot run code. A checkpoint that is
empty, truncated, not a kbfgs checkpoint, holds anything but tensors and plain data, or belongs
to another run makes :func:`run` *refuse* with a one-line
:class:`~kbfgs.experiments.errors.RunnerError` that names the file; nothing is loaded from it,
and the file is left in place. ``force=True`` (``--force``) discards it and starts afresh.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import launch
from .checkpoint import CheckpointError
from .errors import RunnerError
from .results import (
    RESULT_SCHEMA,
    environment,
    git_info,
    json_safe,
    load_result,
    write_json_atomic,
)
from .rundata import ProblemData, load_problem_data, with_data_identity
from .spec import (
    NON_KEY_FIELDS,
    RunSpec,
    checkpoint_path,
    default_budget,
    format_number,
    make_spec,
    resolve_hps,
    result_path,
)
from .trainer import CHECKPOINT_SCHEMA, evaluate, make_method_optimizer, train

__all__ = [
    "CHECKPOINT_SCHEMA",
    "NON_KEY_FIELDS",
    "RESULT_SCHEMA",
    "CheckpointError",
    "ProblemData",
    "RunSpec",
    "RunnerError",
    "check_out_dir",
    "checkpoint_path",
    "default_budget",
    "environment",
    "evaluate",
    "git_info",
    "json_safe",
    "load_problem_data",
    "load_result",
    "make_method_optimizer",
    "make_spec",
    "resolve_hps",
    "result_path",
    "run",
    "train",
    "write_json_atomic",
]

def _is_main_process() -> bool:
    """Whether this process logs and writes results (the single place for rank checks)."""
    return launch.is_main_process()


def check_out_dir(out_dir: str | os.PathLike) -> str | None:
    """Why results cannot be written to ``out_dir`` (created when missing), or None.

    Checked by writing, ``fsync``-ing and removing a probe file, so a read-only directory, a
    read-only file system or a regular file in the way is found before a run trains, not when
    its result is written.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file, not a directory; choose a directory"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"--out {out}: cannot create the directory ({e.strerror or e}); choose another"
    probe = out / f".kbfgs-write-probe-{os.getpid()}"
    try:
        with open(probe, "w") as f:
            f.write("probe\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return (f"--out {out}: cannot write result files there ({e.strerror or e}); choose "
                "a writable directory")
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    return None


def run(spec: RunSpec, out_dir: str | os.PathLike, progress: bool = True,
        force: bool = False, echo: Callable[[str], None] = print) -> tuple[dict[str, Any], bool]:
    """Run ``spec`` unless ``out_dir`` already holds its finished result.

    The data is identified first (``spec.data``, part of the run id: see :mod:`.rundata`).
    ``out_dir`` must be a writable directory (created when missing): otherwise a
    :class:`RunnerError`, before any training. An unfinished run's checkpoint
    (``out_dir/<run id>.ckpt``, written every ``spec.checkpoint_every`` epochs by rank 0) is
    resumed, on any world size with the same global batch, and removed once the result is
    written; a checkpoint that cannot be used is refused (see the module docstring), and
    ``force`` discards it first. Returns (result, ran): ``ran`` is False when the result was
    already there.
    """
    spec = with_data_identity(spec)
    path = result_path(out_dir, spec)
    echo = echo if _is_main_process() else (lambda _msg: None)
    if not force:
        existing = launch.broadcast_object(load_result(path))
        if existing is not None:
            echo(f"skip (already finished): {path}")
            return existing, False
    why = launch.broadcast_object(check_out_dir(out_dir) if _is_main_process() else None)
    if why is not None:
        raise RunnerError(why)
    ckpt = checkpoint_path(out_dir, spec)
    if _is_main_process() and force and ckpt.exists():
        ckpt.unlink()
    launch.barrier()
    if ckpt.exists():
        echo(f"resuming from {ckpt}")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        result = train(spec, progress=progress, checkpoint=ckpt)
    if _is_main_process():
        write_json_atomic(path, result)
        if ckpt.exists():
            ckpt.unlink()  # the result is written: the checkpoint has served
    echo(summary_line(spec, result, path))
    return result, True


def summary_line(spec: RunSpec, result: dict[str, Any], path: Path) -> str:
    """The one line a finished run prints."""
    f = result["final"]
    msg = (f"{spec.problem} {spec.method} seed {spec.seed}: "
           f"train loss {format_number(f['train_loss'])}")
    if "val_acc" in f and f["val_acc"] is not None:
        msg += f", val acc {100 * f['val_acc']:.2f}%"
    msg += (f", {f['iterations']} it, {f['epochs']:.2f} epochs, "
            f"{format_number(f['time_per_iter_s'], 1e3)} ms/it"
            + (" (DIVERGED" + (f": {f['error']}" if f.get("error") else "") + ")"
               if f["diverged"] else "") + f" -> {path}")
    return msg
