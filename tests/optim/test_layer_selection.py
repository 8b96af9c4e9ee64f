"""Which layers are Kronecker layers (issue 11, items 1, 2, 3, 11, 15): layers never called,
weight tying, unfreezing, ``add_param_group``, ``skip_layers``, the size guard and
``memory_usage()``. Public API only; expectations written out by hand."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from cases import CURVATURE_METHODS, curvature_optimizer, regression_data

NAMES = list(CURVATURE_METHODS)


def _closure(opt, model, x, y, grads=None):
    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(-1).mean()
        loss.backward()
        now = {n: p.grad.detach().clone() for n, p in model.named_parameters()
               if p.grad is not None}
        if grads is not None and now:  # the first pass of a step (the extra pass has none)
            grads.clear()
            grads.update(now)
        return loss

    return closure


def _caught(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    return out, [str(w.message) for w in caught]


# ----------------------------------------------------------------------------------------------
# size guard
# ----------------------------------------------------------------------------------------------

# (name, dtype) -> bytes of curvature state of a layer with W of shape rows x cols
def _expected_bytes(name, rows, cols, itemsize):
    if name == "kbfgs":  # H_A, H_G
        return (cols * cols + rows * rows) * itemsize
    if name == "kbfgs-l":  # H_A and 2 x 5 vectors of length rows
        return (cols * cols + 2 * 5 * rows) * itemsize
    return 2 * (cols * cols + rows * rows) * itemsize  # Omega, Gamma and their inverses


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_size_guard_on_H_A_demotes_with_the_memory_it_would_need(name, dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 3), nn.Tanh(), nn.Linear(3, 2)).to(dtype)
    opt, msgs = _caught(lambda: curvature_optimizer(name, model, momentum=0.0, max_factor_dim=16))
    itemsize = 4 if dtype == torch.float32 else 8
    need = _expected_bytes(name, 3, 21, itemsize)  # cols = 20 inputs + bias
    hits = [m for m in msgs if "'0'" in m]
    assert len(hits) == 1, msgs
    assert f"{need} bytes" in hits[0] and "max_factor_dim=16" in hits[0]
    assert not [m for m in msgs if "'2'" in m]
    x, y = regression_data(20, 2, dtype)
    grads: dict = {}
    w0 = model[0].weight.detach().clone()
    opt.step(_closure(opt, model, x, y, grads))
    assert set(opt.stats(condition=False)["layers"]) == {"2"}
    # momentum 0, damping 1: the other-parameter step is -lr * grad for both optimizers
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.05 * grads["0.weight"])


@pytest.mark.parametrize("name,demoted", [("kbfgs", True), ("kbfgs-l", False), ("kfac", True)])
def test_size_guard_on_H_G_counts_only_dense_factors(name, demoted):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 20), nn.Tanh(), nn.Linear(20, 2, bias=False))
    opt, msgs = _caught(lambda: curvature_optimizer(name, model, max_factor_dim=16))
    hits = [m for m in msgs if "'0'" in m]
    if demoted:
        assert len(hits) == 1 and f"{_expected_bytes(name, 20, 4, 4)} bytes" in hits[0]
    else:  # K-BFGS(L) keeps no dense H_G: 20 rows are fine
        assert not hits
    # layer '2' has 20 input columns (no bias): above the guard for every optimizer
    assert len([m for m in msgs if "'2'" in m]) == 1
    x, y = regression_data(3, 2)
    opt.step(_closure(opt, model, x, y))
    assert ("0" in opt.stats(condition=False)["layers"]) is not demoted


def test_default_size_guard_demotes_a_dense_layer_of_9216_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9216, 4), nn.Tanh(), nn.Linear(4, 2))
    _, msgs = _caught(lambda: kbfgs.KBFGS(model, lr=0.1, damping=1.0))
    need = (9217 * 9217 + 16) * 4
    hits = [m for m in msgs if "'0'" in m]
    assert len(hits) == 1 and f"{need} bytes" in hits[0] and "324.1 MiB" in hits[0]
    assert kbfgs.optim.base.DEFAULT_MAX_FACTOR_DIM == 8192
    _, msgs = _caught(lambda: kbfgs.KBFGS(model, lr=0.1, damping=1.0, max_factor_dim=None))
    assert not msgs


@pytest.mark.parametrize("value", [0, -3, 2.5, "big", float("inf")])
def test_bad_max_factor_dim_is_a_value_error_naming_it(value):
    with pytest.raises(ValueError, match="max_factor_dim"):
        kbfgs.KBFGS(nn.Linear(3, 2), lr=0.1, damping=1.0, max_factor_dim=value)


# ----------------------------------------------------------------------------------------------
# memory_usage() / stats()["memory_bytes"]
# ----------------------------------------------------------------------------------------------


def _saved_bytes(st: dict) -> tuple[int, int]:
    """(BUF bytes, other bytes) of a layer's saved state, from numel * element size."""
    buf = st["buf"].numel() * st["buf"].element_size()
    rest = sum(v.numel() * v.element_size() for k, v in st.items()
               if isinstance(v, torch.Tensor) and k != "buf")
    return buf, rest


@pytest.mark.parametrize("name", NAMES)
def test_memory_usage_counts_the_state_by_part(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.LayerNorm(4),
                          nn.Linear(4, 3)).double()
    opt = curvature_optimizer(name, model)
    assert opt.memory_usage()["total"] == 0  # nothing allocated before the first step
    x, y = regression_data(6, 3, torch.float64)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y))
    mem = opt.memory_usage()
    saved = opt.state_dict()["kronecker"]["layers"]
    # widths below 64 elements carry no row padding: storages equal numel * 8
    for layer, st in saved.items():
        buf, rest = _saved_bytes(st)
        if name == "kbfgs-l":  # plus the cached compact factors of H_G when present
            assert mem["layers"][layer] >= buf + rest
        else:
            assert mem["layers"][layer] == buf + rest
    dims = {"0": (5, 7), "2": (4, 6), "4": (3, 5)}
    assert set(mem["layers"]) == set(dims)
    momentum = sum(8 * r * c for r, c in dims.values()) + 2 * 4 * 8  # BUF + LayerNorm buffers
    assert mem["momentum"] == momentum
    # the dense factors alone: H_A (+ H_G), or Omega, Gamma, H_Omega, H_Gamma
    floor = sum(_expected_bytes(name, r, c, 8) for r, c in dims.values())
    if name == "kbfgs-l":
        floor = sum(8 * c * c for _, c in dims.values())  # pairs are stored as they come
    assert mem["curvature"] >= floor
    assert mem["curvature"] == sum(mem["layers"].values()) - sum(8 * r * c for r, c in
                                                                 dims.values())
    assert mem["scratch"] >= 0
    assert mem["total"] == mem["curvature"] + mem["momentum"] + mem["scratch"]
    assert opt.stats(condition=False)["memory_bytes"] == mem["total"]


def test_memory_usage_of_a_wide_layer_is_dominated_by_H_A():
    torch.manual_seed(0)
    model = nn.Linear(300, 2)
    opt = kbfgs.KBFGS(model, lr=0.1, damping=1.0)
    x, y = regression_data(300, 2)
    opt.step(_closure(opt, model, x, y))
    mem = opt.memory_usage()
    # H_A is 301 x 301 float32, rows padded to 304 (64-byte multiples)
    assert mem["curvature"] >= 301 * 304 * 4
    assert mem["curvature"] < 301 * 304 * 4 + 4096


# ----------------------------------------------------------------------------------------------
# skip_layers
# ----------------------------------------------------------------------------------------------


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(),
                                      nn.Conv2d(3, 3, 3, padding=1))
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.features(x)).flatten(1))


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("skip,left", [(["features"], {"head"}),
                                       ([nn.Conv2d], {"head"}),
                                       (["features.2", nn.Linear], {"features.0"}),
                                       ("head", {"features.0", "features.2"})])
def test_skip_layers_by_prefix_name_or_type(name, skip, left):
    torch.manual_seed(0)
    model = Net()
    opt, msgs = _caught(lambda: curvature_optimizer(name, model, skip_layers=skip))
    assert not msgs  # skipping is the user's choice: no warning
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 2, 4, 4, generator=g), torch.randn(4, 2, generator=g)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt.step(_closure(opt, model, x, y))
    assert set(opt.stats(condition=False)["layers"]) == left
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p.detach()), n


@pytest.mark.parametrize("skip,match", [(["nope"], "skip_layers.*'nope'"),
                                        ([3], "skip_layers"), ([torch.Tensor], "skip_layers"),
                                        (5, "skip_layers")])
def test_bad_skip_layers_is_a_value_error(skip, match):
    with pytest.raises(ValueError, match=match):
        kbfgs.KBFGS(Net(), lr=0.1, damping=1.0, skip_layers=skip)
    with pytest.raises(ValueError, match=match):
        kbfgs.KFAC(Net(), lr=0.1, damping=1.0, skip_layers=skip)


# ----------------------------------------------------------------------------------------------
# layers never called, weight tying, unfreezing, add_param_group, parameters passed
# ----------------------------------------------------------------------------------------------


class AttentionOnly(nn.Module):
    """The only Linear is MultiheadAttention's out_proj, which is never called as a module."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(7, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, idx):
        h = self.emb(idx)
        return self.attn(h, h, h, need_weights=False)[0]


@pytest.mark.parametrize("name", NAMES)
def test_attention_as_the_only_kronecker_layer_does_not_crash_the_extra_pass(name):
    torch.manual_seed(0)
    model = AttentionOnly()
    idx = torch.randint(0, 7, (4, 5))
    y = torch.randn(4, 5, 8)
    opt = curvature_optimizer(name, model)
    w0 = model.attn.out_proj.weight.detach().clone()
    _, msgs = _caught(lambda: [opt.step(_closure(opt, model, idx, y)) for _ in range(3)])
    assert len([m for m in msgs if "attn.out_proj" in m]) == 1
    assert "has a gradient but its forward was not called" in msgs[0]
    assert not torch.equal(w0, model.attn.out_proj.weight.detach())
    assert opt.stats(condition=False)["layers"] == {}


class Switch(nn.Module):
    """Calls ``fc`` as a module until ``functional`` is set, then uses its weight directly."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.fc = nn.Linear(6, 3)
        self.functional = False

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        if self.functional:
            return F.linear(h, self.fc.weight, self.fc.bias)
        return self.fc(h)


@pytest.mark.parametrize("name", NAMES)
def test_layer_whose_forward_stops_running_is_demoted_at_its_next_recorded_step(name):
    torch.manual_seed(0)
    model = Switch()
    opt = curvature_optimizer(name, model)
    x, y = regression_data(4, 3)
    closure = _closure(opt, model, x, y)
    for _ in range(2):
        opt.step(closure)
    assert "fc" in opt.stats(condition=False)["layers"]
    model.functional = True
    _, msgs = _caught(lambda: [opt.step(closure) for _ in range(3)])
    assert len([m for m in msgs if "'fc'" in m]) == 1, msgs
    assert set(opt.stats(condition=False)["layers"]) == {"inp"}
    w = model.fc.weight.detach().clone()
    opt.step(closure)
    assert not torch.equal(w, model.fc.weight.detach())  # trained as an other parameter
    assert torch.isfinite(model.fc.weight).all()


@pytest.mark.parametrize("name", ["kbfgs", "kfac"])
def test_any_parameter_shared_with_another_module_demotes_the_layer(name):
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)
            self.norm.bias = self.fc.bias  # a bias shared with a non-Kronecker module
            self.out = nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.norm(self.fc(x)))

    model = Shared()
    opt, msgs = _caught(lambda: curvature_optimizer(name, model))
    hits = [m for m in msgs if "'fc'" in m]
    assert len(hits) == 1 and "'norm'" in hits[0] and "weight tying" in hits[0]
    x, y = regression_data(4, 2)
    opt.step(_closure(opt, model, x, y))
    assert set(opt.stats(condition=False)["layers"]) == {"out"}


def test_unfrozen_layer_carries_its_momentum_into_its_kronecker_state():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = kbfgs.KBFGS(model, lr=0.05, damping=2.0, momentum=0.9)
    x, y = regression_data(6, 3, torch.float64)
    grads: dict = {}
    closure = _closure(opt, model, x, y, grads)
    opt.step(closure)
    for p in model[0].parameters():
        p.requires_grad_(True)
    w0 = model[0].weight.detach().clone()
    opt.step(closure)  # discovered: momentum SGD with lr / damping this step
    g3 = {k: v.clone() for k, v in grads.items()}
    torch.testing.assert_close(model[0].weight.detach(), w0 - 0.05 / 2.0 * g3["0.weight"],
                               rtol=1e-12, atol=1e-12)
    opt.step(closure)  # a Kronecker layer from here on; BUF = 0.9 g3 + g4
    g4 = grads
    buf = opt.state_dict()["kronecker"]["layers"]["0"]["buf"]
    expected = 0.9 * torch.cat([g3["0.weight"], g3["0.bias"][:, None]], 1) + torch.cat(
        [g4["0.weight"], g4["0.bias"][:, None]], 1)
    torch.testing.assert_close(buf, expected, rtol=1e-12, atol=1e-12)
    ids = {id(p): i for i, p in enumerate(opt.param_groups[0]["params"])}
    saved = opt.state_dict()["state"]
    assert ids[id(model[0].weight)] not in saved  # no stale other-parameter buffer
    assert "0" in opt.stats(condition=False)["layers"]


@pytest.mark.parametrize("name", NAMES)
def test_bias_of_a_layer_whose_weight_is_frozen_later_is_still_trained(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = curvature_optimizer(name, model, momentum=0.0)
    x, y = regression_data(6, 3)
    grads: dict = {}
    closure = _closure(opt, model, x, y, grads)
    opt.step(closure)
    model[0].weight.requires_grad_(False)
    b0 = model[0].bias.detach().clone()
    opt.step(closure)
    torch.testing.assert_close(model[0].bias.detach(), b0 - 0.05 * grads["0.bias"])


def test_resumed_fine_tuning_run_restores_the_unfrozen_layer():
    def run(steps, resume=None):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
        for p in model[0].parameters():
            p.requires_grad_(False)
        opt = kbfgs.KBFGS(model, lr=0.05, damping=1.0)
        if resume is not None:
            model.load_state_dict(resume[0])
            for p in model[0].parameters():
                p.requires_grad_(True)
            opt.load_state_dict(resume[1])
        x, y = regression_data(6, 3, torch.float64)
        closure = _closure(opt, model, x, y)
        for i in range(steps):
            if resume is None and i == 1:
                for p in model[0].parameters():
                    p.requires_grad_(True)
            opt.step(closure)
        return model, opt

    full, _ = run(6)
    half, opt = run(4)
    assert "0" in opt.stats(condition=False)["layers"]
    resumed, opt2 = run(2, (half.state_dict(), opt.state_dict()))
    assert "0" in opt2.stats(condition=False)["layers"]
    for a, b in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", ["kbfgs", "kfac"])
def test_add_param_group_is_refused_like_lbfgs(name):
    model = nn.Linear(3, 2)
    opt = curvature_optimizer(name, model)
    with pytest.raises(ValueError, match=r"per-parameter options.*requires_grad=True"):
        opt.add_param_group({"params": [nn.Parameter(torch.ones(2))], "lr": 0.5})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("cls", [kbfgs.KBFGS, kbfgs.KFAC])
@pytest.mark.parametrize("what", ["generator", "list", "tensor"])
def test_non_module_model_is_a_type_error(cls, what):
    model = nn.Linear(3, 2)
    arg = {"generator": model.parameters(), "list": list(model.parameters()),
           "tensor": model.weight}[what]
    with pytest.raises(TypeError, match="pass the model itself, not its parameters"):
        cls(arg, lr=0.1, damping=1.0)


def test_frozen_layers_cost_no_curvature_memory():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(200, 5), nn.Tanh(), nn.Linear(5, 3))
    model[0].requires_grad_(False)
    opt = kbfgs.KBFGS(model, lr=0.1, damping=1.0)
    x, y = regression_data(200, 3)
    for _ in range(2):
        opt.step(_closure(opt, model, x, y))
    mem = opt.memory_usage()
    assert set(mem["layers"]) == {"2"}
    assert mem["curvature"] < 200 * 200  # no H_A of the frozen 201-column layer
    assert math.isfinite(float(mem["total"]))
