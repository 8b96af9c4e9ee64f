"""Training loops and saved state outside the paper's runner (issue 11, items 8, 9, 12, 14):
what the closure sees, loops without a closure, hyper-parameters changed mid-run, and
``load_state_dict`` refusing a mismatch without changing anything.

The acceptance tests of these items are in tests/optim/test_user_models.py and
tests/optim/test_precision.py; these cover the remaining cases.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import kbfgs
from cases import curvature_optimizer, regression_data


def _mlp(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)


def _closure(opt, model, x, y, seen=None):
    def closure():
        if seen is not None:
            seen.append(opt.in_extra_pass)
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
        return loss

    return closure


def _steps(opt, model, n, dtype=torch.float32):
    x, y = regression_data(6, 3, dtype)
    for _ in range(n):
        opt.step(_closure(opt, model, x, y))


# ----------------------------------------------------------------------------------------------
# 9. in_extra_pass and loops without a closure
# ----------------------------------------------------------------------------------------------


def test_kfac_closure_never_runs_in_the_extra_pass():
    # KFAC's factor pass calls the model, not the closure: the flag is False at every call
    model = _mlp()
    opt = kbfgs.KFAC(model, lr=0.05, damping=1.0, likelihood="gaussian", stat_freq=1,
                     inv_freq=2)
    seen = []
    x, y = regression_data(6, 3)
    for _ in range(4):
        opt.step(_closure(opt, model, x, y, seen))
    assert seen == [False] * 4
    assert opt.curvature_updates == 4 and opt.in_extra_pass is False


def test_flag_is_reset_when_the_extra_pass_raises():
    model = _mlp()
    opt = kbfgs.KBFGS(model, lr=0.05, damping=1.0)
    x, y = regression_data(6, 3)

    def closure():
        if opt.in_extra_pass:
            raise KeyboardInterrupt  # e.g. a user interrupt during the extra pass
        return _closure(opt, model, x, y)()

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert opt.in_extra_pass is False
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("name", ["kbfgs", "kfac"])
def test_step_without_a_closure_names_the_unsupported_loops(name):
    # the Hugging Face Trainer and GradScaler.step call optimizer.step() without a closure
    model = _mlp()
    opt = curvature_optimizer(name, model)
    x, y = regression_data(6, 3)
    _closure(opt, model, x, y)()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="closure") as info:
        opt.step()
    assert "Hugging Face" in str(info.value) and "docs/api.md" in str(info.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# ----------------------------------------------------------------------------------------------
# 12. Hyper-parameters changed mid-run
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kbfgs", "kfac"])
def test_lr_zero_set_by_a_scheduler_is_accepted_and_moves_nothing(name):
    # a warm-up schedule starts at lr = 0: refused at construction, accepted mid-run
    model = _mlp()
    opt = curvature_optimizer(name, model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: min(1.0, k / 3))
    assert opt.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in model.parameters()]
    _steps(opt, model, 1)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert opt.curvature_updates == 1
    sched.step()
    _steps(opt, model, 1)
    assert not all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("value", [float("nan"), -0.5, "0.1", None])
def test_bad_lr_of_an_added_group_is_refused_naming_the_group(value):
    model = _mlp()
    opt = kbfgs.KBFGS(model, lr=0.05, damping=1.0)
    _steps(opt, model, 1)
    opt.param_groups[-1]["lr"] = value
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['lr'\]"):
        _steps(opt, model, 1)
    assert opt.steps == 1


# ----------------------------------------------------------------------------------------------
# 8, 14. load_state_dict
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs-l", "kfac"])
def test_loaded_float32_state_equals_the_saved_values_in_float64(name):
    model32 = _mlp()
    opt32 = curvature_optimizer(name, model32)
    _steps(opt32, model32, 3)
    model64 = _mlp(torch.float64)
    opt64 = curvature_optimizer(name, model64)
    opt64.load_state_dict(opt32.state_dict())
    saved, loaded = opt32.state_dict(), opt64.state_dict()
    for layer, st in saved["kronecker"]["layers"].items():
        for key, v in st.items():
            w = loaded["kronecker"]["layers"][layer][key]
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert w.dtype == torch.float64, (layer, key)
                assert torch.equal(w, v.double()), (layer, key)
            elif isinstance(v, torch.Tensor):
                assert torch.equal(w, v)
            else:
                assert w == v


def test_float64_state_loads_into_a_float32_model_as_float32():
    model64 = _mlp(torch.float64)
    opt64 = curvature_optimizer("kbfgs", model64)
    _steps(opt64, model64, 2, torch.float64)
    model32 = _mlp()
    opt32 = curvature_optimizer("kbfgs", model32)
    opt32.load_state_dict(opt64.state_dict())
    for st in opt32.layer_state.values():
        assert st.H_A.dtype == st.H_G.dtype == st.buf.dtype == torch.float32
    _steps(opt32, model32, 2)


def _mutations():
    def wrong_shape(sd):
        st = sd["kronecker"]["layers"]["2"]
        st["H_G"] = torch.eye(4)

    def missing_key(sd):
        del sd["kronecker"]["layers"]["0"]["s_G"]

    def unknown_layer(sd):
        sd["kronecker"]["layers"]["decoder"] = sd["kronecker"]["layers"]["0"]

    def unknown_key(sd):
        sd["kronecker"]["layers"]["0"]["H_X"] = torch.zeros(1)

    def other_kind(sd):
        sd["kronecker"]["optimizer"] = "KFAC"

    def no_steps(sd):
        del sd["kronecker"]["steps"]

    return [(wrong_shape, r"'2'.*'H_G'.*\(4, 4\).*\(3, 3\)"), (missing_key, r"'0'.*s_G"),
            (unknown_layer, "decoder"), (unknown_key, r"'0'.*H_X"), (other_kind, "KFAC"),
            (no_steps, "steps")]


@pytest.mark.parametrize("mutate,match", _mutations(), ids=lambda v: getattr(v, "__name__", ""))
def test_a_refused_load_names_the_mismatch_and_changes_nothing(mutate, match):
    model = _mlp()
    opt = curvature_optimizer("kbfgs", model)
    _steps(opt, model, 3)
    good = opt.state_dict()
    bad = copy.deepcopy(good)
    mutate(bad)
    twin_model = copy.deepcopy(model)
    twin = curvature_optimizer("kbfgs", twin_model)
    twin.load_state_dict(copy.deepcopy(good))
    # a fresh optimizer, then a run of 2 steps: the refused load must not change it
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(bad)
    _steps(opt, model, 2)
    _steps(twin, twin_model, 2)
    for a, b in zip(model.parameters(), twin_model.parameters()):
        assert torch.equal(a, b)


def test_moving_average_state_needs_the_saved_A():
    model = _mlp()
    opt = kbfgs.KBFGS(model, lr=0.05, damping=1.0)
    _steps(opt, model, 2)
    opt2 = kbfgs.KBFGS(_mlp(), lr=0.05, damping=1.0, hessian_action="moving_average")
    with pytest.raises(ValueError, match=r"'0'.*'A'"):
        opt2.load_state_dict(opt.state_dict())


def test_state_saved_before_the_new_keys_still_loads():
    # a state_dict without the "optimizer" / "history" keys (saved before issue 11) is
    # recognised from its layer state
    model = _mlp()
    opt = curvature_optimizer("kbfgs-l", model)
    _steps(opt, model, 2)
    sd = opt.state_dict()
    del sd["kronecker"]["optimizer"], sd["kronecker"]["history"]
    dense = curvature_optimizer("kbfgs", _mlp())
    with pytest.raises(ValueError, match="L-BFGS"):
        dense.load_state_dict(copy.deepcopy(sd))
    again = curvature_optimizer("kbfgs-l", _mlp())
    again.load_state_dict(sd)
    assert again.steps == 2
