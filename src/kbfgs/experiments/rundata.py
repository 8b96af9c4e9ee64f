"""The data of a run: a problem's tensors on the training device, and their identity.

A run's data is identified by what was loaded, not by where it was found: the data set's name,
its source (a file name or the stand-in generator, without the directory) and a fingerprint of
the tensors (:func:`kbfgs.experiments.data.fingerprint`). The identity is part of the run's key
(:attr:`RunSpec.data`), so a run on the built-in CURVES stand-in and one on ``digs3pts_1.mat``
never share a run id or a report group, while the same files under another directory do.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .errors import RunnerError
from .problems import Problem, get_problem, prepare_inputs
from .spec import RunSpec

__all__ = ["ProblemData", "data_identity", "load_problem_data", "with_data_identity"]


@dataclass
class ProblemData:
    """Tensors of a problem on the training device."""

    x_train: Tensor
    y_train: Tensor | None
    x_val: Tensor | None
    y_val: Tensor | None
    note: str
    fill: Tensor | None = None  # padding value per channel for the crop augmentation
    #: ``name:source:fingerprint`` of the loaded data (see the module docstring)
    identity: str | None = None


_DATA_CACHE: dict[tuple, ProblemData] = {}


def data_identity(name: str, source: str, *tensors: Tensor | None) -> str:
    """``name:source:fingerprint`` of the tensors (the training and validation data as used)."""
    from .data import fingerprint

    return f"{name}:{source or 'unknown source'}:{fingerprint(*tensors)}"


def load_problem_data(problem: Problem, data_dir: str | None = None,
                      subset: int | None = None, device: str = "cpu") -> ProblemData:
    """Load (and cache per process) the data of ``problem`` on ``device``."""
    cache = _DATA_CACHE
    key = (problem.dataset, data_dir, subset, str(device), problem.image_shape)
    if key in cache:
        return cache[key]
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
    identity = data_identity(ds.name or problem.dataset, ds.source, x, y, xv, yv)
    dev = torch.device(device)
    x = prepare_inputs(problem, x).to(dev)
    xv = prepare_inputs(problem, xv).to(dev) if xv is not None else None
    fill = None
    if problem.augment:
        mean, std = _normalisation(problem.dataset)
        if mean is not None:
            fill = (-torch.tensor(mean) / torch.tensor(std)).to(dev)
    pd = ProblemData(x, y.to(dev) if y is not None else None, xv,
                     yv.to(dev) if yv is not None else None, note, fill, identity)
    cache[key] = pd
    return pd


def _normalisation(dataset: str) -> tuple[Any, Any]:
    from . import data as _data

    if dataset == "cifar10":
        return _data.CIFAR10_MEAN, _data.CIFAR10_STD
    if dataset == "cifar100":
        return _data.CIFAR100_MEAN, _data.CIFAR100_STD
    return None, None


def with_data_identity(spec: RunSpec) -> RunSpec:
    """``spec`` with :attr:`RunSpec.data` set to the identity of the data it loads (the data is
    loaded, or taken from the per-process cache). A spec whose ``data`` is already set must
    match what is loaded now: otherwise the files changed since the spec was made, and a
    :class:`RunnerError` says so."""
    problem = get_problem(spec.problem)
    data = load_problem_data(problem, spec.data_dir, spec.subset, spec.device)
    if spec.data is None:
        return dataclasses.replace(spec, data=data.identity)
    if spec.data != data.identity:
        raise RunnerError(f"the data found now ({data.identity}, {data.note}) is not the data "
                          f"this run was defined with ({spec.data}); rebuild the run's "
                          "specification (rerun the command)")
    return spec
