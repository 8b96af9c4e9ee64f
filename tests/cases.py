"""Scenarios shared by several test files: small models, data and optimizer builders.

Kept apart from the assertions (as curvlinops' ``cases.py``): a test file imports what it drives
from here and states only what it checks. Builders used by a single file stay in that file.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

import kbfgs

# the curvature optimizers built by `curvature_optimizer`
CURVATURE_METHODS = ("kbfgs", "kbfgs-l", "kfac")


def mlp(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    """6 -> 5 -> 4 -> 3 with Tanh between the three Linear layers, initialised from `seed`."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                         nn.Linear(4, 3)).to(dtype)


def regression_data(d_in: int, d_out: int, dtype: torch.dtype = torch.float32,
                    n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """One fixed batch (x of n x d_in, y of n x d_out), standard normal, seed 1."""
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, d_in, generator=g, dtype=dtype),
            torch.randn(n, d_out, generator=g, dtype=dtype))


def curvature_optimizer(name: str, model: nn.Module, **kw: Any) -> torch.optim.Optimizer:
    """K-BFGS, K-BFGS(L) (history 5) or KFAC (Gaussian likelihood) on `model`, lr 0.05 and
    damping 1.0 unless `kw` says otherwise."""
    kw = {"lr": 0.05, "damping": 1.0, **kw}
    if name == "kfac":
        return kbfgs.KFAC(model, **{"likelihood": "gaussian", **kw})
    if name == "kbfgs-l":
        return kbfgs.KBFGS(model, **{"history": 5, **kw})
    if name == "kbfgs":
        return kbfgs.KBFGS(model, **kw)
    raise ValueError(f"name must be one of {CURVATURE_METHODS}, got {name!r}")


def kill_after_first_result(cmd: list[str], out: Path, timeout: float) -> dict[str, int]:
    """Start ``cmd`` in its own session, SIGKILL it as soon as a result JSON appears in ``out``
    (or after ``timeout`` seconds), and return ``{file name: mtime_ns}`` of the results it left."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and not list(out.glob("*.json")):
            if proc.poll() is not None:
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
