"""Models and training loops outside the paper's (issue 11): every parameter with a gradient is
trained or refused loudly; micro-batches; bad input; state loading.

These tests use only the public API (``kbfgs.KBFGS``, ``kbfgs.KFAC``, ``step``, ``stats``,
``state_dict``) and independent hand-written expectations.
"""

from __future__ import annotations

import copy
import math
import warnings
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from cases import CURVATURE_METHODS, curvature_optimizer, mlp

OPTIMIZERS = {name: partial(curvature_optimizer, name) for name in CURVATURE_METHODS}
_kbfgs, _kfac = OPTIMIZERS["kbfgs"], OPTIMIZERS["kfac"]


def _closure(opt, model, x, y, loss_fn, grads=None):
    calls = [0]

    def closure():
        calls[0] += 1
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        if grads is not None and calls[0] == 1:
            grads.clear()
            grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters()
                          if p.grad is not None})
        return loss

    return closure


def _mse(out, y):
    return 0.5 * (out - y).pow(2).sum(-1).mean()


# ----------------------------------------------------------------------------------------------
# 1. Kronecker layers whose module is never called (nn.MultiheadAttention's out_proj)
# ----------------------------------------------------------------------------------------------


class AttentionNet(nn.Module):
    def __init__(self, last: bool = False):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = None if last else nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        h, _ = self.attn(h, h, h, need_weights=False)
        return h if self.head is None else self.head(h)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("last", [False, True])
def test_out_proj_of_attention_is_trained_as_other_parameter_with_one_warning(name, last):
    torch.manual_seed(0)
    model = AttentionNet(last=last)
    x = torch.randn(6, 5, 4)
    y = torch.randn(6, 5, 8 if last else 3)
    opt = OPTIMIZERS[name](model, momentum=0.0)
    grads: dict = {}
    w0 = model.attn.out_proj.weight.detach().clone()
    closure = _closure(opt, model, x, y, _mse, grads)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        opt.step(closure)
    msgs = [str(w.message) for w in caught if "out_proj" in str(w.message)]
    assert len(msgs) == 1, [str(w.message) for w in caught]
    # first step, momentum 0: the demoted weight moves by -lr_other * grad
    lr_other = 0.05 / 1.0 if name != "kfac" else 0.05  # K-BFGS: lr / damping; KFAC: lr
    expected = w0 - lr_other * grads["attn.out_proj.weight"]
    torch.testing.assert_close(model.attn.out_proj.weight.detach(), expected, rtol=1e-5,
                               atol=1e-7)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(3):
            opt.step(closure)
    assert not [w for w in caught if "out_proj" in str(w.message)]  # warned once only
    assert torch.isfinite(model.attn.out_proj.weight).all()
    assert "attn.out_proj" not in opt.stats(condition=False)["layers"]


def test_transformer_encoder_trains_every_parameter():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 8), nn.TransformerEncoder(layer, 2,
                                                                 enable_nested_tensor=False),
                          nn.Linear(8, 3))
    x, y = torch.randn(6, 5, 4), torch.randn(6, 5, 3)
    opt = _kbfgs(model, lr=0.02)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    closure = _closure(opt, model, x, y, _mse)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        first = float(opt.step(closure))
        for _ in range(10):
            last = float(opt.step(closure))
    for n, p in model.named_parameters():
        assert not torch.equal(before[n], p.detach()), f"{n} was never updated"
    assert last < first


# ----------------------------------------------------------------------------------------------
# 2. Weight tying beyond Linear-Linear
# ----------------------------------------------------------------------------------------------


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.mid = nn.Linear(6, 6)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, idx):
        return self.out(torch.tanh(self.mid(self.emb(idx))))


@pytest.mark.parametrize("name", ["kbfgs", "kfac"])
def test_output_layer_tied_to_an_embedding_is_demoted_with_a_warning(name):
    torch.manual_seed(0)
    model = TiedLM()
    with pytest.warns(UserWarning, match="out"):
        opt = OPTIMIZERS[name](model, momentum=0.0) if name != "kfac" else _kfac(
            model, momentum=0.0, likelihood="categorical")
    assert "out" not in [ly for ly in opt.stats(condition=False)["layers"]]
    idx = torch.randint(0, 10, (8, 5))
    tgt = torch.randint(0, 10, (8, 5))

    def loss_fn(out, t):
        return F.cross_entropy(out.reshape(-1, 10), t.reshape(-1))

    grads: dict = {}
    w0 = model.emb.weight.detach().clone()
    opt.step(_closure(opt, model, idx, tgt, loss_fn, grads))
    lr_other = 0.05
    torch.testing.assert_close(model.emb.weight.detach(), w0 - lr_other * grads["emb.weight"],
                               rtol=1e-5, atol=1e-7)
    assert model.out.weight is model.emb.weight


# ----------------------------------------------------------------------------------------------
# 3. Parameter-set changes
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_layer_unfrozen_after_construction_is_trained(name):
    model = mlp()
    for p in model[0].parameters():
        p.requires_grad_(False)
    opt = OPTIMIZERS[name](model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    closure = _closure(opt, model, x, y, _mse)
    for _ in range(2):
        opt.step(closure)
    w_frozen = model[0].weight.detach().clone()
    for p in model[0].parameters():
        p.requires_grad_(True)
    for _ in range(3):
        opt.step(closure)
    assert not torch.equal(model[0].weight.detach(), w_frozen)
    assert torch.isfinite(model[0].weight).all()
    assert "0" in opt.stats(condition=False)["layers"]  # discovered as a Kronecker layer


def test_add_param_group_is_honoured_or_refused_clearly():
    model = mlp()
    opt = _kbfgs(model)
    extra = nn.Parameter(torch.ones(3))
    try:
        opt.add_param_group({"params": [extra], "lr": 0.5})
    except (ValueError, TypeError) as e:
        assert "param" in str(e).lower() and "group" in str(e).lower()
        return
    # honoured: the extra parameter gets its group's learning rate
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)

    def closure():
        opt.zero_grad()
        loss = _mse(model(x) + extra, y)
        loss.backward()
        return loss

    opt.step(closure)
    assert not torch.equal(extra.detach(), torch.ones(3))


# ----------------------------------------------------------------------------------------------
# 4. Micro-batch gradient accumulation inside the closure
# ----------------------------------------------------------------------------------------------


class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.c2 = nn.Conv2d(3, 4, 3, stride=2, bias=False)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.c2(torch.tanh(self.c1(x)))).flatten(1))


def _micro_closure(opt, model, x, y, loss_fn, k):
    def closure():
        opt.zero_grad()
        total = 0.0
        for xm, ym in zip(x.chunk(k), y.chunk(k)):
            loss = loss_fn(model(xm), ym) / k
            loss.backward()
            total = total + loss.detach()
        return total

    return closure


def _micro_case(kind):
    torch.manual_seed(0)
    if kind == "mlp":
        model = mlp(dtype=torch.float64)
        g = torch.Generator().manual_seed(2)
        data = [(torch.randn(8, 6, generator=g, dtype=torch.float64),
                 torch.randn(8, 3, generator=g, dtype=torch.float64)) for _ in range(7)]
        return model, data, _mse, "gaussian"
    model = PlainCNN().double()
    g = torch.Generator().manual_seed(2)
    data = [(torch.randn(8, 2, 7, 7, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (8,), generator=g)) for _ in range(7)]
    return model, data, F.cross_entropy, "categorical"


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("freq", [1, 3])
@pytest.mark.parametrize("name", ["kbfgs", "kbfgs-l", "kfac"])
def test_micro_batches_equal_one_batch(kind, freq, name):
    results = []
    for k in (1, 2, 4):
        model, data, loss_fn, likelihood = _micro_case(kind)
        if name == "kfac":
            opt = kbfgs.KFAC(model, lr=0.05, damping=0.3, stat_freq=freq, inv_freq=freq,
                             likelihood=likelihood)
        else:
            opt = kbfgs.KBFGS(model, lr=0.05, damping=0.3, update_freq=freq,
                              history=5 if name == "kbfgs-l" else None)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no demotion warning about reuse
            for x, y in data:
                opt.step(_micro_closure(opt, model, x, y, loss_fn, k))
        assert opt.stats(condition=False)["curvature_updates"] > 0
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_reuse_inside_one_forward_is_still_demoted():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(self.a(torch.tanh(self.a(x))))

    torch.manual_seed(0)
    model = Twice()
    opt = _kbfgs(model)
    x, y = torch.randn(8, 4), torch.randn(8, 2)
    with pytest.warns(UserWarning, match="'a'"):
        opt.step(_closure(opt, model, x, y, _mse))
    assert "a" not in opt.stats(condition=False)["layers"]
    assert "b" in opt.stats(condition=False)["layers"]


# ----------------------------------------------------------------------------------------------
# 12. Hyper-parameters: rejected at construction and mid-run before anything changes
# ----------------------------------------------------------------------------------------------

BAD_VALUES = [
    ("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0), ("lr", -1.0),
    ("damping", float("nan")), ("damping", float("inf")), ("damping", 0.0), ("damping", -1.0),
    ("weight_decay", float("nan")), ("weight_decay", float("inf")),
    ("momentum", 1.0), ("momentum", -0.1), ("momentum", float("nan")),
    ("update_freq", 1.5), ("update_freq", float("inf")), ("update_freq", float("nan")),
    ("update_freq", "3"), ("update_freq", True),
    ("history", 0), ("history", 2.5), ("history", float("inf")), ("history", float("nan")),
    ("history", "5"),
    ("mu1", float("nan")), ("mu1", "0.2"),
]


@pytest.mark.parametrize("name,value", BAD_VALUES)
def test_bad_hyperparameter_is_a_value_error_naming_it(name, value):
    kw = {"lr": 0.1, "damping": 1.0, name: value}
    with pytest.raises(ValueError, match=name):
        kbfgs.KBFGS(mlp(), **kw)


@pytest.mark.parametrize("name,value", [("lr", float("nan")), ("lr", -1.0), ("damping", 0.0),
                                        ("damping", float("inf")), ("momentum", 1.5),
                                        ("weight_decay", float("nan"))])
@pytest.mark.parametrize("opt_name", ["kbfgs", "kfac"])
def test_bad_hyperparameter_set_mid_run_is_rejected_before_anything_changes(name, value,
                                                                            opt_name):
    model = mlp()
    opt = OPTIMIZERS[opt_name](model)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    closure = _closure(opt, model, x, y, _mse)
    for _ in range(2):
        opt.step(closure)
    params = [p.detach().clone() for p in model.parameters()]
    state = copy.deepcopy(opt.state_dict())
    opt.param_groups[0][name] = value
    with pytest.raises(ValueError, match=name):
        opt.step(closure)
    for a, b in zip(params, model.parameters()):
        assert torch.equal(a, b.detach())
    opt.param_groups[0][name] = state["param_groups"][0][name]
    after = opt.state_dict()
    assert after["kronecker"]["steps"] == state["kronecker"]["steps"]
    for key, st in state["state"].items():
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                assert torch.equal(v, after["state"][key][k])


def test_passing_parameters_instead_of_the_model_says_so():
    model = mlp()
    with pytest.raises(TypeError, match="model itself"):
        kbfgs.KBFGS(model.parameters(), lr=0.1, damping=1.0)
    with pytest.raises(TypeError, match="model itself"):
        kbfgs.KFAC(list(model.parameters()), lr=0.1, damping=1.0)


# ----------------------------------------------------------------------------------------------
# 13. warm_start on bad data
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_name", ["kbfgs", "kfac"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_warm_start_on_non_finite_data_is_a_clear_error_and_leaves_the_optimizer_usable(
        opt_name, bad):
    model = mlp()
    opt = OPTIMIZERS[opt_name](model)
    x = torch.randn(16, 6)
    x[3, 2] = bad
    with pytest.raises(ValueError, match=r"non-finite|NaN|nan|inf"):
        opt.warm_start([x])
    g = torch.Generator().manual_seed(1)
    xs, ys = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    closure = _closure(opt, model, xs, ys, _mse)
    for _ in range(3):
        loss = opt.step(closure)
    assert math.isfinite(float(loss))
    assert opt.stats(condition=False)["curvature_updates"] >= 1


@pytest.mark.parametrize("opt_name", ["kbfgs", "kfac"])
def test_empty_batch_is_a_clear_error(opt_name):
    model = mlp()
    opt = OPTIMIZERS[opt_name](model)
    with pytest.raises(ValueError, match="empty"):
        opt.warm_start([torch.empty(0, 6)])
    x, y = torch.empty(0, 6), torch.empty(0, 3)
    with pytest.raises(ValueError, match="empty"):
        opt.step(_closure(opt, model, x, y, lambda o, t: (o - t).pow(2).sum()))


# ----------------------------------------------------------------------------------------------
# 8, 14. load_state_dict: dtype cast, validation
# ----------------------------------------------------------------------------------------------


def _trained(opt_factory, dtype=torch.float32, steps=3):
    model = mlp(dtype=dtype)
    opt = opt_factory(model)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 6, generator=g, dtype=dtype)
    y = torch.randn(8, 3, generator=g, dtype=dtype)
    for _ in range(steps):
        opt.step(_closure(opt, model, x, y, _mse))
    return model, opt, x, y


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_float32_state_loads_into_a_float64_model(name):
    _, opt32, _, _ = _trained(OPTIMIZERS[name])
    model64, opt64, x, y = _trained(OPTIMIZERS[name], dtype=torch.float64, steps=0)
    opt64.load_state_dict(opt32.state_dict())
    for _ in range(2):
        loss = opt64.step(_closure(opt64, model64, x, y, _mse))
    assert math.isfinite(float(loss))
    for st in opt64.state_dict()["kronecker"]["layers"].values():
        for v in (st.values() if isinstance(st, dict) else []):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float64


@pytest.mark.parametrize("src,dst,match", [
    ("kbfgs", "kbfgs-l", "history|L-BFGS|dense"),
    ("kbfgs-l", "kbfgs", "history|L-BFGS|dense"),
    ("kfac", "kbfgs", "KFAC|KBFGS"),
    ("kbfgs", "kfac", "KFAC|KBFGS"),
])
def test_load_state_dict_of_another_kind_names_the_mismatch(src, dst, match):
    _, opt_src, _, _ = _trained(OPTIMIZERS[src])
    _, opt_dst, _, _ = _trained(OPTIMIZERS[dst], steps=0)
    with pytest.raises(ValueError, match=match):
        opt_dst.load_state_dict(opt_src.state_dict())


def test_load_state_dict_with_wrong_shapes_or_missing_keys_names_the_layer():
    _, opt, _, _ = _trained(OPTIMIZERS["kbfgs"])
    sd = opt.state_dict()
    torch.manual_seed(0)
    wider = nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh(), nn.Linear(4, 3))
    opt2 = _kbfgs(wider)
    with pytest.raises(ValueError, match=r"'0'|'2'"):
        opt2.load_state_dict(sd)
    broken = copy.deepcopy(sd)
    layer = next(iter(broken["kronecker"]["layers"]))
    st = broken["kronecker"]["layers"][layer]
    key = "H_A" if isinstance(st, dict) and "H_A" in st else None
    if key is not None:
        del st[key]
        _, opt3, _, _ = _trained(OPTIMIZERS["kbfgs"], steps=0)
        with pytest.raises(ValueError, match=key):
            opt3.load_state_dict(broken)


# ----------------------------------------------------------------------------------------------
# 11. skip_layers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("skip", [["0"], [nn.Linear]])
def test_skip_layers_by_name_or_type_are_other_parameters(skip):
    model = mlp()
    opt = _kbfgs(model, skip_layers=skip)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(8, 6, generator=g), torch.randn(8, 3, generator=g)
    w0 = model[0].weight.detach().clone()
    opt.step(_closure(opt, model, x, y, _mse))
    layers = opt.stats(condition=False)["layers"]
    assert "0" not in layers
    assert not torch.equal(w0, model[0].weight.detach())
    if skip == ["0"]:
        assert "2" in layers and "4" in layers
    else:
        assert not layers
