"""Distributed data-parallel K-BFGS and KFAC (issue 6).

* In-process checks with a recording fake of the collective (world size 2, every rank holding the
  same data): the flat bucketed all-reduce, the exact A s_A path, what single-process use pays
  (nothing), and the bytes per curvature update on VGG16 and ResNet32 (docs/distributed.md).
* One multi-process run (2 processes, gloo, CPU, float64): R ranks with batch m/R give the
  parameters of 1 process with batch m (K-BFGS with update_freq 1/2 and history None/2, the
  moving-average variant, warm start, KFAC with deterministic targets), BatchNorm under DDP
  equals per-shard ("ghost") BatchNorm in one process, the extra pass all-reduces no gradient,
  a checkpoint written by rank 0 of a 2-rank run resumes in 1 process, and a rank that raises
  makes both ranks exit with an error instead of hanging.
* ``torchrun --nproc_per_node 2 -m kbfgs run`` equals the 1-process run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from kbfgs import distributed
from kbfgs.experiments import checkpoint, launch
from kbfgs.experiments import models as paper_models
from kbfgs.optim import kfac as kfac_mod

WORLD = 2
GLOBAL_BATCH = 8
STEPS = 5
CKPT_STEP = 3


# ---------------------------------------------------------------------------------------------
# Models, data and the training loop shared by the workers and the single-process references
# ---------------------------------------------------------------------------------------------


class GhostBN(nn.Module):
    """BatchNorm applied to each of ``chunks`` equal parts of the batch separately (what DDP with
    plain BatchNorm computes across ``chunks`` ranks). Holds the BN module itself, so the
    parameters are the same tensors in the same order as in the plain model."""

    def __init__(self, bn: nn.Module, chunks: int) -> None:
        super().__init__()
        self.bn, self.chunks = bn, chunks

    def forward(self, x):
        return torch.cat([self.bn(part) for part in x.chunk(self.chunks)])


def _model(kind: str, ghost: int = 0) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        m = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(),
                          nn.Linear(4, 3))
    elif kind == "cnn":
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                          nn.Conv2d(3, 4, 3, stride=2, bias=False), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    elif kind == "cnn_bn":
        bn: nn.Module = nn.BatchNorm2d(3)
        if ghost:
            bn = GhostBN(bn, ghost)
        # BatchNorm after the activation: a layer *directly* followed by training-mode
        # BatchNorm has Dh_bar = 0 up to rounding, so its H_G pairs are rounding noise and no
        # two summation orders agree (docs/distributed.md)
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), bn,
                          nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    elif kind == "cnn_bn_direct":
        # a conv directly followed by BatchNorm: its H_G pairs are rounding noise, which
        # kbfgs-plus with fisher_G replaces by the Fisher left factor
        bn = nn.BatchNorm2d(3)
        if ghost:
            bn = GhostBN(bn, ghost)
        m = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), bn, nn.Tanh(),
                          nn.Conv2d(3, 4, 3, stride=2), nn.Tanh(),
                          nn.Flatten(), nn.Linear(4 * 3 * 3, 3))
    else:
        raise ValueError(kind)
    return m.double()


def _data(kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Three global minibatches (x, y) and a warm-start set, all float64."""
    g = torch.Generator().manual_seed(1)
    shape = (6,) if kind == "mlp" else (2, 7, 7)
    xs = [torch.randn((GLOBAL_BATCH,) + shape, generator=g, dtype=torch.float64)
          for _ in range(3)]
    ys = [torch.randn(GLOBAL_BATCH, 3, generator=g, dtype=torch.float64) for _ in range(3)]
    warm = torch.randn((2 * GLOBAL_BATCH,) + shape, generator=g, dtype=torch.float64)
    return xs, ys, warm


def _deterministic_targets(output, likelihood, generator):
    """Replaces KFAC's sampled targets in the equivalence test: a per-sample function of the
    output, so that the factors do not depend on how the batch is split (the real draws are
    seeded per rank, see docs/distributed.md)."""
    out = output.detach()
    return out + torch.cos(3.0 * out)


SCENARIOS: dict[str, dict] = {
    "mlp-kbfgs-T1": {"model": "mlp", "opt": "kbfgs", "hp": {"update_freq": 1}, "ckpt": True},
    "mlp-kbfgsL-T2": {"model": "mlp", "opt": "kbfgs", "hp": {"update_freq": 2, "history": 2}},
    "mlp-kbfgs20-T1": {"model": "mlp", "opt": "kbfgs",
                           "hp": {"update_freq": 1, "damping_rule": "dd",
                                   "hessian_action": "moving_average", "damping_split": "sqrt"}},
    "cnn-kbfgsL-T1": {"model": "cnn", "opt": "kbfgs", "hp": {"update_freq": 1, "history": 2}},
    "cnn-kbfgs-T2-warm": {"model": "cnn", "opt": "kbfgs", "hp": {"update_freq": 2}, "warm": True},
    "mlp-kfac": {"model": "mlp", "opt": "kfac", "hp": {"stat_freq": 1, "inv_freq": 2}},
    "cnn-kfac-warm": {"model": "cnn", "opt": "kfac", "hp": {"stat_freq": 2, "inv_freq": 2},
                      "warm": True},
    "cnnbn-kbfgs-T1": {"model": "cnn_bn", "opt": "kbfgs", "hp": {"update_freq": 1}},
    # kbfgs-plus without the extra pass: the "+" records come from the next step's pass
    "cnn-plus-nc-T2": {"model": "cnn", "opt": "kbfgs-plus",
                       "hp": {"update_freq": 2, "closure_free": True}},
    # the Fisher left factor of a BatchNorm-fed conv: Gamma averaged over the ranks
    "cnnbn-plus-fisher-T1": {"model": "cnn_bn_direct", "opt": "kbfgs-plus",
                             "hp": {"update_freq": 1, "closure_free": False, "fisher_G": True}},
}
#: the scenarios with BatchNorm, whose DDP result is per-shard BatchNorm in one process
_BN_SCENARIOS = ("cnnbn-kbfgs-T1", "cnnbn-plus-fisher-T1")


def _optimizer(sc: dict, model: nn.Module):
    if sc["opt"] == "kbfgs-plus":
        return kbfgs.make_optimizer("kbfgs-plus", model, lr=0.01, damping=0.5, momentum=0.9,
                                    weight_decay=1e-3, **sc["hp"])
    if sc["opt"] == "kbfgs":
        return kbfgs.KBFGS(model, lr=0.1, damping=0.5, momentum=0.9, weight_decay=1e-3,
                           **sc["hp"])
    return kbfgs.KFAC(model, lr=0.1, damping=0.5, momentum=0.9, likelihood="gaussian",
                      **sc["hp"])


def _closure(model, opt, x, y):
    def closure():
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = 0.5 * (out - y).square().sum() / x.shape[0]
        loss.backward()
        return loss
    return closure


def _train(sc: dict, model: nn.Module, opt, steps: range, part=lambda t: t, on_step=None):
    xs, ys, _ = _data(sc["model"])
    for k in steps:
        x, y = xs[k % len(xs)], ys[k % len(ys)]
        opt.step(_closure(model, opt, part(x), part(y)))
        if on_step is not None:
            on_step(k + 1)


def _flat_params(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _reference(name: str, ghost: int = 0) -> tuple[torch.Tensor, object]:
    sc = SCENARIOS[name]
    model = _model(sc["model"], ghost=ghost)
    opt = _optimizer(sc, model)
    if sc.get("warm"):
        opt.warm_start([_data(sc["model"])[2]])
    _train(sc, model, opt, range(STEPS))
    return _flat_params(model), opt


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------
# In-process checks with a recording fake of the collective
# ---------------------------------------------------------------------------------------------


class _FakeWorld:
    """``world`` ranks that all hold this process's tensors: the sum is ``world * t``."""

    def __init__(self, world: int = 2) -> None:
        self.world = world
        self.calls: list[tuple[int, int, torch.dtype]] = []

    def install(self, monkeypatch) -> _FakeWorld:
        monkeypatch.setattr(distributed, "process_group", lambda model: "fake-group")
        monkeypatch.setattr(distributed, "get_world_size", lambda group: self.world)
        monkeypatch.setattr(distributed, "_all_reduce", self.all_reduce)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda group=None: 0)  # KFAC's seed
        return self

    def all_reduce(self, t: torch.Tensor, group) -> None:
        assert group == "fake-group"
        self.calls.append((t.numel(), t.numel() * t.element_size(), t.dtype))
        t.mul_(self.world)

    def curvature(self) -> list[tuple[int, int, torch.dtype]]:
        """Calls other than the one-element skip-decision flag of every step."""
        return [c for c in self.calls if c[0] != 1]


def test_all_reduce_flat_one_call_per_dtype_and_average(monkeypatch):
    fake = _FakeWorld(4).install(monkeypatch)
    a = torch.arange(3.0)
    b = torch.ones(2, 2, dtype=torch.float64)
    c = torch.full((2,), 5.0)
    n = distributed.all_reduce_flat([a, None, b, c], "fake-group")
    assert n == 2 and [x[0] for x in fake.calls] == [5, 4]  # float32 bucket (a, c), float64 (b)
    assert torch.equal(a, torch.arange(3.0)) and torch.equal(c, torch.full((2,), 5.0))
    assert distributed.all_reduce_flat([a], "fake-group", average=False) == 1
    assert torch.equal(a, 4 * torch.arange(3.0))
    assert distributed.all_reduce_flat([a], None) == 0 and len(fake.calls) == 3


@pytest.mark.parametrize("name", ["mlp-kbfgs-T1", "cnn-kbfgs-T2-warm", "mlp-kbfgs20-T1",
                                  "cnn-kfac-warm", "cnn-plus-nc-T2"])
def test_fake_world_follows_the_distributed_code_path_exactly(monkeypatch, name):
    """Every rank holding the same shard: the distributed path (deferred A s_A after the a_bar
    all-reduce, flat reductions, warm-start sums) gives the single-process result."""
    monkeypatch.setattr(kfac_mod, "sample_targets", _deterministic_targets)
    ref, _ = _reference(name)
    fake = _FakeWorld().install(monkeypatch)
    got, opt = _reference(name)
    assert fake.curvature(), "the distributed path was not taken"
    assert _rel(got, ref) <= 1e-12
    if SCENARIOS[name]["opt"] == "kbfgs":
        updates = opt.curvature_updates
        warm = 1 if SCENARIOS[name].get("warm") else 0
        # two collectives per curvature update (+ the warm-start sums), one flag per step
        assert len(fake.curvature()) == 2 * updates + warm
        assert len(fake.calls) - len(fake.curvature()) == STEPS


def test_single_process_pays_nothing(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a collective in a single-process run")

    monkeypatch.setattr(distributed, "_all_reduce", forbidden)
    monkeypatch.setattr(torch.distributed, "broadcast", forbidden)
    monkeypatch.setattr(torch.distributed, "broadcast_object_list", forbidden)
    for name in ("mlp-kbfgs-T1", "cnn-kbfgs-T2-warm", "cnn-kfac-warm"):
        _reference(name)
    model = _model("mlp")
    assert distributed.process_group(model) is None
    assert launch.shard(torch.arange(5)).numel() == 5
    assert distributed.world_size() == 1 and launch.is_main_process()
    assert launch.prepare_model(model, "cpu", seed=1) is model
    assert launch.agree(False) is False and launch.broadcast_object([1]) == [1]


def _bytes_per_update(monkeypatch, opt_name: str, model_fn) -> tuple[int, int]:
    """(bytes, collectives) of the curvature all-reduces of one curvature update."""
    torch.manual_seed(0)
    model = model_fn()
    if opt_name == "kbfgs":
        opt = kbfgs.KBFGS(model, lr=0.01, damping=0.3, update_freq=1)
    else:
        opt = kbfgs.KFAC(model, lr=0.01, damping=0.3, stat_freq=1, inv_freq=1000)
    # the preconditioning (dense products with H_A, H_Omega) does not touch what is
    # communicated; skip it to keep the test fast on a CPU
    opt._precondition = lambda layer, st: st.buf
    fake = _FakeWorld().install(monkeypatch)
    x = torch.randn(2, 3, 32, 32)
    y = torch.tensor([1, 7])

    def closure():
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    calls = fake.curvature()
    assert opt.curvature_updates == 1
    return sum(c[1] for c in calls), len(calls)


def _expected_elements(model: nn.Module) -> tuple[int, int]:
    """K-BFGS: a_bar, A s_A (cols each), h, Dh, h+, Dh+ (rows each), the two scales of Dh
    (one number each); KFAC: cols^2 + rows^2."""
    kb = kf = 0
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            rows, cols = m.weight.shape[0], m.weight[0].numel() + (m.bias is not None)
            kb += 2 * cols + 4 * rows + 2
            kf += cols * cols + rows * rows
    return kb, kf


@pytest.mark.parametrize("name,model_fn", [("VGG16", paper_models.vgg16_bn),
                                           ("ResNet32", paper_models.resnet32)])
def test_bytes_per_curvature_update(monkeypatch, name, model_fn):
    """The table of docs/distributed.md: bytes passed to the collective per curvature update
    (float32 curvature, world size 2; the bytes do not depend on the world size)."""
    kb_bytes, kb_calls = _bytes_per_update(monkeypatch, "kbfgs", model_fn)
    monkeypatch.undo()
    kf_bytes, kf_calls = _bytes_per_update(monkeypatch, "kfac", model_fn)
    torch.manual_seed(0)
    kb_el, kf_el = _expected_elements(model_fn())
    assert (kb_bytes, kf_bytes) == (4 * kb_el, 4 * kf_el)
    assert kb_calls == 2 and kf_calls == 1
    ratio = kb_bytes / kf_bytes
    print(f"\n{name}: K-BFGS {kb_bytes} B in {kb_calls} all-reduces, KFAC {kf_bytes} B in "
          f"{kf_calls}, ratio {100 * ratio:.3f}%")
    assert ratio < 0.01
    table = {"VGG16": (339_544, 510_210_564), "ResNet32": (96_512, 16_410_360)}
    assert (kb_bytes, kf_bytes) == table[name], "update the table in docs/distributed.md"


# ---------------------------------------------------------------------------------------------
# Two processes
# ---------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, tmp: str) -> None:
    """One rank: every scenario on this rank's half of each minibatch, then the fault."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      **{launch.ENV_TIMEOUT: "30"})
    torch.set_num_threads(1)
    tmp_path = Path(tmp)
    # the worker's stderr for the rest of its life: no context manager can hold it
    sys.stderr = open(tmp_path / f"stderr{rank}.txt", "w", buffering=1)  # noqa: SIM115
    try:
        with launch.launch("cpu") as ws:
            assert ws == world and distributed.rank() == rank
            results = _rank_scenarios(rank, world, tmp_path)
            # A stuck (alive) peer: rank 0's collective fails at the group's timeout.
            results["stuck"] = _stuck_peer(rank)
            torch.save(results, tmp_path / f"rank{rank}.pt")
            # Fault: rank 1 raises; rank 0 waits for it in a collective and must not hang.
            if rank == 1:
                raise RuntimeError("injected failure on rank 1")
            t = torch.ones(1)
            t0 = time.perf_counter()
            try:
                distributed.all_reduce_flat([t], _world_group())
            finally:
                (tmp_path / "wait0.txt").write_text(f"{time.perf_counter() - t0:.2f}")
    except BaseException:  # any failure of a worker is reported
        (tmp_path / f"err{rank}.txt").write_text(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)
    os._exit(0)


def _stuck_peer(rank: int) -> tuple[float, str] | None:
    import datetime

    import torch.distributed as dist

    group = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=2))
    out = None
    if rank == 0:
        t0 = time.perf_counter()
        try:
            distributed.all_reduce_flat([torch.ones(1)], group)
            out = (time.perf_counter() - t0, "no error")
        except RuntimeError as e:
            out = (time.perf_counter() - t0, str(e))
    else:
        time.sleep(5.0)
    launch.barrier()
    return out


def _world_group():
    import torch.distributed as dist

    return dist.group.WORLD


def _rank_scenarios(rank: int, world: int, tmp: Path) -> dict:
    from torch.nn.parallel import DistributedDataParallel as DDP

    kfac_mod.sample_targets = _deterministic_targets  # this process only
    k = GLOBAL_BATCH // world

    def part(t):
        return t[rank * k:(rank + 1) * k]

    out: dict = {}
    for name, sc in SCENARIOS.items():
        model = DDP(_model(sc["model"]))
        grads = [0]

        def count(state, bucket, grads=grads):
            grads[0] += bucket.buffer().numel()
            fut = torch.futures.Future()
            import torch.distributed as dist

            buf = bucket.buffer()
            dist.all_reduce(buf)
            fut.set_result(buf.div_(world))
            return fut

        model.register_comm_hook(None, count)
        opt = _optimizer(sc, model)
        if sc.get("warm"):
            opt.warm_start([_data(sc["model"])[2][rank::world]])

        def on_step(step, model=model, opt=opt, sc=sc):
            if sc.get("ckpt") and step == CKPT_STEP:
                checkpoint.save_checkpoint(tmp / "ckpt.pt", model, opt, {"step": step})

        counter = {"n": 0}
        real = distributed._all_reduce

        def counting(t, group, real=real, counter=counter):
            counter["n"] += 1
            real(t, group)

        distributed._all_reduce = counting
        try:
            _train(sc, model, opt, range(STEPS), part, on_step)
        finally:
            distributed._all_reduce = real
        out[name] = {"params": _flat_params(model), "grad_elements": grads[0],
                     "n_params": sum(p.numel() for p in model.parameters()),
                     "collectives": counter["n"], "updates": opt.curvature_updates,
                     "skipped": opt.skipped_steps}
    return out


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Runs the two workers once for every test of this module that needs them."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    for attempt in range(2):  # a second try only if the free port was taken meanwhile
        tmp = tmp_path_factory.mktemp("ddp")
        t0 = time.perf_counter()
        port = _free_port()
        procs = [ctx.Process(target=_worker, args=(r, WORLD, port, str(tmp)))
                 for r in range(WORLD)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(timeout=150)
        hung = [p for p in procs if p.is_alive()]
        for p in hung:
            p.kill()
            p.join()
        elapsed = time.perf_counter() - t0
        files = {f.name: f for f in tmp.iterdir()}

        def text(name, files=files):
            return files[name].read_text() if name in files else ""

        if attempt == 0 and not hung and "address already in use" in (
                text("err0.txt") + text("err1.txt")).lower():
            continue
        break
    assert not hung, f"ranks hung: {[procs.index(p) for p in hung]}; " + text("stderr0.txt")
    for r in range(WORLD):
        assert f"rank{r}.pt" in files, f"rank {r} failed early:\n{text(f'err{r}.txt')}"
    return {"tmp": tmp, "procs": procs, "elapsed": elapsed, "text": text,
            "results": [torch.load(tmp / f"rank{r}.pt") for r in range(WORLD)]}


@pytest.mark.parametrize("name", [n for n in SCENARIOS if n not in _BN_SCENARIOS])
def test_two_ranks_equal_one_process(two_ranks, monkeypatch, name):
    monkeypatch.setattr(kfac_mod, "sample_targets", _deterministic_targets)
    ref, ref_opt = _reference(name)
    init = _flat_params(_model(SCENARIOS[name]["model"]))
    r0, r1 = (res[name] for res in two_ranks["results"])
    assert torch.equal(r0["params"], r1["params"]), "ranks disagree"
    assert _rel(r0["params"], ref) <= 1e-10, _rel(r0["params"], ref)
    assert _rel(ref, init) > 1e-3  # the steps moved the parameters
    assert r0["skipped"] == 0 and r0["updates"] == ref_opt.curvature_updates > 0


def test_batchnorm_under_ddp_is_per_shard_batchnorm(two_ranks):
    """Plain BatchNorm under DDP normalises each rank's shard with its own statistics: the
    result equals one process applying BatchNorm to each half of the batch separately, and
    differs from one process with full-batch BatchNorm."""
    name = "cnnbn-kbfgs-T1"
    got = two_ranks["results"][0][name]["params"]
    ghost, _ = _reference(name, ghost=WORLD)
    full, _ = _reference(name)
    assert _rel(got, ghost) <= 1e-10, _rel(got, ghost)
    assert _rel(got, full) > 1e-6


def test_fisher_G_under_ddp_is_the_one_process_result(two_ranks):
    """kbfgs-plus with fisher_G: the Gamma of the BatchNorm-fed conv is averaged over the
    ranks, so two ranks equal one process with per-shard BatchNorm, and the conv's step used
    the Fisher factor."""
    name = "cnnbn-plus-fisher-T1"
    r0, r1 = (res[name] for res in two_ranks["results"])
    assert torch.equal(r0["params"], r1["params"]), "ranks disagree"
    ref, ref_opt = _reference(name, ghost=WORLD)
    assert _rel(r0["params"], ref) <= 1e-10, _rel(r0["params"], ref)
    layers = ref_opt.stats()["layers"]
    assert layers["0"]["fisher_G"] and not layers["3"]["fisher_G"]
    assert r0["skipped"] == 0 and r0["updates"] == ref_opt.curvature_updates > 0


def test_extra_pass_does_not_all_reduce_gradients(two_ranks):
    """DDP's gradient all-reduce (counted by a comm hook) runs once per step: in the closure's
    pass, never in the optimizer's extra pass (update_freq 1: an extra pass every step)."""
    for name in ("mlp-kbfgs-T1", "cnn-kbfgsL-T1", "mlp-kfac"):
        res = two_ranks["results"][0][name]
        assert res["grad_elements"] == STEPS * res["n_params"], name


def test_collectives_per_step(two_ranks):
    """K-BFGS: 2 curvature all-reduces per curvature update + 1 one-element skip flag per step;
    KFAC: 1 per statistics update + the flag."""
    res = two_ranks["results"][0]
    assert res["mlp-kbfgs-T1"]["collectives"] == STEPS + 2 * STEPS
    assert res["mlp-kbfgsL-T2"]["collectives"] == STEPS + 2 * (STEPS // 2)
    assert res["mlp-kfac"]["collectives"] == STEPS + STEPS


def test_checkpoint_from_two_ranks_resumes_in_one_process(two_ranks):
    sc = SCENARIOS["mlp-kbfgs-T1"]
    ref, _ = _reference("mlp-kbfgs-T1")
    model = _model(sc["model"])
    opt = _optimizer(sc, model)
    extra = checkpoint.load_checkpoint(two_ranks["tmp"] / "ckpt.pt", model, opt)
    assert extra == {"step": CKPT_STEP} and opt.steps == CKPT_STEP
    _train(sc, model, opt, range(CKPT_STEP, STEPS))
    assert _rel(_flat_params(model), ref) <= 1e-10


def test_a_stuck_rank_times_out(two_ranks):
    waited, error = two_ranks["results"][0]["stuck"]
    assert error != "no error" and 1.5 < waited < 4.5, (waited, error)


def test_launch_initialises_from_the_torchrun_environment(monkeypatch, capsys):
    import datetime

    import torch.distributed as dist

    seen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv(launch.ENV_TIMEOUT, "7")
    monkeypatch.setattr(dist, "init_process_group", lambda **kw: seen.update(kw))
    with pytest.raises(KeyError), launch.launch("cpu"):
        raise KeyError("boom")
    assert seen == {"backend": "gloo", "timeout": datetime.timedelta(seconds=7)}
    assert "kbfgs: rank 1/2: KeyError: 'boom'" in capsys.readouterr().err
    for bad in ("-1", "abc", "nan", "inf"):
        monkeypatch.setenv(launch.ENV_TIMEOUT, bad)
        with pytest.raises(ValueError, match=launch.ENV_TIMEOUT):
            launch.timeout_seconds()


def test_a_failing_rank_stops_every_rank(two_ranks):
    procs, text = two_ranks["procs"], two_ranks["text"]
    assert [p.exitcode for p in procs] == [1, 1]
    assert "injected failure on rank 1" in text("err1.txt")
    assert "kbfgs: rank 1/2: RuntimeError: injected failure on rank 1" in text("stderr1.txt")
    assert text("err0.txt"), "rank 0 did not fail"
    assert "kbfgs: rank 0/2:" in text("stderr0.txt")
    wait = float(text("wait0.txt"))
    assert wait < 30 + 5, f"rank 0 waited {wait} s"
    print(f"\ntwo-rank workers: {two_ranks['elapsed']:.1f} s; rank 0 failed after {wait:.2f} s:"
          f"\n{text('err0.txt').strip().splitlines()[-1]}")


# ---------------------------------------------------------------------------------------------
# Runner under torchrun
# ---------------------------------------------------------------------------------------------


def test_shard_needs_a_divisible_batch(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 2)
    monkeypatch.setattr(distributed, "rank", lambda: 1)
    assert launch.shard(torch.arange(6)).tolist() == [3, 4, 5]
    assert launch.shard_dataset(torch.arange(5)).tolist() == [1, 3]
    with pytest.raises(ValueError, match="multiple of the world size"):
        launch.shard(torch.arange(5))


def test_torchrun_run_equals_one_process(tmp_path):
    """``torchrun --nproc_per_node 2 -m kbfgs run`` (gloo, CPU): rank 0 alone writes the result,
    which matches the 1-process run of the same command (float32, so to rounding)."""
    args = ["run", "--problem", "curves-ae", "--optimizer", "kbfgs", "--epochs", "3",
            "--subset", "64", "--batch-size", "32", "--device", "cpu", "--threads", "1",
            "--no-progress", "--eval-subset", "64"]
    env = dict(os.environ, OMP_NUM_THREADS="1", **{launch.ENV_TIMEOUT: "60"})
    env.pop("WORLD_SIZE", None)
    one = subprocess.run([sys.executable, "-m", "kbfgs", *args, "--out", str(tmp_path / "one")],
                         check=False, env=env, capture_output=True, text=True, timeout=240)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node", "2", "-m", "kbfgs", *args,
                          "--out", str(tmp_path / "two")],
                         check=False, env=env, capture_output=True, text=True, timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    (f1,) = (tmp_path / "one").glob("*.json")
    (f2,) = (tmp_path / "two").glob("*.json")
    assert f1.name == f2.name  # the same run id: world size is not part of the run's key
    r1, r2 = json.loads(f1.read_text()), json.loads(f2.read_text())
    assert r2["env"]["world_size"] == 2 and r1["env"]["world_size"] == 1
    assert r1["final"]["iterations"] == r2["final"]["iterations"] == 6
    l1, l2 = r1["final"]["train_loss"], r2["final"]["train_loss"]
    print(f"\ntorchrun 2 ranks: train loss {l2!r}; 1 process: {l1!r}")
    assert math.isfinite(l1) and abs(l1 - l2) <= 1e-4 * abs(l1), (l1, l2)
    assert two.stdout.count("curves-ae kbfgs seed 1: train loss") == 1  # rank 0 alone reports

    # Checkpoints: a 2-rank run whose rank 1 crashes before iteration 6 (after the epoch-2
    # checkpoint) fails on every rank; rerun in one process, it resumes and ends as above.
    cut = tmp_path / "cut"
    crash = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                            "--nproc_per_node", "2", "-m", "kbfgs", *args, "--out", str(cut),
                            "--checkpoint-every", "1"],
                           check=False, env=dict(env, KBFGS_FAIL_AT_ITER="5:1"),
                           capture_output=True, text=True, timeout=240)
    assert crash.returncode != 0
    assert "injected failure before iteration 6" in crash.stderr, crash.stderr[-3000:]
    assert [p.suffix for p in cut.iterdir()] == [".ckpt"]  # no result, one checkpoint
    again = subprocess.run([sys.executable, "-m", "kbfgs", *args, "--out", str(cut),
                            "--checkpoint-every", "1"],
                           check=False, env=env, capture_output=True, text=True, timeout=240)
    assert again.returncode == 0, again.stderr
    assert "resuming from" in again.stdout
    (f3,) = cut.glob("*.json")
    assert f3.name == f1.name and not list(cut.glob("*.ckpt"))
    r3 = json.loads(f3.read_text())
    assert r3["resumed"] == [{"iter": 4, "from_world_size": 2, "world_size": 1}]
    assert r3["final"]["iterations"] == 6
    l3 = r3["final"]["train_loss"]
    print(f"2 ranks crashed at 5, resumed in 1 process from 4: train loss {l3!r}")
    assert abs(l3 - l1) <= 1e-4 * abs(l1), (l1, l3)
