"""The peers (docs/api.md, "Peers"): Muon with AdamW on the rest, SOAP and Shampoo from
pytorch-optimizer, behind ``make_optimizer`` with the same contract as the paper's methods."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from kbfgs.optim import peers
from kbfgs.optim.factory import valid_hps


class ConvNet(nn.Module):
    """1x8x8 -> Conv -> BatchNorm -> Conv (hidden) -> Linear (hidden) -> Linear (3 classes)."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3, padding=1, bias=False)
        self.fc1 = nn.Linear(6 * 4 * 4, 10)
        self.fc2 = nn.Linear(10, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.relu(self.conv2(x)).flatten(1)
        return self.fc2(torch.tanh(self.fc1(x)))


def make_net(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return ConvNet().to(dtype)


def batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(32, 1, 8, 8, generator=g).to(dtype),
            torch.randint(0, 3, (32,), generator=g))


def closure_for(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


# ---------------------------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------------------------


def test_muon_takes_the_hidden_matrix_weights_and_adamw_the_rest():
    m = make_net()
    opt = kbfgs.make_optimizer("muon", m, lr=0.01)
    muon, adamw = opt.param_groups
    assert muon["use_muon"] and not adamw["use_muon"]

    def ids(ps):
        return {id(p) for p in ps}

    # Muon's recommendation: the input and the output layer go to AdamW
    assert ids(muon["params"]) == ids([m.conv2.weight, m.fc1.weight])
    rest = [m.conv1.weight, m.conv1.bias, m.bn.weight, m.bn.bias, m.fc1.bias, m.fc2.weight,
            m.fc2.bias]
    assert ids(adamw["params"]) == ids(rest)
    every = kbfgs.make_optimizer("muon", m, lr=0.01, hidden_only=False)
    assert ids(every.param_groups[0]["params"]) == ids(
        [m.conv1.weight, m.conv2.weight, m.fc1.weight, m.fc2.weight])
    assert len(every.param_groups[1]["params"]) == 5


def test_frozen_and_embedding_parameters_are_not_muons():
    m = nn.Sequential(nn.Embedding(7, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 2))
    m[2].weight.requires_grad_(False)
    muon, rest = peers.muon_partition(m)
    assert muon == []  # the only trainable hidden matrix is frozen; first and last excluded
    assert {id(p) for p in rest} == {id(p) for p in m.parameters() if p.requires_grad}
    muon, rest = peers.muon_partition(m, hidden_only=False)
    assert {id(p) for p in muon} == {id(m[1].weight), id(m[3].weight)}
    assert id(m[0].weight) in {id(p) for p in rest}


def _ns64(x):
    """The quintic Newton-Schulz iteration of Muon, written out in float64."""
    a, b, c = 3.4445, -4.775, 2.0315
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(5):
        g = x @ x.T
        x = a * x + (b * g + c * g @ g) @ x
    return x.T if tall else x


def test_muon_step_against_a_float64_reference_with_conv_as_matrix():
    """Two steps in float64 against Muon written out: Nesterov momentum (lerp form), Newton-
    Schulz on (out, in kh kw), lr scaled by 0.2 sqrt(max(A, B)), decoupled weight decay; AdamW
    (0.9, 0.95) on the rest."""
    lr, mu, wd, eps = 0.02, 0.95, 0.1, 1e-8
    model = make_net(dtype=torch.float64)
    twin = copy.deepcopy(model)
    x, y = batch(torch.float64)
    opt = kbfgs.make_optimizer("muon", model, lr=lr, weight_decay=wd, ns_dtype="float64")
    muon_ids = {id(p) for p in opt.param_groups[0]["params"]}
    names = [n for n, p in model.named_parameters() if id(p) in muon_ids]
    assert names == ["conv2.weight", "fc1.weight"]
    state = {n: {} for n, _ in twin.named_parameters()}
    for t in (1, 2):
        opt.step(closure_for(opt, model, x, y))
        twin.zero_grad()
        F.cross_entropy(twin(x), y).backward()
        with torch.no_grad():
            for n, p in twin.named_parameters():
                g, st = p.grad, state[n]
                if n in names:
                    buf = st.setdefault("buf", torch.zeros_like(p))
                    buf.mul_(mu).add_((1 - mu) * g)
                    upd = _ns64(((1 - mu) * g + mu * buf).reshape(p.shape[0], -1))
                    scale = 0.2 * math.sqrt(max(upd.shape))
                    p.mul_(1 - lr * wd).sub_(lr * scale * upd.reshape(p.shape))
                else:
                    m1 = st.setdefault("m", torch.zeros_like(p))
                    v = st.setdefault("v", torch.zeros_like(p))
                    m1.mul_(0.9).add_(0.1 * g)
                    v.mul_(0.95).add_(0.05 * g * g)
                    step = (m1 / (1 - 0.9 ** t)) / ((v / (1 - 0.95 ** t)).sqrt() + eps)
                    p.mul_(1 - lr * wd).sub_(lr * step)
        for (n, p), q in zip(model.named_parameters(), twin.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=n)


def test_bfloat16_newton_schulz_is_torchs_own():
    from torch.optim._muon import _zeropower_via_newtonschulz

    g = torch.Generator().manual_seed(0)
    for shape in ((6, 9), (9, 6)):
        x = torch.randn(*shape, generator=g)
        coeffs = (3.4445, -4.775, 2.0315)
        ours = peers.newton_schulz(x, coeffs, 5, 1e-7, torch.bfloat16)
        assert ours.dtype == torch.bfloat16
        assert torch.equal(ours, _zeropower_via_newtonschulz(x, coeffs, 5, 1e-7))


def test_bfloat16_muon_equals_torch_optim_muon():
    """ns_dtype='bfloat16' on a model of matrices only: exactly torch.optim.Muon's step."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6, bias=False), nn.Tanh(), nn.Linear(6, 3, bias=False))
    twin = copy.deepcopy(model)
    x, y = torch.randn(16, 8), torch.randint(0, 3, (16,))
    opt = kbfgs.make_optimizer("muon", model, lr=0.05, weight_decay=0.01, ns_dtype="bfloat16",
                               hidden_only=False)
    ref = torch.optim.Muon(twin.parameters(), lr=0.05, weight_decay=0.01,
                           adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        opt.step(closure_for(opt, model, x, y))
        ref.step(closure_for(ref, twin, x, y))
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_float32_newton_schulz_on_cpu(monkeypatch):
    from torch.optim import _muon

    original = _muon._zeropower_via_newtonschulz
    seen = []
    real = peers.newton_schulz

    def spy(grad, coeffs, steps, eps, dtype):
        seen.append(dtype)
        return real(grad, coeffs, steps, eps, dtype)

    monkeypatch.setattr(peers, "newton_schulz", spy)
    model = make_net()
    x, y = batch()
    opt = kbfgs.make_optimizer("muon", model, lr=0.01)
    opt.step(closure_for(opt, model, x, y))
    assert seen == [torch.float32, torch.float32]  # conv2 and fc1
    assert _muon._zeropower_via_newtonschulz is original  # restored after the step
    assert opt.stats()["newton_schulz_dtype"] == "float32"
    assert peers.ns_dtype_for(torch.device("cuda"), "auto") == torch.bfloat16
    assert peers.ns_dtype_for(torch.device("cpu"), "auto") == torch.float32


def test_lr_schedule_on_param_groups_reaches_both_parts():
    model = make_net()
    x, y = batch()
    opt = kbfgs.make_optimizer("muon", model, lr=0.01)
    for g in opt.param_groups:
        g["lr"] = 0.0
    before = [p.detach().clone() for p in model.parameters()]
    opt.step(closure_for(opt, model, x, y))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)


# ---------------------------------------------------------------------------------------------
# Every peer
# ---------------------------------------------------------------------------------------------

PEER_HPS = {
    "muon": {"lr": 0.02},
    "soap": {"lr": 0.01},
    "shampoo": {"lr": 1e-3, "start_preconditioning_step": 3, "preconditioning_compute_steps": 4},
}


def _needs_library(name):
    if name in ("soap", "shampoo"):
        pytest.importorskip("pytorch_optimizer")


@pytest.mark.parametrize("name", sorted(PEER_HPS))
def test_peer_reduces_the_loss(name):
    _needs_library(name)
    model = make_net()
    x, y = batch()
    opt = kbfgs.make_optimizer(name, model, **PEER_HPS[name])
    closure = closure_for(opt, model, x, y)
    first = float(closure().detach())
    for _ in range(20):
        opt.step(closure)
    with torch.no_grad():
        last = float(F.cross_entropy(model(x), y))
    assert math.isfinite(last) and last < 0.7 * first, (name, first, last)


@pytest.mark.parametrize("name", sorted(PEER_HPS))
def test_peer_state_dict_round_trip_is_exact(name):
    """Save after 6 steps through torch.save / torch.load(weights_only=True) (tensors only, as
    the runner's checkpoints), load into a fresh optimizer, continue: the same parameters."""
    _needs_library(name)
    model = make_net()
    x, y = batch()
    opt = kbfgs.make_optimizer(name, model, **PEER_HPS[name])
    for _ in range(6):
        opt.step(closure_for(opt, model, x, y))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model2 = make_net(seed=7)
    model2.load_state_dict(saved["model"])
    opt2 = kbfgs.make_optimizer(name, model2, **PEER_HPS[name])
    opt2.load_state_dict(saved["opt"])
    assert opt2.stats()["steps"] == 6
    for _ in range(6):  # over a preconditioner refresh
        opt.step(closure_for(opt, model, x, y))
        opt2.step(closure_for(opt2, model2, x, y))
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q), name


@pytest.mark.parametrize("name", sorted(PEER_HPS))
def test_peer_skips_a_non_finite_step(name):
    _needs_library(name)
    model = make_net()
    x, y = batch()
    opt = kbfgs.make_optimizer(name, model, **PEER_HPS[name])
    closure = closure_for(opt, model, x, y)
    opt.step(closure)
    params = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(lambda: closure() * float("nan"))
    for p, q in zip(model.parameters(), params):
        assert torch.equal(p, q)
    assert opt.stats()["skipped_steps"] == 1 and opt.stats()["steps"] == 1


@pytest.mark.parametrize("name,hp,bad", [
    ("muon", {"lr": 0.01, "damping": 0.1}, "damping"),
    ("soap", {"lr": 0.01, "momentum": 0.9}, "momentum"),
    ("shampoo", {"lr": 0.01, "update_freq": 5}, "update_freq"),
])
def test_peer_rejects_an_unknown_hyperparameter(name, hp, bad):
    with pytest.raises(ValueError) as info:
        kbfgs.make_optimizer(name, make_net(), **hp)
    msg = str(info.value)
    assert repr(bad) in msg and name in msg
    for valid in valid_hps(name):
        assert valid in msg


@pytest.mark.parametrize("name,hp,param", [
    ("muon", {"lr": -1.0}, "lr"),
    ("muon", {"lr": 0.01, "ns_dtype": "float16"}, "ns_dtype"),
    ("muon", {"lr": 0.01, "momentum": 1.0}, "momentum"),
    ("muon", {"lr": 0.01, "ns_steps": 0}, "ns_steps"),
    ("soap", {"lr": 0.01, "precondition_frequency": 0}, "precondition_frequency"),
    ("shampoo", {"lr": 0.01, "weight_decay": -1.0}, "weight_decay"),
])
def test_peer_invalid_value_names_the_parameter(name, hp, param):
    _needs_library(name)
    with pytest.raises(ValueError, match=param):
        kbfgs.make_optimizer(name, make_net(), **hp)


def test_peers_are_runner_methods_with_fmnist_defaults():
    from kbfgs.experiments.problems import METHOD_FACTORY, METHOD_TITLES, PEERS, get_problem

    assert PEERS == ("muon", "soap", "shampoo")
    assert [METHOD_TITLES[m] for m in PEERS] == ["Muon", "SOAP", "Shampoo"]
    p = get_problem("fmnist-ae")
    for m in PEERS:
        assert METHOD_FACTORY[m] == m and "lr" in p.defaults(m) and m in p.hp_notes
        assert p.grid(m)["lr"]
    assert "float32" in p.hp_notes["muon"]
    # curves-ae: its own 120 s grid's values (not the fmnist-ae grid's)
    c = get_problem("curves-ae")
    assert c.defaults("muon")["lr"] == c.defaults("soap")["lr"] == 5e-3
    assert p.defaults("muon")["lr"] == p.defaults("soap")["lr"] == 0.01
    assert c.defaults("shampoo")["lr"] == 1e-4 and "curves-ae" in c.hp_notes["soap"]
    # the CNNs: the resnet32-fmnist grid's values; faces-ae has no peer defaults
    cnn = get_problem("resnet32-fmnist")
    assert cnn.defaults("muon")["lr"] == cnn.defaults("soap")["lr"] == 3e-3
    assert cnn.defaults("shampoo")["lr"] == 1e-4
    with pytest.raises(ValueError, match="no default"):
        get_problem("faces-ae").defaults("shampoo")
