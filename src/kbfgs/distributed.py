"""Data-parallel K-BFGS and KFAC on ``torch.distributed`` (DDP, launched by ``torchrun``).

Everything the optimizers, the runner and the command line need from ``torch.distributed``
lives here, so that a single-process run never touches it and a test can count every byte
that goes through an optimizer collective (all of them go through :func:`_all_reduce`).

Optimizer side (see ``docs/distributed.md``):

* :func:`process_group` decides, once per step, whether curvature is averaged across ranks: only
  for a model wrapped in ``DistributedDataParallel`` whose process group has more than one rank.
  Otherwise every function below returns at once and costs nothing.
* :func:`all_reduce_flat` averages (or sums) a list of tensors in place with one ``all_reduce``
  per (dtype, device) bucket: the tensors are concatenated into one flat buffer, reduced and split
  back. One call for all layers, never one call per layer.
* :func:`all_true` makes every rank take the same skip decision for a non-finite loss (a loss is
  local to a rank; gradients are already equal after DDP's all-reduce).
* :func:`rank` / :func:`world_size` of a group, :func:`unwrap_model`.

This module is a leaf: it imports only torch and knows nothing of the algorithms. What the
optimizers reduce is decided next to their records: K-BFGS's exact ``A s_A`` protocol and the
curvature reduction in :mod:`kbfgs.capture` (``Capture.kbfgs_pre``, ``reduce_kbfgs_records``),
the warm-start sums in ``kbfgs.optim.base``, KFAC's factors in ``kbfgs.optim.kfac``.

The runner's side (launch, model wrapping, sharding, seeding, rank-0 decisions) is
:mod:`kbfgs.experiments.launch`; checkpoint files are :mod:`kbfgs.experiments.checkpoint`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "all_reduce_flat",
    "all_true",
    "get_world_size",
    "process_group",
    "rank",
    "unwrap_model",
    "world_size",
]


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


def get_world_size(group: Any) -> int:
    """Number of ranks in ``group`` (``None``: the default group)."""
    return _dist().get_world_size(group)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The inner module of a ``DistributedDataParallel`` / ``DataParallel`` wrapper and of
    ``torch.compile`` (its ``_orig_mod``: hooks and replayed calls then run eagerly)."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    while True:
        if isinstance(model, (DistributedDataParallel, DataParallel)):
            model = model.module
        elif type(model).__name__ == "OptimizedModule" and isinstance(
                inner := getattr(model, "_orig_mod", None), torch.nn.Module):
            model = inner
        else:
            return model


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
# Ranks
# ---------------------------------------------------------------------------------------------


def rank(group: Any = None) -> int:
    """This process's rank in ``group`` (``None``: the default group; 0 without
    ``torch.distributed``)."""
    return _dist().get_rank(group) if _initialized() else 0


def world_size(group: Any = None) -> int:
    """Number of ranks in ``group`` (``None``: the default group; 1 without
    ``torch.distributed``)."""
    return _dist().get_world_size(group) if _initialized() else 1


