"""Result files: their schema, atomic JSON writing, and the environment a result records.

Shared by the runner and the benchmarks (``bench/common.py``). A result file is written through
a temporary file in the same directory, flushed and ``fsync``-ed, then renamed over the target
(``os.replace``), so a directory of results only ever holds whole files.

Schema (``RESULT_SCHEMA = 1``) of a runner result, top level: ``schema``, ``status``
("finished"), ``run_id``, ``problem``, ``method``, ``optimizer``, ``optimizer_class``, ``hps``,
``seed``, ``spec`` (every :class:`~kbfgs.experiments.spec.RunSpec` field; ``spec.data`` is the
data identity, absent from files written before it existed: unknown data), ``problem_info``,
``data``, ``env`` (:func:`environment`), ``started``, ``final``, ``log``, optionally ``stats``
and ``resumed``, ``finished``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "RESULT_SCHEMA",
    "device_name",
    "environment",
    "git_info",
    "json_safe",
    "load_result",
    "write_json_atomic",
]

RESULT_SCHEMA = 1


def json_safe(obj: Any) -> Any:
    """``obj`` with non-finite floats as None, tensors and numpy scalars as numbers or lists,
    paths as strings, tuples as lists and dict keys as strings (anything else: ``str``)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, Tensor):
        return json_safe(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if hasattr(obj, "item"):
        return json_safe(obj.item())
    return str(obj)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file, ``fsync`` and
    ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            json.dump(json_safe(obj), f, indent=1, allow_nan=False)
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


def _git(cwd: Path, *args: str) -> str | None:
    try:
        r = subprocess.run(["git", *args], check=False, cwd=cwd, capture_output=True, text=True,
                           timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def git_info(cwd: str | os.PathLike | None = None, pathspec: str | None = None,
             changes: bool = False) -> dict[str, Any]:
    """``{"commit", "dirty"}`` of the git checkout at ``cwd`` (default: the one kbfgs runs
    from; ``{"commit": None}`` outside a checkout). ``dirty``: tracked files changed (under
    ``pathspec`` only, when given); with ``changes``, also the ``git status`` lines."""
    if cwd is None:
        import kbfgs

        cwd = Path(kbfgs.__file__).resolve().parent
    here = Path(cwd)
    commit = _git(here, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None}
    status = _git(here, "status", "--porcelain", "--untracked-files=no",
                  *(("--", pathspec) if pathspec else ()))
    out: dict[str, Any] = {"commit": commit, "dirty": None if status is None else bool(status)}
    if changes:
        out["changes"] = status.splitlines() if status else None
    return out


def device_name(device: torch.device | str) -> str:
    """The GPU's name, or the CPU's model name (``/proc/cpuinfo``, else ``platform``)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device | str) -> dict[str, Any]:
    """What a runner result records about where it ran."""
    import numpy

    import kbfgs

    from .. import distributed

    dev = torch.device(device)
    return {
        "kbfgs": getattr(kbfgs, "__version__", None),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "device": str(dev),
        "device_name": device_name(dev),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "git": git_info(),
        "argv": list(sys.argv),
        "world_size": distributed.world_size(),
    }
