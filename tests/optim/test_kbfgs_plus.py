"""kbfgs-plus (K-BFGS direction, Adam's per-layer step length): checked against torch's AdamW
and against K-BFGS itself, in float64."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import kbfgs
from kbfgs.optim.kbfgs_plus import KBFGSPlus, adam_direction, graft

DT = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT))
            for _ in range(n)]


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
        return loss
    return closure


def test_adam_direction_from_a_heavy_ball_buffer_is_adams():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g, dtype=DT) for _ in range(5)]
    b1, b2, eps = 0.9, 0.99, 1e-8
    buf = torch.zeros(4, 3, dtype=DT)
    v = torch.zeros(4, 3, dtype=DT)
    m = torch.zeros(4, 3, dtype=DT)
    for k, gr in enumerate(grads, start=1):
        buf = b1 * buf + gr
        v = b2 * v + (1 - b2) * gr * gr
        m = b1 * m + (1 - b1) * gr  # Adam's first moment, by hand
        expected = (m / (1 - b1 ** k)) / ((v / (1 - b2 ** k)).sqrt() + eps)
        torch.testing.assert_close(adam_direction(buf, v.clone(), b1, b2, k, eps), expected,
                                   rtol=1e-12, atol=1e-14)


def test_graft_keeps_the_direction_and_sets_the_norm():
    P = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=DT)
    out = graft(P.clone(), torch.tensor(10.0, dtype=DT))
    torch.testing.assert_close(out, 2.0 * P)
    zero = graft(torch.zeros(2, 2, dtype=DT), torch.tensor(1.0, dtype=DT))
    assert torch.equal(zero, torch.zeros(2, 2, dtype=DT))


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_without_kronecker_layers_it_is_adamw(wd):
    """skip_layers=[nn.Linear]: every parameter is an other parameter, so kbfgs-plus is AdamW
    (betas (momentum, beta2), decoupled decay) step for step."""
    model, ref_model = _net(), _net()
    opt = KBFGSPlus(model, lr=0.01, damping=1.0, weight_decay=wd, skip_layers=[nn.Linear],
                    beta2=0.99)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=wd)
    for x, y in _batches(6):
        opt.step(_closure(opt, model, x, y))
        ref.step(_closure(ref, ref_model, x, y))
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_first_step_is_kbfgs_direction_with_adams_length():
    """At step 1 Adam's direction is g / (|g| + eps): a layer moves by lr * sqrt(#entries with
    a non-zero gradient) along K-BFGS's own (momentum-free at step 1) direction."""
    model = _net()
    ref_model = copy.deepcopy(model)
    lr = 0.01
    opt = KBFGSPlus(model, lr=lr, damping=1.0)
    ref = kbfgs.KBFGS(ref_model, lr=1.0, damping=1.0)
    (x, y), = _batches(1)
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(opt, model, x, y))
    ref.step(_closure(ref, ref_model, x, y))
    layers = {"0": (0, 1), "3": (4, 5)}  # (weight, bias) indices of the Linear layers
    params = list(model.parameters())
    ref_params = list(ref_model.parameters())
    for idx in layers.values():
        d_plus = torch.cat([(params[i] - w0[i]).reshape(-1) for i in idx])
        d_ref = torch.cat([(ref_params[i] - w0[i]).reshape(-1) for i in idx])
        cos = torch.dot(d_plus, d_ref) / (d_plus.norm() * d_ref.norm())
        assert float(cos) == pytest.approx(1.0, abs=1e-12)
        assert float(d_plus.norm()) == pytest.approx(lr * math.sqrt(d_plus.numel()), rel=1e-6)


def test_state_dict_round_trip_is_exact():
    model = _net()
    opt = KBFGSPlus(model, lr=0.01)
    data = _batches(6)
    for x, y in data[:3]:
        opt.step(_closure(opt, model, x, y))
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    for x, y in data[3:]:
        opt.step(_closure(opt, model, x, y))
    expected = [p.detach().clone() for p in model.parameters()]
    model2 = _net()
    model2.load_state_dict(saved_model)
    opt2 = KBFGSPlus(model2, lr=0.01)
    opt2.load_state_dict(saved)
    for x, y in data[3:]:
        opt2.step(_closure(opt2, model2, x, y))
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("name,value", [("beta2", 1.0), ("beta2", float("nan")), ("eps", 0.0),
                                        ("eps", -1.0)])
def test_bad_arguments_are_value_errors_naming_them(name, value):
    with pytest.raises(ValueError, match=name):
        KBFGSPlus(_net(), **{name: value})


def test_factory_name_and_defaults():
    opt = kbfgs.make_optimizer("kbfgs-plus", _net())
    assert isinstance(opt, KBFGSPlus)
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["damping"] == 1.0
