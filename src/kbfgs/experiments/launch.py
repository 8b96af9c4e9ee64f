"""Processes of a run under ``torchrun``: launch, model wrapping, seeding, sharding, agreement.

The runner's side of data-parallel training (the optimizers' side, the collectives over a model's
process group, is :mod:`kbfgs.distributed`):

* :func:`launch` initialises ``torch.distributed`` from the ``torchrun`` environment with a
  timeout, reports a rank's exception tagged with its rank and destroys the process group.
* :func:`prepare_model` wraps the model in ``DistributedDataParallel`` (optional SyncBatchNorm)
  and reseeds ranks > 0 (:func:`rank_seed`).
* :func:`shard` keeps this rank's contiguous slice of a global minibatch; :func:`shard_dataset`
  every ``world``-th sample (warm start).
* :func:`agree` / :func:`broadcast_object`: rank 0 decides, every rank follows.

Everything here returns at once in a single process (world size 1). See ``docs/distributed.md``.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed

__all__ = [
    "ENV_SYNC_BN",
    "ENV_TIMEOUT",
    "agree",
    "barrier",
    "broadcast_object",
    "is_main_process",
    "launch",
    "prepare_model",
    "rank_seed",
    "shard",
    "shard_dataset",
    "timeout_seconds",
]

#: seconds a collective may wait for the other ranks before every rank fails (default 300)
ENV_TIMEOUT = "KBFGS_DIST_TIMEOUT"
#: "1": the runner converts BatchNorm layers to SyncBatchNorm (CUDA only)
ENV_SYNC_BN = "KBFGS_SYNC_BN"
_DEFAULT_TIMEOUT_S = 300.0


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def is_main_process() -> bool:
    """Rank 0 (or no ``torch.distributed``): the process that logs and writes files."""
    return distributed.rank() == 0


def _env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def timeout_seconds() -> float:
    """The collective timeout: ``$KBFGS_DIST_TIMEOUT`` seconds (default 300)."""
    raw = os.environ.get(ENV_TIMEOUT)
    if raw is None or raw == "":
        return _DEFAULT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise ValueError(f"{ENV_TIMEOUT} must be a finite number of seconds > 0, got {raw!r}")
    return value


def _comm_device() -> torch.device:
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


@contextlib.contextmanager
def launch(device: str = "cpu") -> Iterator[int]:
    """Initialise ``torch.distributed`` from the ``torchrun`` environment when ``WORLD_SIZE > 1``.

    Backend: nccl for a CUDA ``device`` (``torch.cuda.set_device(LOCAL_RANK)`` first), gloo
    otherwise; timeout ``$KBFGS_DIST_TIMEOUT`` seconds (default 300), so that a rank waiting for a
    dead or stuck peer fails instead of hanging. An exception inside the block is reported on
    stderr as ``kbfgs: rank R/W: Error: message`` and re-raised; the process group is destroyed
    on the way out (the other ranks' pending collectives then fail at once with gloo, or at the
    timeout). Yields the world size (1: nothing initialised).
    """
    world = _env_world_size()
    started = False
    if world > 1 and not _initialized():
        dist = _dist()
        cuda = str(device).startswith("cuda")
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend="nccl" if cuda else "gloo",
                                timeout=datetime.timedelta(seconds=timeout_seconds()))
        started = True
    try:
        yield distributed.world_size()
    except BaseException as e:
        if world > 1:
            print(f"kbfgs: rank {os.environ.get('RANK', '?')}/{world}: {type(e).__name__}: {e}",
                  file=sys.stderr, flush=True)
        raise
    finally:
        if started and _initialized():
            with contextlib.suppress(Exception):
                _dist().destroy_process_group()


def prepare_model(model: nn.Module, device: Any = None, seed: int | None = None) -> nn.Module:
    """The model to train on this rank: ``model`` itself in a single process; with more than
    one rank, ``DistributedDataParallel(model)`` (``device_ids`` the current CUDA device on GPU;
    BatchNorm converted to SyncBatchNorm when ``$KBFGS_SYNC_BN=1``, CUDA only). With ``seed``,
    ranks > 0 then reseed the global RNG with a rank-specific seed (dropout and any other
    random layer differ across ranks; model initialisation, done before, is the same, and DDP
    broadcasts rank 0's parameters anyway)."""
    if distributed.world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if os.environ.get(ENV_SYNC_BN, "") == "1":
        if dev.type != "cuda":
            raise ValueError(f"{ENV_SYNC_BN}=1 needs CUDA: torch's SyncBatchNorm runs on GPUs only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [torch.cuda.current_device()] if dev.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=ids)
    r = distributed.rank()
    if seed is not None and r > 0:
        torch.manual_seed(rank_seed(seed, r))
    return wrapped


def rank_seed(seed: int, r: int) -> int:
    """A seed for rank ``r`` derived from ``seed`` (rank 0 keeps ``seed``)."""
    if r == 0:
        return int(seed)
    digest = hashlib.blake2b(f"{int(seed)}:rank:{int(r)}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def shard(t: Tensor | None) -> Tensor | None:
    """This rank's contiguous slice of a global minibatch (``t`` itself in a single process).

    The global batch size must be a multiple of the world size (equal shards make the average
    of the ranks' curvature and gradients the global one)."""
    world = distributed.world_size()
    if t is None or world <= 1:
        return t
    m = t.shape[0]
    if m % world:
        raise ValueError(f"the global batch size {m} is not a multiple of the world size "
                         f"{world}; choose --batch-size divisible by the number of processes")
    k = m // world
    r = distributed.rank()
    return t[r * k:(r + 1) * k]


def shard_dataset(t: Tensor) -> Tensor:
    """Every ``world``-th sample starting at this rank (warm start: sums add over ranks)."""
    world = distributed.world_size()
    return t if world <= 1 else t[distributed.rank()::world]


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (``flag`` itself in a single process)."""
    if distributed.world_size() <= 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    _dist().broadcast(t, src=0)
    return bool(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank (``obj`` itself in a single process)."""
    if distributed.world_size() <= 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    if distributed.world_size() > 1:
        _dist().barrier()
