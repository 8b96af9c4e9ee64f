"""kbfgs.KFAC (Algorithm 5 of the paper, spec section 5) against an independent dense float64
reference written here, plus its sampling, contract and fallbacks.

The reference forms every quantity explicitly: patches a_t with ``F.unfold`` (plus a trailing 1
for a bias), layer-output gradients with ``torch.autograd.grad``, Kronecker products with
``torch.kron`` and inverses with ``torch.linalg.inv``. The sampled targets are redrawn here from
the documented rule: a ``torch.Generator`` seeded with the first 63 bits of
``blake2b("{seed}:step:{k}:0")`` (``"warm"`` and the batch index for the warm start) and
``torch.multinomial`` / ``torch.bernoulli`` / ``torch.randn`` on the model output.

Initialisation rule under test (documented in ``KFAC``): without warm start
``H_Omega = H_Gamma = I / sqrt(lambda)`` until the first inversion, and the first statistics pass
sets Omega, Gamma to its minibatch factors; later passes use ``beta = 0.9`` moving averages.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from kbfgs.optim.kfac import sample_targets, sampling_seed

DT = torch.float64


# ----------------------------------------------------------------------------------------------
# Models, data, losses
# ----------------------------------------------------------------------------------------------


class MLP(nn.Module):
    def __init__(self, inplace: bool = False):
        super().__init__()
        self.l1 = nn.Linear(6, 5)
        self.l2 = nn.Linear(5, 4, bias=False)
        self.l3 = nn.Linear(4, 3)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.l3(torch.tanh(self.act(self.l2(self.act(self.l1(x))))))


class CNN(nn.Module):
    """Conv (stride 2, padding 1) -> BatchNorm -> ReLU -> bias-free Conv -> tanh -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        return self.fc(torch.tanh(self.conv2(x)).flatten(1))


def make_model(kind, seed=0, **kw):
    torch.manual_seed(seed)
    return (MLP(**kw) if kind == "mlp" else CNN()).to(DT)


def make_data(kind, likelihood, m=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (m, 6) if kind == "mlp" else (m, 2, 7, 7)
    x = torch.randn(*shape, generator=g, dtype=DT)
    if likelihood == "categorical":
        y = torch.randint(0, 3, (m,), generator=g)
    elif likelihood == "bernoulli":
        y = torch.randint(0, 2, (m, 3), generator=g).to(DT)
    else:
        y = torch.randn(m, 3, generator=g, dtype=DT)
    return x, y


def loss_fn(likelihood, reduction="mean"):
    def f(out, y):
        if likelihood == "categorical":
            return F.cross_entropy(out, y, reduction=reduction)
        if likelihood == "bernoulli":
            per = F.binary_cross_entropy_with_logits(out, y, reduction="none").sum(1)
        else:
            per = 0.5 * (out - y).pow(2).sum(1)
        return per.mean() if reduction == "mean" else per.sum()

    return f


def make_closure(opt, model, x, y, f):
    def closure():
        opt.zero_grad()
        loss = f(model(x), y)
        loss.backward()
        return loss

    return closure


# ----------------------------------------------------------------------------------------------
# Independent dense reference
# ----------------------------------------------------------------------------------------------


def ref_seed(seed, stream, index):
    d = hashlib.blake2b(f"{seed}:{stream}:{index}:0".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") >> 1


def ref_sample(out, likelihood, seed):
    g = torch.Generator().manual_seed(seed)
    out = out.detach()
    if likelihood == "categorical":
        return torch.multinomial(torch.softmax(out, 1), 1, replacement=True, generator=g)[:, 0]
    if likelihood == "bernoulli":
        return torch.bernoulli(torch.sigmoid(out), generator=g)
    return out + torch.randn(out.shape, generator=g, dtype=out.dtype)


def kron_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def patches(mod, x):
    """(m, |T|, cols): a_t(n), with a trailing 1 when the layer has a bias."""
    if isinstance(mod, nn.Conv2d):
        a = F.unfold(x, mod.kernel_size, dilation=mod.dilation, padding=mod.padding,
                     stride=mod.stride).transpose(1, 2)
    else:
        a = x[:, None, :]
    if mod.bias is not None:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=2)
    return a


def ref_factors(model, x, likelihood, seed):
    """Omega_l = E_n[sum_t a a^T], Gamma_l = E_n[mean_t Dh Dh^T] with Dh = m dL_sampled/dh."""
    layers = kron_layers(model)
    ins, outs, hs = {}, {}, []
    hooks = []
    for name, mod in layers:
        def hook(mod, inp, out, name=name):
            ins[name] = inp[0].detach()
            outs[name] = out
        hooks.append(mod.register_forward_hook(hook))
    saved = [b.clone() for b in model.buffers()]
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    target = ref_sample(out, likelihood, seed)
    loss = loss_fn(likelihood)(out, target)
    names = [n for n, _ in layers]
    hs = [outs[n] for n in names]
    grads = dict(zip(names, torch.autograd.grad(loss, hs)))
    with torch.no_grad():
        for b, s in zip(model.buffers(), saved):  # buffers as before the pass
            b.copy_(s)
    m = x.shape[0]
    res = {}
    for name, mod in layers:
        a = patches(mod, ins[name])
        Omega = torch.einsum("nti,ntj->ij", a, a) / m
        Dh = m * grads[name]
        if Dh.dim() == 4:
            Gamma = torch.einsum("nchw,ndhw->cd", Dh, Dh) / (m * Dh.shape[2] * Dh.shape[3])
        else:
            Gamma = torch.einsum("ni,nj->ij", Dh, Dh) / m
        res[name] = (Omega.detach(), Gamma.detach())
    return res


def kron(a, b):
    return torch.kron(a.contiguous(), b.contiguous())


def ref_inverses(Omega, Gamma, damping):
    """Line 19 literally: pi from the traces of the Kronecker products, explicit inverses."""
    dO, dG = Omega.shape[0], Gamma.shape[0]
    IO, IG = torch.eye(dO, dtype=DT), torch.eye(dG, dtype=DT)
    pi = math.sqrt(torch.trace(kron(Omega, IG)) / torch.trace(kron(IO, Gamma)))
    r = math.sqrt(damping)
    return torch.linalg.inv(Omega + pi * r * IO), torch.linalg.inv(Gamma + r / pi * IG), pi


def wmat(mod, grad=False):
    w = mod.weight.grad if grad else mod.weight
    cols = [w.reshape(w.shape[0], -1)]
    if mod.bias is not None:
        cols.append((mod.bias.grad if grad else mod.bias)[:, None])
    return torch.cat(cols, dim=1)


class DenseKFAC:
    """Algorithm 5 with dense Kronecker products: vec(P) = (H_Omega^T kron H_Gamma) vec(BUF)."""

    def __init__(self, model, lr, damping, momentum, stat_freq, inv_freq, wd, likelihood, seed):
        self.model, self.lr, self.damping, self.mom = model, lr, damping, momentum
        self.stat_freq, self.inv_freq, self.wd = stat_freq, inv_freq, wd
        self.likelihood, self.seed, self.k = likelihood, seed, 0
        self.layers = kron_layers(model)
        r = math.sqrt(damping)
        self.st = {}
        for name, mod in self.layers:
            W = wmat(mod)
            self.st[name] = {"buf": torch.zeros_like(W), "Omega": None, "Gamma": None,
                                 "H_O": torch.eye(W.shape[1], dtype=DT) / r,
                                 "H_G": torch.eye(W.shape[0], dtype=DT) / r}
        kp = {id(p) for _, mod in self.layers for p in mod.parameters()}
        self.others = [p for p in model.parameters() if id(p) not in kp]
        self.obuf = [torch.zeros_like(p) for p in self.others]

    def warm_start(self, xs):
        sums, n = {}, 0
        for i, x in enumerate(xs):
            f = ref_factors(self.model, x, self.likelihood, ref_seed(self.seed, "warm", i))
            for name, (O, G) in f.items():
                O, G = O * x.shape[0], G * x.shape[0]
                sums[name] = (O, G) if name not in sums else (sums[name][0] + O, sums[name][1] + G)
            n += x.shape[0]
        for name, (O, G) in sums.items():
            st = self.st[name]
            st["Omega"], st["Gamma"] = O / n, G / n
            st["H_O"], st["H_G"], _ = ref_inverses(st["Omega"], st["Gamma"], self.damping)

    def step(self, x, y, f):
        self.k += 1
        self.model.zero_grad()
        f(self.model(x), y).backward()
        with torch.no_grad():
            for name, mod in self.layers:
                st = self.st[name]
                st["buf"] = self.mom * st["buf"] + wmat(mod, grad=True)
                rows, cols = st["buf"].shape
                vecP = kron(st["H_O"].T, st["H_G"]) @ st["buf"].T.reshape(-1)
                P = vecP.reshape(cols, rows).T
                W = wmat(mod)
                W = W - self.lr * (P + self.wd * W)
                k = mod.weight[0].numel()
                mod.weight.copy_(W[:, :k].reshape(mod.weight.shape))
                if mod.bias is not None:
                    mod.bias.copy_(W[:, k])
            for i, p in enumerate(self.others):  # other parameters: lr itself (Appendix D.1)
                self.obuf[i] = self.mom * self.obuf[i] + p.grad
                p.sub_(self.lr * (self.obuf[i] + self.wd * p))
        if self.k % self.stat_freq == 0:
            fac = ref_factors(self.model, x, self.likelihood, ref_seed(self.seed, "step", self.k))
            for name, (O, G) in fac.items():
                st = self.st[name]
                if st["Omega"] is None:
                    st["Omega"], st["Gamma"] = O, G
                else:
                    st["Omega"] = 0.9 * st["Omega"] + 0.1 * O
                    st["Gamma"] = 0.9 * st["Gamma"] + 0.1 * G
        if self.k % self.inv_freq == 0:
            for st in self.st.values():
                st["H_O"], st["H_G"], _ = ref_inverses(st["Omega"], st["Gamma"], self.damping)


# ----------------------------------------------------------------------------------------------
# Factors, pi and the damped inverses
# ----------------------------------------------------------------------------------------------


FACTOR_CASES = [("mlp", "categorical"), ("mlp", "bernoulli"), ("mlp", "gaussian"),
                ("cnn", "categorical"), ("cnn", "bernoulli")]


@pytest.mark.parametrize("kind,likelihood", FACTOR_CASES)
def test_factors_pi_and_inverses_match_explicit_formulas(kind, likelihood):
    model = make_model(kind)
    x, y = make_data(kind, likelihood)
    damping, seed = 0.5, 7
    opt = kbfgs.KFAC(model, lr=0.1, damping=damping, stat_freq=1, inv_freq=1,
                     likelihood=likelihood, seed=seed)
    opt.step(make_closure(opt, model, x, y, loss_fn(likelihood)))
    # the factor pass ran after the update, at the new parameters (line 12 follows line 9)
    ref = ref_factors(copy.deepcopy(model), x, likelihood, ref_seed(seed, "step", 1))
    assert set(ref) == set(opt.layer_state)
    for name, (Omega, Gamma) in ref.items():
        st = opt.layer_state[name].to_state_dict()
        torch.testing.assert_close(st["Omega"], Omega, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(st["Gamma"], Gamma, rtol=1e-10, atol=1e-12)
        H_O, H_G, pi = ref_inverses(Omega, Gamma, damping)
        assert float(st["pi"]) == pytest.approx(pi, rel=1e-12)
        torch.testing.assert_close(st["H_Omega"], H_O, rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(st["H_Gamma"], H_G, rtol=1e-9, atol=1e-12)
    s = opt.stats()["layers"]
    assert set(s) == set(ref)
    for v in s.values():
        assert {"pi", "cond_H_Omega", "cond_H_Gamma"} <= set(v) and v["cond_H_Omega"] >= 1.0


def test_sum_reduction_gives_the_same_factors():
    x, y = make_data("mlp", "categorical")
    sts = []
    for red in ("mean", "sum"):
        model = make_model("mlp")
        opt = kbfgs.KFAC(model, lr=0.1, damping=1.0, inv_freq=1, loss_reduction=red)
        opt.param_groups[0]["lr"] = 0.0  # no move (lr = 0 is refused at construction only)
        opt.step(make_closure(opt, model, x, y, loss_fn("categorical", red)))
        sts.append({n: st.to_state_dict() for n, st in opt.layer_state.items()})
    for name in sts[0]:
        for key in ("Omega", "Gamma", "H_Omega", "H_Gamma"):
            torch.testing.assert_close(sts[0][name][key], sts[1][name][key], rtol=1e-10,
                                       atol=1e-14)


def test_inplace_activation_after_a_layer_does_not_change_gamma():
    x, y = make_data("mlp", "categorical")
    sts = []
    for inplace in (False, True):
        model = make_model("mlp", inplace=inplace)
        opt = kbfgs.KFAC(model, lr=0.1, damping=1.0, inv_freq=1)
        opt.step(make_closure(opt, model, x, y, loss_fn("categorical")))
        sts.append({n: st.to_state_dict() for n, st in opt.layer_state.items()})
    for name in sts[0]:
        torch.testing.assert_close(sts[0][name]["Gamma"], sts[1][name]["Gamma"], rtol=0, atol=0)


@pytest.mark.parametrize("kind,likelihood,stat_freq,inv_freq,wd,warm,momentum", [
    ("cnn", "categorical", 1, 1, 0.0, False, 0.9),
    ("cnn", "categorical", 1, 2, 0.1, False, 0.9),
    ("cnn", "bernoulli", 2, 3, 0.0, True, 0.5),
    ("mlp", "gaussian", 1, 2, 0.05, True, 0.9),
])
def test_steps_match_dense_reference(kind, likelihood, stat_freq, inv_freq, wd, warm, momentum):
    model = make_model(kind)
    twin = copy.deepcopy(model)
    lr, damping, seed = 0.05, 0.3, 3
    opt = kbfgs.KFAC(model, lr=lr, damping=damping, momentum=momentum, stat_freq=stat_freq,
                     inv_freq=inv_freq, weight_decay=wd, likelihood=likelihood, seed=seed)
    ref = DenseKFAC(twin, lr, damping, momentum, stat_freq, inv_freq, wd, likelihood, seed)
    if warm:
        xs = [make_data(kind, likelihood, m=m, seed=10 + m)[0] for m in (5, 9)]
        opt.warm_start([(xb, None) for xb in xs])
        ref.warm_start(xs)
        assert opt.warm_started
        for name, st in ref.st.items():
            torch.testing.assert_close(opt.layer_state[name].Omega, st["Omega"], rtol=1e-10,
                                       atol=1e-12)
            torch.testing.assert_close(opt.layer_state[name].H_Gamma, st["H_G"], rtol=1e-9,
                                       atol=1e-12)
    f = loss_fn(likelihood)
    for k in range(5):
        x, y = make_data(kind, likelihood, seed=100 + k)
        opt.step(make_closure(opt, model, x, y, f))
        ref.step(x, y, f)
        for (n, p), (_, q) in zip(model.named_parameters(), twin.named_parameters()):
            torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-11, msg=f"step {k + 1}: {n}")
        for (n, b), (_, c) in zip(model.named_buffers(), twin.named_buffers()):
            torch.testing.assert_close(b, c, rtol=1e-12, atol=1e-12, msg=f"step {k + 1}: {n}")
    for name, st in ref.st.items():
        torch.testing.assert_close(opt.layer_state[name].Gamma, st["Gamma"], rtol=1e-8,
                                   atol=1e-11)


def test_warm_start_restores_buffers_and_keeps_grads():
    model = make_model("cnn")
    x, y = make_data("cnn", "categorical")
    model.zero_grad()
    loss_fn("categorical")(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    bufs = copy.deepcopy(list(model.buffers()))
    opt = kbfgs.KFAC(model, lr=0.1, damping=1.0)
    opt.warm_start([x, x[:3]])
    for b, c in zip(model.buffers(), bufs):
        assert torch.equal(b, c)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)
    with pytest.raises(ValueError, match="no input batches"):
        kbfgs.KFAC(make_model("cnn"), lr=0.1, damping=1.0).warm_start([])


# ----------------------------------------------------------------------------------------------
# Sampling from the predictive distribution
# ----------------------------------------------------------------------------------------------


N_DRAWS = 40000


def test_categorical_samples_match_softmax():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [-3.0, 1.0, 1.0, 0.0]],
                          dtype=DT)
    out = logits.repeat(N_DRAWS, 1)  # one row per draw
    y = sample_targets(out, "categorical", torch.Generator().manual_seed(0))
    assert y.shape == (3 * N_DRAWS,) and y.dtype == torch.int64
    freq = F.one_hot(y, 4).to(DT).reshape(N_DRAWS, 3, 4).mean(0)
    p = torch.softmax(logits, 1)
    tol = 5 * torch.sqrt(p * (1 - p) / N_DRAWS)  # 5 standard errors of a binomial proportion
    assert (freq - p).abs().le(tol).all(), (freq, p)
    # classes on dim 1 with extra dims, as for F.cross_entropy
    y2 = sample_targets(torch.zeros(5, 4, 2, 3), "categorical", torch.Generator().manual_seed(1))
    assert y2.shape == (5, 2, 3) and int(y2.max()) <= 3


def test_bernoulli_samples_match_sigmoid():
    logits = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0], dtype=DT)
    y = sample_targets(logits.repeat(N_DRAWS, 1), "bernoulli", torch.Generator().manual_seed(0))
    assert set(y.unique().tolist()) <= {0.0, 1.0}
    p = torch.sigmoid(logits)
    tol = 5 * torch.sqrt(p * (1 - p) / N_DRAWS)
    assert (y.mean(0) - p).abs().le(tol).all()


def test_gaussian_samples_have_the_output_as_mean_and_unit_variance():
    mean = torch.tensor([-1.0, 0.0, 2.5], dtype=DT)
    y = sample_targets(mean.repeat(N_DRAWS, 1), "gaussian", torch.Generator().manual_seed(0))
    assert (y.mean(0) - mean).abs().le(5 / math.sqrt(N_DRAWS)).all()  # 5 sigma, sigma = 1
    assert (y.var(0) - 1).abs().le(5 * math.sqrt(2 / N_DRAWS)).all()


def test_sampling_is_deterministic_and_seed_rule_is_documented():
    out = torch.randn(6, 4, dtype=DT)
    a = sample_targets(out, "categorical", torch.Generator().manual_seed(5))
    b = sample_targets(out, "categorical", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    assert sampling_seed(3, "step", 4) == ref_seed(3, "step", 4)
    assert len({sampling_seed(0, "step", k) for k in range(1, 50)}) == 49
    assert sampling_seed(0, "step", 1) != sampling_seed(0, "warm", 1)


# ----------------------------------------------------------------------------------------------
# Contract: hyper-parameters, closure/model errors, non-finite steps, exact resume
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,value", [
    ("stat_freq", 0), ("stat_freq", 1.5), ("inv_freq", 0), ("inv_freq", 2.5),
    ("likelihood", "poisson"), ("beta", 1.0), ("lr", -1.0), ("damping", 0.0),
    ("momentum", 1.0), ("weight_decay", -0.1),
])
def test_invalid_hyperparameters_raise_value_error(name, value):
    hp = {"lr": 0.1, "damping": 1.0}
    hp[name] = value
    with pytest.raises(ValueError, match=re.escape(name)):
        kbfgs.KFAC(make_model("mlp"), **hp)


class TupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(x), x


def test_non_tensor_output_raises_a_clear_type_error():
    model = TupleOut()
    opt = kbfgs.KFAC(model, lr=0.1, damping=1.0)
    x = torch.randn(5, 4)

    def closure():
        opt.zero_grad()
        loss = model(x)[0].pow(2).mean()
        loss.backward()
        return loss

    w0 = model.fc.weight.detach().clone()
    with pytest.raises(TypeError, match="logits"):
        opt.step(closure)
    assert opt.steps == 0 and torch.equal(model.fc.weight, w0)  # raised before the update
    with pytest.raises(TypeError, match="logits"):
        opt.warm_start([x])


def test_closure_that_bypasses_the_model_raises_before_any_change():
    model = make_model("mlp")
    opt = kbfgs.KFAC(model, lr=0.1, damping=1.0)
    x, y = make_data("mlp", "categorical")
    before = copy.deepcopy(model.state_dict())

    def closure():  # calls the layers, never the model passed to the optimizer
        opt.zero_grad()
        h = torch.tanh(model.act(model.l2(model.act(model.l1(x)))))
        loss = F.cross_entropy(model.l3(h), y)
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="closure did not call it"):
        opt.step(closure)
    assert opt.steps == 0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def _snapshot(opt, model):
    return copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())


def _assert_same(a, b):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            _assert_same(u, v)
    else:
        assert a == b


@pytest.mark.parametrize("kind", ["loss", "grad"])
def test_non_finite_step_is_skipped_with_state_unchanged(kind):
    model = make_model("cnn")
    x, y = make_data("cnn", "categorical")
    opt = kbfgs.KFAC(model, lr=0.05, damping=1.0, stat_freq=1, inv_freq=3)
    f = loss_fn("categorical")
    for _ in range(2):
        opt.step(make_closure(opt, model, x, y, f))
    sd, msd = _snapshot(opt, model)

    def bad():  # step 3 would update the factors and the inverses
        opt.zero_grad()
        loss = f(model(x), y)
        if kind == "loss":
            loss = loss * float("nan")
        loss.backward()
        if kind == "grad":
            model.fc.weight.grad[0, 0] = float("inf")
        return loss

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        opt.step(bad)
    assert any("non-finite" in str(x.message) for x in w)
    sd2, _msd2 = _snapshot(opt, model)
    sd2["kronecker"]["skipped_steps"] -= 1
    _assert_same(sd, sd2)
    for name, p in model.named_parameters():  # (BatchNorm buffers are the closure's business)
        assert torch.equal(p, msd[name]), name
    assert opt.stats()["skipped_steps"] == 1


@pytest.mark.parametrize("warm", [False, True])
def test_resume_is_bit_identical(warm):
    f = loss_fn("categorical")
    data = [(x.float(), y) for x, y in
            (make_data("cnn", "categorical", seed=200 + k) for k in range(8))]
    hp = {"lr": 0.05, "damping": 0.5, "stat_freq": 2, "inv_freq": 3, "weight_decay": 0.01,
          "seed": 11}

    def run(model, opt, batches):
        for x, y in batches:
            opt.step(make_closure(opt, model, x, y, f))

    model = make_model("cnn").float()
    opt = kbfgs.KFAC(model, **hp)
    if warm:
        opt.warm_start([data[0][0]])
    run(model, opt, data[:3])
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    run(model, opt, data[3:])

    buf.seek(0)
    ck = torch.load(buf, weights_only=False)
    model2 = make_model("cnn", seed=99).float()
    model2.load_state_dict(ck["model"])
    opt2 = kbfgs.KFAC(model2, **{**hp, "seed": 0})  # the seed comes back from the state_dict
    opt2.load_state_dict(ck["opt"])
    run(model2, opt2, data[3:])
    for (n, p), (_, q) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(p, q), n
    _assert_same(opt.state_dict(), opt2.state_dict())


# ----------------------------------------------------------------------------------------------
# Fallbacks: same Kronecker-layer rules as K-BFGS; other parameters at lr (Appendix D.1)
# ----------------------------------------------------------------------------------------------


class GroupedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, groups=2)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x):
        return self.fc(torch.tanh(self.conv2(torch.tanh(self.conv1(x)))).flatten(1))


def test_unsupported_layer_falls_back_to_momentum_sgd_at_lr():
    torch.manual_seed(0)
    model = GroupedNet().to(DT)
    with pytest.warns(UserWarning, match="conv2"):
        opt = kbfgs.KFAC(model, lr=0.1, damping=4.0, momentum=0.0, weight_decay=0.0)
    assert [ly.name for ly in opt.layers] == ["conv1", "fc"]
    x = torch.randn(4, 2, 5, 5, dtype=DT)
    y = torch.tensor([0, 1, 2, 1])
    w0 = model.conv2.weight.detach().clone()
    closure = make_closure(opt, model, x, y, loss_fn("categorical"))
    closure()
    g = model.conv2.weight.grad.clone()
    opt.step(closure)
    torch.testing.assert_close(model.conv2.weight, w0 - 0.1 * g, rtol=1e-12, atol=1e-14)


def test_module_called_twice_is_demoted_with_warning():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 2)

        def forward(self, x):
            return self.b(torch.tanh(self.a(torch.tanh(self.a(x)))))

    model = Twice().to(DT)
    opt = kbfgs.KFAC(model, lr=0.1, damping=1.0, inv_freq=1)
    x, y = torch.randn(6, 4, dtype=DT), torch.tensor([0, 1, 0, 1, 1, 0])
    with pytest.warns(UserWarning, match="'a'"):
        opt.step(make_closure(opt, model, x, y, loss_fn("categorical")))
    assert [ly.name for ly in opt.layers] == ["b"]
    opt.step(make_closure(opt, model, x, y, loss_fn("categorical")))
    assert opt.layer_state["b"].stat_updates == 2


def test_lr_scheduler_and_training_progress():
    model = make_model("cnn").float()
    x, y = make_data("cnn", "categorical", m=16)
    x = x.float()
    opt = kbfgs.KFAC(model, lr=0.1, damping=0.3, stat_freq=1, inv_freq=5)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)
    closure = make_closure(opt, model, x, y, loss_fn("categorical"))
    first = float(closure().detach())
    for _ in range(20):
        opt.step(closure)
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.025)
    assert float(closure().detach()) < 0.3 * first


def _autocast_step(amp, x, y):
    model = make_model("mlp").float()
    opt = kbfgs.KFAC(model, lr=0.1, damping=1.0, inv_freq=1)
    seen = []
    model.l3.register_forward_hook(lambda m, i, o: seen.append(o.dtype))

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = model(x)
        loss = F.cross_entropy(out.float(), y)
        loss.backward()
        return loss

    opt.step(closure)
    return {n: st.to_state_dict() for n, st in opt.layer_state.items()}, seen


def test_factor_pass_replays_autocast_and_keeps_curvature_in_float32():
    x, y = make_data("mlp", "categorical")
    x = x.float()
    plain, seen = _autocast_step(False, x, y)
    assert seen == [torch.float32] * 2
    amp, seen = _autocast_step(True, x, y)
    assert seen == [torch.bfloat16] * 2  # the closure's pass, then the factor pass
    for name, st in amp.items():
        for key in ("Omega", "Gamma", "H_Omega", "H_Gamma"):
            assert st[key].dtype == torch.float32 and torch.isfinite(st[key]).all()
        torch.testing.assert_close(st["Omega"], plain[name]["Omega"], rtol=0.05, atol=0.05)


def test_inverse_falls_back_to_eigenvalues_when_cholesky_fails():
    from kbfgs.linalg import damped_spd_inverse

    Q, _ = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(0),
                                       dtype=DT))
    ev = torch.tensor([3.0, 1.0, 0.5, -1e-9], dtype=DT)  # rounding made M = PSD + 0.5 I indefinite
    H, fell_back = damped_spd_inverse((Q * (ev - 0.5)) @ Q.T, torch.tensor(0.5, dtype=DT))
    assert fell_back
    torch.testing.assert_close(H, (Q / ev.clamp_min(0.5)) @ Q.T, rtol=1e-10, atol=1e-12)
    M = (Q * ev.abs().clamp_min(0.5)) @ Q.T
    H, fell_back = damped_spd_inverse(M - 0.5 * torch.eye(4, dtype=DT), 0.5)
    assert not fell_back
    torch.testing.assert_close(H, torch.linalg.inv(M), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli", "gaussian"])
def test_sampling_from_a_non_finite_output_does_not_raise(likelihood):
    out = torch.tensor([[0.5, float("nan"), -1.0], [float("inf"), 2.0, float("-inf")]])
    gen = torch.Generator().manual_seed(0)
    y = sample_targets(out, likelihood, gen)
    ref = sample_targets(torch.tensor([[0.5, 0.0, -1.0], [0.0, 2.0, 0.0]]), likelihood,
                         torch.Generator().manual_seed(0))
    assert torch.equal(y, ref)  # non-finite entries drawn as if they were 0


class _NaNOnFactorPass(nn.Module):
    """An MLP whose output turns NaN from its second forward call on (the factor pass that
    follows the first update), as a diverging model's would."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(6, 5)
        self.l2 = nn.Linear(5, 3)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        out = self.l2(torch.relu(self.l1(x)))
        return out * float("nan") if self.calls > 1 else out


@pytest.mark.parametrize("likelihood", ["categorical", "bernoulli"])
def test_factor_pass_on_a_nan_output_skips_the_factors(likelihood):
    torch.manual_seed(0)
    model = _NaNOnFactorPass().double()
    x = torch.randn(8, 6, dtype=DT)
    y = torch.randint(0, 3, (8,)) if likelihood == "categorical" else torch.rand(8, 3, dtype=DT)
    f = loss_fn(likelihood)
    opt = kbfgs.KFAC(model, lr=0.01, damping=1.0, stat_freq=1, inv_freq=5,
                     likelihood=likelihood)
    opt.step(make_closure(opt, model, x, y, f))  # update, then a factor pass on a NaN output
    st = opt.stats()
    assert all(layer["skipped_stats"] == 1 for layer in st["layers"].values()), st
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["stat_freq", "inv_freq"])
@pytest.mark.parametrize("value", [0, -1, 1.5, float("inf"), float("nan"), "3", True, None])
def test_bad_stat_or_inv_freq_is_a_value_error_naming_it(name, value):
    # issue 11, item 12: not an OverflowError / TypeError from int()
    with pytest.raises(ValueError, match=re.escape(name)):
        kbfgs.KFAC(make_model("mlp"), lr=0.1, damping=1.0, **{name: value})


@pytest.mark.parametrize("value", [3, 3.0])
def test_integral_stat_and_inv_freq_are_accepted(value):
    opt = kbfgs.KFAC(make_model("mlp"), lr=0.1, damping=1.0, stat_freq=value, inv_freq=value)
    assert opt.stat_freq == 3 and opt.inv_freq == 3
    assert isinstance(opt.stat_freq, int) and isinstance(opt.inv_freq, int)
