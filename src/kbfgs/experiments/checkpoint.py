"""Checkpoint files of a (possibly data-parallel) training run.

A checkpoint is ``{"model", "optimizer", "extra", "world_size"}`` written by rank 0 with
``torch.save`` to a temporary file, flushed to disk (``fsync``) and renamed over the target, so a
crash leaves either the old file or the new one, never half of one. It is read back with
``torch.load(weights_only=True)``: tensors, numbers, strings, lists, tuples and dicts only, so a
file planted in a results directory cannot run code when it is loaded. A file that is empty,
truncated, not a checkpoint or holds anything else raises :class:`CheckpointError`, one line
naming the file.

:func:`read_checkpoint` checks a file without touching a model (the runner compares its run id
before anything is loaded); :func:`apply_checkpoint` loads it into a model and optimizer;
:func:`load_checkpoint` does both.
"""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import distributed
from .errors import RunnerError
from .launch import barrier, is_main_process

__all__ = ["CheckpointError", "apply_checkpoint", "load_checkpoint", "read_checkpoint",
           "save_checkpoint"]

#: the entries of every checkpoint file
CHECKPOINT_KEYS = ("model", "optimizer", "extra", "world_size")
_ADVICE = "remove it or pass another file"


class CheckpointError(RunnerError):
    """A checkpoint file that cannot be used: empty, truncated, foreign or unsafe."""


def _unwrap(model: nn.Module) -> nn.Module:
    return distributed.unwrap_model(model)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_checkpoint_file(path: str | os.PathLike, state: dict[str, Any]) -> None:
    """``torch.save(state)`` to ``path`` atomically: a temporary file in the same directory,
    flushed and ``fsync``-ed, then ``os.replace`` (and the directory ``fsync``-ed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Any,
                    extra: dict[str, Any] | None = None) -> None:
    """Rank 0 writes ``{"model", "optimizer", "extra", "world_size"}`` to ``path`` atomically
    (fsync before the rename); every rank then waits at a barrier. The model state is the
    unwrapped module's (no ``module.`` prefix) and the optimizer state is identical on every
    rank, so the file resumes on any world size with the same global batch
    (:func:`load_checkpoint`). ``extra`` must hold only tensors, numbers, strings, ``None`` and
    lists, tuples or dicts of them (what :func:`read_checkpoint` loads back)."""
    if is_main_process():
        state = {"model": _unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "extra": extra or {}, "world_size": distributed.world_size()}
        write_checkpoint_file(path, state)
    barrier()


def _reason(e: BaseException) -> str:
    """One line saying why ``torch.load`` failed."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in text:
        detail = text.split("WeightsUnpickler error:", 1)[-1] if "WeightsUnpickler error:" \
            in text else ""
        first = next((ln.strip() for ln in detail.splitlines() if ln.strip()), "")
        return ("it holds Python objects other than tensors and plain data, which are not "
                "loaded" + (f" ({first[:120]})" if first else ""))
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    if isinstance(e, (EOFError, RuntimeError)) or "zip archive" in first:
        return f"truncated or corrupt ({type(e).__name__}{': ' + first[:120] if first else ''})"
    return f"not a torch checkpoint ({type(e).__name__}{': ' + first[:120] if first else ''})"


def read_checkpoint(path: str | os.PathLike, map_location: Any = "cpu",
                    advice: str = _ADVICE) -> dict[str, Any]:
    """The content of a :func:`save_checkpoint` file, loaded with ``weights_only=True``.

    Nothing is loaded into a model. Raises :class:`CheckpointError` (one line: the file, what
    is wrong with it, then ``advice``) for a missing, empty, truncated, unsafe or foreign file.
    """
    name = os.fspath(path)
    try:
        size = os.path.getsize(name)
    except OSError as e:
        raise CheckpointError(f"checkpoint {name}: cannot be read ({e.strerror}); "
                              f"{advice}") from e
    if size == 0:
        raise CheckpointError(f"checkpoint {name} is empty (0 bytes); {advice}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "Detected pickle protocol ..."
            state = torch.load(name, map_location=map_location, weights_only=True)
    except Exception as e:  # any failure to read is a bad file
        raise CheckpointError(f"checkpoint {name} cannot be loaded: {_reason(e)}; "
                              f"{advice}") from e
    if not isinstance(state, dict) or any(k not in state for k in CHECKPOINT_KEYS[:3]) \
            or not isinstance(state.get("extra"), dict):
        found = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise CheckpointError(f"checkpoint {name} is not a kbfgs checkpoint (expected the "
                              f"entries model, optimizer, extra; found {found}); {advice}")
    return state


def apply_checkpoint(state: dict[str, Any], model: nn.Module, optimizer: Any) -> dict[str, Any]:
    """Load a :func:`read_checkpoint` state into ``model`` (wrapped or not) and ``optimizer``;
    returns its ``extra`` dict."""
    _unwrap(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state["extra"]


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Any,
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Load a :func:`save_checkpoint` file into ``model`` (wrapped or not) and ``optimizer`` on
    this rank (``weights_only=True``: no code in the file runs); returns its ``extra`` dict."""
    return apply_checkpoint(read_checkpoint(path, map_location), model, optimizer)
