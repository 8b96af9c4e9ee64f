"""kbfgs.make_optimizer: every method of the paper's comparisons behind one call (spec section 1),
the first-order baselines against hand-written updates (Appendix D.1 and D.3)."""

from __future__ import annotations

import copy
import math
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from kbfgs.optim.factory import OPTIMIZER_NAMES, PEER_NAMES, describe, title, valid_hps


class SmallCNN(nn.Module):
    """1x8x8 -> Conv(s2, p1) -> BatchNorm -> ReLU -> bias-free Conv -> ReLU -> Linear (3 classes).
    """

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.fc = nn.Linear(6 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        return self.fc(F.relu(self.conv2(x)).flatten(1))


def make_cnn(seed=0):
    torch.manual_seed(seed)
    return SmallCNN()


def fixed_batch():
    g = torch.Generator().manual_seed(1)
    return torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)


def make_closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


# Learning rates (and dampings) used for the 30-step training check below: one value per method
# family, no tuning per name beyond that.
TRAIN_HPS = {
    "kbfgs": {"lr": 0.1, "damping": 0.3},
    "kbfgs-l": {"lr": 0.1, "damping": 0.3},
    "kbfgs-20": {"lr": 0.1, "damping": 0.3},
    "kbfgs-l-20": {"lr": 0.1, "damping": 0.3},
    "kbfgs-no-dpdlm": {"lr": 0.1, "damping": 0.3},
    "kbfgs-no-minibatch": {"lr": 0.1, "damping": 0.3},
    "kfac": {"lr": 0.1, "damping": 0.3},
    "adam": {"lr": 0.01, "damping": 1e-8},
    "sgd-m": {"lr": 0.1},
    "kbfgs-plus": {"lr": 0.01},
    "muon": {"lr": 0.02},
    "soap": {"lr": 0.01},
    "shampoo": {"lr": 1e-3},
}


def test_names_are_the_documented_ones():
    assert set(OPTIMIZER_NAMES) == set(TRAIN_HPS)
    for name in ("kbfgs", "kbfgs-l", "kbfgs-20", "kbfgs-l-20", "kfac", "adam", "sgd-m", "muon",
                 "soap", "shampoo"):
        assert name in OPTIMIZER_NAMES
        assert isinstance(describe(name), str) and describe(name)
        assert isinstance(title(name), str) and title(name)
    assert PEER_NAMES == ("muon", "soap", "shampoo")


@pytest.mark.parametrize("name", sorted(TRAIN_HPS))
def test_every_method_trains_a_small_cnn_with_batchnorm(name):
    if name in ("soap", "shampoo"):
        pytest.importorskip("pytorch_optimizer")
    model = make_cnn()
    x, y = fixed_batch()
    opt = kbfgs.make_optimizer(name, model, **TRAIN_HPS[name])
    closure = make_closure(opt, model, x, y)
    with torch.no_grad():
        first = float(F.cross_entropy(model(x), y))
    for _ in range(30):
        loss = opt.step(closure)  # the same call for every method
        assert isinstance(loss, torch.Tensor)
    with torch.no_grad():
        last = float(F.cross_entropy(model(x), y))
    assert math.isfinite(last) and last < 0.5 * first, (name, first, last)


def test_names_configure_the_documented_variants():
    m = make_cnn()
    o = kbfgs.make_optimizer("kbfgs", m, lr=0.1, damping=0.3)
    assert isinstance(o, kbfgs.KBFGS) and o.history is None
    assert (o.damping_rule, o.hessian_action, o.damping_split) == ("dpdlm", "minibatch", "spatial")
    o = kbfgs.make_optimizer("kbfgs-l", m, lr=0.1, damping=0.3)
    assert o.history == 100
    assert kbfgs.make_optimizer("kbfgs-l", m, lr=0.1, damping=0.3, history=7).history == 7
    for name, hist in (("kbfgs-20", None), ("kbfgs-l-20", 100)):
        o = kbfgs.make_optimizer(name, m, lr=0.1, damping=0.3)
        assert o.history == hist
        assert (o.damping_rule, o.hessian_action, o.damping_split) == ("dd", "moving_average",
                                                                      "sqrt")
    o = kbfgs.make_optimizer("kbfgs-no-dpdlm", m, lr=0.1, damping=0.3)
    assert (o.damping_rule, o.hessian_action, o.damping_split) == ("dd", "minibatch", "spatial")
    o = kbfgs.make_optimizer("kbfgs-no-minibatch", m, lr=0.1, damping=0.3, update_freq=20)
    assert (o.damping_rule, o.hessian_action, o.damping_split) == ("dpdlm", "moving_average",
                                                                  "spatial")
    assert o.update_freq == 20
    o = kbfgs.make_optimizer("kfac", m, lr=0.3, damping=10, stat_freq=2, inv_freq=7,
                             likelihood="bernoulli")
    assert isinstance(o, kbfgs.KFAC)
    assert (o.stat_freq, o.inv_freq, o.likelihood) == (2, 7, "bernoulli")
    o = kbfgs.make_optimizer("adam", m, lr=1e-3, damping=1e-4)
    g = o.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.9, 0.999), 1e-4, 0.0)
    o = kbfgs.make_optimizer("sgd-m", m, lr=0.1)
    assert (o.param_groups[0]["momentum"], o.param_groups[0]["weight_decay"]) == (0.9, 0.0)


def test_unknown_name_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        kbfgs.make_optimizer("lbfgs", make_cnn(), lr=0.1)
    for name in OPTIMIZER_NAMES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="valid names"):
        describe("kbfgs20")


@pytest.mark.parametrize("name,hp,bad", [
    ("sgd-m", {"lr": 0.1, "damping": 0.1}, "damping"),
    ("kbfgs", {"lr": 0.1, "damping": 0.3, "history": 10}, "history"),
    ("kbfgs-20", {"lr": 0.1, "damping": 0.3, "damping_rule": "dpdlm"}, "damping_rule"),
    ("kfac", {"lr": 0.1, "damping": 0.3, "update_freq": 5}, "update_freq"),
    ("adam", {"lr": 0.1, "damping": 0.3, "momentum": 0.9}, "momentum"),
    ("kbfgs", {"lr": 0.1, "damping": 0.3, "stat_freq": 5}, "stat_freq"),
])
def test_hyperparameter_a_method_does_not_take_lists_the_valid_ones(name, hp, bad):
    with pytest.raises(ValueError) as info:
        kbfgs.make_optimizer(name, make_cnn(), **hp)
    msg = str(info.value)
    assert repr(bad) in msg
    for valid in valid_hps(name):
        assert valid in msg


@pytest.mark.parametrize("name,hp,missing", [
    ("kbfgs", {"lr": 0.1}, "damping"),
    ("adam", {"damping": 1e-8}, "lr"),
    ("sgd-m", {}, "lr"),
])
def test_missing_required_hyperparameter(name, hp, missing):
    with pytest.raises(ValueError, match=re.escape(repr(missing))):
        kbfgs.make_optimizer(name, make_cnn(), **hp)


@pytest.mark.parametrize("name,hp,param", [
    ("sgd-m", {"lr": -0.1}, "lr"),
    ("sgd-m", {"lr": 0.1, "momentum": 1.0}, "momentum"),
    ("sgd-m", {"lr": 0.1, "weight_decay": -1.0}, "weight_decay"),
    ("adam", {"lr": 0.1, "damping": 0.0}, "damping"),
    ("adam", {"lr": -1.0, "damping": 1e-8}, "lr"),
    ("kfac", {"lr": 0.1, "damping": 1.0, "inv_freq": 0}, "inv_freq"),
    ("kbfgs-l", {"lr": 0.1, "damping": 1.0, "history": 0}, "history"),
])
def test_invalid_values_raise_value_error_naming_the_parameter(name, hp, param):
    with pytest.raises(ValueError, match=re.escape(param)):
        kbfgs.make_optimizer(name, make_cnn(), **hp)


# ----------------------------------------------------------------------------------------------
# First-order baselines: decoupled weight decay, against hand-written updates
# ----------------------------------------------------------------------------------------------


def _grads(model, x, y):
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    return [p.grad.detach().clone() for p in model.parameters()]


def test_sgdm_is_momentum_without_dampening_and_decoupled_weight_decay():
    model = make_cnn().double()
    twin = copy.deepcopy(model)
    x, y = fixed_batch()
    x = x.double()
    lr, mom, wd = 0.05, 0.9, 0.1
    opt = kbfgs.make_optimizer("sgd-m", model, lr=lr, weight_decay=wd)
    bufs = [torch.zeros_like(p) for p in twin.parameters()]
    for _ in range(2):
        opt.step(make_closure(opt, model, x, y))
        grads = _grads(twin, x, y)
        with torch.no_grad():
            for p, b, g in zip(twin.parameters(), bufs, grads):
                b.mul_(mom).add_(g)
                p.sub_(lr * (b + wd * p))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_adam_is_kingma_ba_with_eps_damping_and_decoupled_weight_decay():
    model = make_cnn().double()
    twin = copy.deepcopy(model)
    x, y = fixed_batch()
    x = x.double()
    lr, eps, wd, b1, b2 = 0.01, 1e-3, 0.1, 0.9, 0.999
    opt = kbfgs.make_optimizer("adam", model, lr=lr, damping=eps, weight_decay=wd)
    ms = [torch.zeros_like(p) for p in twin.parameters()]
    vs = [torch.zeros_like(p) for p in twin.parameters()]
    for t in (1, 2):
        opt.step(make_closure(opt, model, x, y))
        grads = _grads(twin, x, y)
        with torch.no_grad():
            for p, m, v, g in zip(twin.parameters(), ms, vs, grads):
                m.mul_(b1).add_((1 - b1) * g)
                v.mul_(b2).add_((1 - b2) * g * g)
                step = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
                p.sub_(lr * (step + wd * p))
        for p, q in zip(model.parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,hp", [("sgd-m", {"lr": 0.1}),
                                     ("adam", {"lr": 0.01, "damping": 1e-8})])
def test_first_order_non_finite_step_is_skipped_and_resume_is_exact(name, hp):
    model = make_cnn()
    x, y = fixed_batch()
    opt = kbfgs.make_optimizer(name, model, **hp)
    closure = make_closure(opt, model, x, y)
    opt.step(closure)
    sd = copy.deepcopy(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]

    def bad():
        return closure() * float("nan")

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(bad)
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    assert opt.stats()["skipped_steps"] == 1
    # exact resume from the state saved after the first step
    model2 = make_cnn(seed=5)
    model2.load_state_dict(model.state_dict())
    opt2 = kbfgs.make_optimizer(name, model2, **hp)
    opt2.load_state_dict(sd)
    for _ in range(3):
        opt.step(closure)
        opt2.step(make_closure(opt2, model2, x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_every_problem_default_builds():
    """Every problem's default hyper-parameters (Tables 6 and 8 through
    kbfgs.experiments.paper, the Fashion-MNIST values, the peers' grid values) build."""
    from kbfgs.experiments.problems import METHOD_FACTORY, problems

    model = make_cnn()
    for problem in problems():
        for method, hp in problem.hps.items():
            if METHOD_FACTORY[method] in ("soap", "shampoo"):
                pytest.importorskip("pytorch_optimizer")
            opt = kbfgs.make_optimizer(METHOD_FACTORY[method], model, **hp)
            assert opt.param_groups[0]["lr"] == hp["lr"], (problem.name, method)
