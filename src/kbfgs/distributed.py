"""Data-parallel K-BFGS and KFAC on ``torch.distributed`` (DDP, launched by ``torchrun``).

Everything the optimizers, the runner and the command line need from ``torch.distributed``
lives here, so that a single-process run never touches it and a test can count every byte
that goes through a collective (all of them go through :func:`_all_reduce` or
:func:`_broadcast`).

Optimizer side (see ``docs/distributed.md``):

* :func:`process_group` decides, once per step, whether curvature is averaged across ranks: only
  for a model wrapped in ``DistributedDataParallel`` whose process group has more than one rank.
  Otherwise every function below returns at once and costs nothing.
* :func:`all_reduce_flat` averages (or sums) a list of tensors in place with one ``all_reduce``
  per (dtype, device) bucket: the tensors are concatenated into one flat buffer, reduced and split
  back. One call for all layers, never one call per layer.
* K-BFGS, exactly: ``A s_A = E_n[sum_t (a_t^T s_A) a_t]`` with ``s_A = H_A a_bar`` needs the
  *global* ``a_bar`` before ``A s_A`` is formed (averaging local ``A_r H_A a_bar_r`` over ranks is
  not the global quantity). :func:`exact_A_s` lets the layer hooks keep a reference to each
  layer's input (autograd holds it anyway for the weight gradient) until the model's forward
  pass ends; then one flat all-reduce of every layer's ``a_bar``, and ``A s_A`` of every layer
  from its input and the global ``s_A``; the references are dropped there. After the extra pass,
  :func:`reduce_curvature` averages ``A s_A``, ``h_bar``, ``Dh_bar`` (pre) and ``h_bar+``,
  ``Dh_bar+`` (post) with one flat all-reduce. Two collectives per curvature update.
* :func:`all_true` makes every rank take the same skip decision for a non-finite loss (a loss is
  local to a rank; gradients are already equal after DDP's all-reduce).

Runner side: :func:`launch` (``init_process_group`` from the ``torchrun`` environment with a
timeout, rank-tagged error report, ``destroy_process_group``), :func:`prepare_model` (DDP
wrapping, optional SyncBatchNorm, per-rank seed), :func:`shard` (this rank's contiguous slice of
the global minibatch), :func:`agree` / :func:`broadcast_object` (rank 0 decides),
:func:`save_checkpoint` / :func:`load_checkpoint` (rank 0 writes; resume on any world size).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any, Callable

import torch
from torch import Tensor, nn

__all__ = [
    "ENV_SYNC_BN",
    "ENV_TIMEOUT",
    "agree",
    "all_reduce_flat",
    "all_true",
    "broadcast_object",
    "exact_A_s",
    "get_world_size",
    "is_main_process",
    "launch",
    "load_checkpoint",
    "prepare_model",
    "process_group",
    "rank",
    "reduce_curvature",
    "reduce_warm_start",
    "save_checkpoint",
    "shard",
    "shard_dataset",
    "world_size",
]

#: seconds a collective may wait for the other ranks before every rank fails (default 300)
ENV_TIMEOUT = "KBFGS_DIST_TIMEOUT"
#: "1": the runner converts BatchNorm layers to SyncBatchNorm (CUDA only)
ENV_SYNC_BN = "KBFGS_SYNC_BN"
_DEFAULT_TIMEOUT_S = 300.0


# ---------------------------------------------------------------------------------------------
# The collectives (the only places that call torch.distributed collectives)
# ---------------------------------------------------------------------------------------------


def _dist() -> Any:
    import torch.distributed as dist

    return dist


def _initialized() -> bool:
    dist = _dist()
    return dist.is_available() and dist.is_initialized()


def _all_reduce(tensor: Tensor, group: Any) -> None:
    """In-place sum over the ranks of ``group``. Every optimizer collective goes through here."""
    dist = _dist()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


def _broadcast(tensor: Tensor, src: int = 0, group: Any = None) -> None:
    _dist().broadcast(tensor, src=src, group=group)


def get_world_size(group: Any) -> int:
    """Number of ranks in ``group`` (``None``: the default group)."""
    return _dist().get_world_size(group)


def process_group(model: nn.Module) -> Any | None:
    """The process group curvature is averaged over, or ``None`` (single process: no work).

    Curvature is averaged only for a model wrapped in ``DistributedDataParallel`` (its
    ``process_group``) with more than one rank: a user who runs independent models per rank (e.g.
    a grid search under ``torchrun``) or synchronises gradients by hand is not affected.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(model, DistributedDataParallel) or not _initialized():
        return None
    group = getattr(model, "process_group", None)
    return group if get_world_size(group) > 1 else None


def all_reduce_flat(tensors: Sequence[Tensor | None], group: Any, average: bool = True) -> int:
    """Average (``average=True``) or sum the tensors over the ranks of ``group``, in place.

    The tensors are concatenated per (dtype, device) into one flat buffer (buckets in order of
    first appearance), each buffer is all-reduced once and copied back. ``None`` entries are
    skipped. Every rank must pass tensors of the same shapes in the same order. Returns the
    number of collectives issued (0 when ``group`` is ``None``).
    """
    if group is None:
        return 0
    buckets: dict[tuple, list[Tensor]] = {}
    for t in tensors:
        if t is not None:
            buckets.setdefault((t.dtype, t.device), []).append(t)
    if not buckets:
        return 0
    world = get_world_size(group)
    for ts in buckets.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        _all_reduce(flat, group)
        if average:
            flat.div_(world)
        for t, part in zip(ts, flat.split([t.numel() for t in ts])):
            t.copy_(part.view_as(t))
    return len(buckets)


def all_true(flag: bool, group: Any, device: torch.device | None = None) -> bool:
    """Whether ``flag`` holds on every rank of ``group`` (``flag`` itself without a group)."""
    if group is None:
        return flag
    t = torch.tensor([0.0 if flag else 1.0], device=device)
    _all_reduce(t, group)
    return bool(t.item() == 0.0)


# ---------------------------------------------------------------------------------------------
# K-BFGS: exact A s_A from the global a_bar, one flat reduction of the other vectors
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def exact_A_s(model: nn.Module, records: dict, capture: Any,
              s_A_fn: Callable[[str, Any], Tensor | None], group: Any) -> Iterator[None]:
    """Around the closure of a K-BFGS curvature pass whose hooks defer ``A s_A``.

    When the (unwrapped) model's forward pass ends, the local ``a_bar`` of every layer that
    deferred ``A s_A`` is averaged over ``group`` (one flat all-reduce), then
    ``capture.finish_A_s`` forms ``s_A = H_A a_bar`` and ``A s_A`` from the kept layer inputs and
    drops them. A layer the closure calls outside the model's forward is finished the same way
    when the closure returns. No-op when ``group`` is ``None``.
    """
    if group is None:
        yield
        return
    from .optim.base import unwrap_model

    def finish() -> None:
        pending = [r for r in records.values() if r.pending_x is not None]
        if pending:
            all_reduce_flat([r.a_bar for r in pending], group)
            capture.finish_A_s(records, s_A_fn)

    handle = unwrap_model(model).register_forward_hook(lambda module, args, output: finish())
    try:
        yield
        finish()
    finally:
        handle.remove()
        for r in records.values():
            r.pending_x = None


def reduce_curvature(pre: dict, post: dict, group: Any) -> int:
    """Average the vectors of a K-BFGS curvature update over ``group`` with one flat all-reduce
    (per dtype): ``A s_A``, ``h_bar``, ``Dh_bar`` (and the explicit ``A`` of the 2020 variants)
    of the pass before the step, ``h_bar+``, ``Dh_bar+`` of the extra pass. ``a_bar`` and
    ``s_A`` are already global (:func:`exact_A_s`). Returns the number of collectives."""
    if group is None:
        return 0
    tensors: list[Tensor | None] = []
    for name, r0 in pre.items():
        tensors += [r0.A_s, r0.h_bar, r0.Dh_bar, r0.A]
        r1 = post.get(name)
        if r1 is not None:
            tensors += [r1.h_bar, r1.Dh_bar]
    return all_reduce_flat(tensors, group)


def reduce_warm_start(layers: Sequence[Any], sums: dict[str, Tensor], count: dict[str, int],
                      locations: dict[str, int], dtype_fn: Callable[[nn.Module], torch.dtype],
                      group: Any) -> None:
    """Sum the warm-start sums ``sum_n sum_t a_t a_t^T`` and sample counts over ``group``, in
    place (``sums``, ``count``, ``locations`` are updated). A rank without data for a layer
    contributes zeros, so every rank passes the same layout."""
    if group is None:
        return
    header = []
    mats = []
    for layer in layers:
        cols = layer.helper.dims(layer.module)[1]
        dev = layer.module.weight.device
        present = layer.name in sums
        mats.append(sums[layer.name] if present else
                    torch.zeros(cols, cols, dtype=dtype_fn(layer.module), device=dev))
        header.append(torch.tensor([float(count.get(layer.name, 0)), float(present),
                                    float(locations.get(layer.name, 0))],
                                   dtype=torch.float64, device=dev))
    all_reduce_flat(header + mats, group, average=False)
    for layer, h, A in zip(layers, header, mats):
        n, ranks, locs = h.tolist()
        if n > 0:
            sums[layer.name] = A
            count[layer.name] = round(n)
            locations[layer.name] = round(locs / ranks)


# ---------------------------------------------------------------------------------------------
# Ranks, launch and the runner
# ---------------------------------------------------------------------------------------------


def rank() -> int:
    """This process's rank (0 without ``torch.distributed``)."""
    return _dist().get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of ranks (1 without ``torch.distributed``)."""
    return _dist().get_world_size() if _initialized() else 1


def is_main_process() -> bool:
    """Rank 0 (or no ``torch.distributed``): the process that logs and writes files."""
    return rank() == 0


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
    value = float(raw)
    if not value > 0:
        raise ValueError(f"{ENV_TIMEOUT} must be a number of seconds > 0, got {raw!r}")
    return value


def _comm_device() -> torch.device:
    dist = _dist()
    if dist.get_backend() == "nccl":
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
        yield world_size()
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
    if world_size() <= 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    dev = torch.device(device) if device is not None else next(model.parameters()).device
    if os.environ.get(ENV_SYNC_BN, "") == "1":
        if dev.type != "cuda":
            raise ValueError(f"{ENV_SYNC_BN}=1 needs CUDA: torch's SyncBatchNorm runs on GPUs only")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    ids = [torch.cuda.current_device()] if dev.type == "cuda" else None
    wrapped = DistributedDataParallel(model, device_ids=ids)
    if seed is not None and rank() > 0:
        torch.manual_seed(rank_seed(seed, rank()))
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
    world = world_size()
    if t is None or world <= 1:
        return t
    m = t.shape[0]
    if m % world:
        raise ValueError(f"the global batch size {m} is not a multiple of the world size "
                         f"{world}; choose --batch-size divisible by the number of processes")
    k = m // world
    r = rank()
    return t[r * k:(r + 1) * k]


def shard_dataset(t: Tensor) -> Tensor:
    """Every ``world``-th sample starting at this rank (warm start: sums add over ranks)."""
    world = world_size()
    return t if world <= 1 else t[rank()::world]


def agree(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (``flag`` itself in a single process)."""
    if world_size() <= 1:
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_comm_device())
    _broadcast(t, 0)
    return bool(t.item())


def broadcast_object(obj: Any) -> Any:
    """Rank 0's ``obj`` (picklable) on every rank (``obj`` itself in a single process)."""
    if world_size() <= 1:
        return obj
    box = [obj]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if world_size() > 1:
        _dist().barrier()


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Any,
                    extra: dict[str, Any] | None = None) -> None:
    """Rank 0 writes ``{"model", "optimizer", "extra", "world_size"}`` to ``path`` atomically;
    every rank then waits at a barrier. The model state is the unwrapped module's (no
    ``module.`` prefix) and the optimizer state is identical on every rank, so the file resumes
    on any world size with the same global batch (:func:`load_checkpoint`)."""
    from .optim.base import unwrap_model

    if is_main_process():
        state = {"model": unwrap_model(model).state_dict(), "optimizer": optimizer.state_dict(),
                 "extra": extra or {}, "world_size": world_size()}
        path = os.fspath(path)
        tmp = f"{path}.tmp-{os.getpid()}"
        try:
            torch.save(state, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    barrier()


def load_checkpoint(path: str | os.PathLike, model: nn.Module, optimizer: Any,
                    map_location: Any = "cpu") -> dict[str, Any]:
    """Load a :func:`save_checkpoint` file into ``model`` (wrapped or not) and ``optimizer`` on
    this rank; returns its ``extra`` dict."""
    from .optim.base import unwrap_model

    state = torch.load(os.fspath(path), map_location=map_location, weights_only=False)
    unwrap_model(model).load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    return state.get("extra", {})
