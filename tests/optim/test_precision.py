"""Precision outside float32/float64 eager training (issue 11): conv followed by BatchNorm,
memory formats, mixed precision, loss scaling, the extra-pass flag, torch.compile."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from cases import mlp
from kbfgs.optim.kbfgs_plus import KBFGSPlus


class ConvBN(nn.Module):
    """conv -> BN -> ReLU twice, then a Linear head: both convs feed a BatchNorm."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, stride=2, bias=False)
        self.b2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 3 * 3, 3)

    def forward(self, x):
        x = F.relu(self.b1(self.c1(x)))
        x = F.relu(self.b2(self.c2(x)))
        return self.fc(x.flatten(1))


def _convbn_data(n=20, m=8, dtype=torch.float64):
    g = torch.Generator().manual_seed(3)
    return [(torch.randn(m, 2, 7, 7, generator=g, dtype=dtype),
             torch.randint(0, 3, (m,), generator=g)) for _ in range(n)]


def _ce_step(opt, model, x, y, bf16=False):
    """One step on the cross-entropy of ``model(x)`` (under bfloat16 autocast with ``bf16``):
    K-BFGS with a closure; the closure-free kbfgs-plus after the backward, as a user's loop."""

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = F.cross_entropy(out.float() if bf16 else out, y)
        loss.backward()
        return loss

    if isinstance(opt, KBFGSPlus):
        closure()
        opt.step()
    else:
        opt.step(closure)


def _train_convbn(dtype, history=None, channels_last=False, steps=20):
    torch.manual_seed(0)
    model = ConvBN().to(torch.float64)
    model = model.to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    opt = kbfgs.KBFGS(model, lr=0.05, damping=0.3, history=history)
    for x, y in _convbn_data(steps):
        x = x.to(dtype)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        _ce_step(opt, model, x, y)
    return model, opt


@pytest.mark.parametrize("history", [None, 5])
def test_conv_feeding_batchnorm_float32_equals_float64(history):
    m32, opt32 = _train_convbn(torch.float32, history)
    m64, opt64 = _train_convbn(torch.float64, history)
    for (name, p32), p64 in zip(m32.named_parameters(), m64.parameters()):
        scale = float(p64.abs().max())
        err = float((p32.double() - p64).abs().max())
        assert err <= 1e-4 * max(scale, 1.0), f"{name}: float32 vs float64 differ by {err:.3g}"
    layers = opt32.stats(condition=False)["layers"]
    # the conv pairs are rounding noise: skipped and counted apart; the head's pairs are not
    assert layers["c1"]["skipped_G_rounding"] > 0
    assert layers["c2"]["skipped_G_rounding"] > 0
    assert layers["fc"]["skipped_G_rounding"] == 0
    assert opt64.stats(condition=False)["layers"]["fc"]["skipped_G_rounding"] == 0


def test_conv_feeding_batchnorm_channels_last_equals_contiguous():
    ma, _ = _train_convbn(torch.float32)
    mb, _ = _train_convbn(torch.float32, channels_last=True)
    for (name, a), b in zip(ma.named_parameters(), mb.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5, msg=name)


# ----------------------------------------------------------------------------------------------
# Mixed precision
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["kbfgs", "kbfgs-l", "kfac"])
def test_bf16_autocast_trains_with_float32_curvature(name):
    model = mlp()
    if name == "kfac":
        opt = kbfgs.KFAC(model, lr=0.05, damping=1.0, likelihood="gaussian")
    else:
        opt = kbfgs.KBFGS(model, lr=0.05, damping=1.0, history=5 if name == "kbfgs-l" else None)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = 0.5 * (out.float() - y).pow(2).sum(1).mean()
        loss.backward()
        return loss

    losses = [float(opt.step(closure)) for _ in range(15)]
    assert losses[-1] < losses[0]
    st = opt.state_dict()["kronecker"]["layers"]
    for layer in st.values():
        for v in (layer.values() if isinstance(layer, dict) else []):
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32
    assert opt.stats(condition=False)["curvature_updates"] == 15


@pytest.mark.parametrize("method", ["kbfgs", "kbfgs-plus"])
def test_conv_feeding_batchnorm_under_bf16_autocast_keeps_its_H_G(method):
    """Under bfloat16 autocast the output gradients carry bfloat16 rounding, far above the
    float32 level of the numerical test (measured: a BatchNorm-fed conv's ``||Dh_bar||_1`` is
    up to ~3 bf16-eps / sqrt(M) of ``Dh_scale``, a Linear with one output can be as low), so
    the pairs of the convs are known as rounding from the model's structure: they are all
    skipped and H_G stays ``I / lambda_G``, as in exact arithmetic; the head is not affected.
    With ``fisher_G`` the convs take the Fisher left factor."""
    torch.manual_seed(0)
    model = ConvBN()
    if method == "kbfgs":
        opt = kbfgs.KBFGS(model, lr=0.05, damping=0.3)
    else:
        opt = KBFGSPlus(model, lr=3e-3, damping=0.3, update_freq=1, fisher_G=True)
    for x, y in _convbn_data(8, m=16, dtype=torch.float32):
        _ce_step(opt, model, x, y, bf16=True)
    assert opt.capture.norm_fed == {"c1": model.b1, "c2": model.b2}
    layers = opt.stats(condition=False)["layers"]
    pairs = 8 if method == "kbfgs" else 6  # closure-free: the pair of step k completes at k+1
    assert layers["c1"]["skipped_G_rounding"] == pairs and layers["c1"]["skipped_G"] == 0
    assert layers["c2"]["skipped_G_rounding"] == pairs
    assert layers["fc"]["skipped_G_rounding"] == 0
    if method == "kbfgs":
        st = opt.layer_state["c1"]
        lam_G = opt._lambdas(opt.layers[0], st.locations)[1]
        assert torch.equal(st.H_G, torch.eye(4) / lam_G)
    else:
        assert opt.capture.gram == {"c1", "c2"}
        assert layers["c1"]["fisher_G"] and not layers["fc"]["fisher_G"]


class Detours(nn.Module):
    """Outputs that reach a BatchNorm changed (an in-place ReLU) or in a layout the BatchNorm
    does not normalise per output feature (a Linear's 3-d output): their ``Dh_bar`` is not 0."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 4, 3, padding=1)
        self.b1 = nn.BatchNorm2d(4)
        self.c2 = nn.Conv2d(4, 4, 3, padding=1)
        self.b2 = nn.BatchNorm2d(4)
        self.l3 = nn.Linear(49, 5)
        self.b3 = nn.BatchNorm1d(4)
        self.fc = nn.Linear(20, 3)

    def forward(self, x):
        h = self.b1(self.c1(x))
        h = self.b2(torch.relu_(self.c2(h)))
        return self.fc(self.b3(self.l3(h.flatten(2))).flatten(1))


def test_batchnorm_fed_layers_are_those_whose_output_goes_in_unchanged():
    torch.manual_seed(0)
    model = Detours().double()
    opt = kbfgs.KBFGS(model, lr=0.05, damping=0.3)
    for x, y in _convbn_data(4):
        _ce_step(opt, model, x, y)
    assert opt.capture.norm_fed == {"c1": model.b1}
    layers = opt.stats(condition=False)["layers"]
    assert layers["c1"]["skipped_G_rounding"] == 4
    # the others' Dh_bar is not 0: their pairs are real (float64, far above rounding)
    assert all(layers[n]["skipped_G_rounding"] == 0 for n in ("c2", "l3", "fc"))
    assert opt.capture.uses_batch_statistics("c1")
    model.b1.eval()  # running statistics: Dh_bar is not 0 any more
    assert not opt.capture.uses_batch_statistics("c1")
    model.b1.track_running_stats = False  # batch statistics in eval mode too
    assert opt.capture.uses_batch_statistics("c1")
    assert not opt.capture.uses_batch_statistics("c2")


def test_grad_scaler_unscales_and_skips_an_overflow_with_state_unchanged():
    model = mlp()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    opt = kbfgs.KBFGS(model, lr=0.05, damping=1.0, grad_scaler=scaler)
    ref_model = mlp()
    ref = kbfgs.KBFGS(ref_model, lr=0.05, damping=1.0)
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)) for _ in range(4)]

    def make(o, mdl, x, y, scale):
        def closure():
            o.zero_grad()
            loss = 0.5 * (mdl(x) - y).pow(2).sum(1).mean()
            (scaler.scale(loss) if scale else loss).backward()
            return loss
        return closure

    for x, y in data[:3]:
        opt.step(make(opt, model, x, y, True))
        ref.step(make(ref, ref_model, x, y, False))
    # a power-of-two scale unscales exactly: the scaled run equals the unscaled run
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # forced overflow: the step is skipped, state and parameters unchanged, scale reduced
    before = [p.detach().clone() for p in model.parameters()]
    sd = copy.deepcopy(opt.state_dict())
    scale0 = scaler.get_scale()
    big = float(torch.finfo(torch.float32).max)  # the scale is a float32 tensor
    scaler.update(new_scale=big)
    x, y = data[3]
    y = y + 100.0  # dL/dout is about 6: scaled by the largest float32, the gradient overflows
    opt.step(make(opt, model, x, y, True))
    assert scaler.get_scale() < big
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b.detach())
    assert opt.state_dict()["kronecker"]["steps"] == sd["kronecker"]["steps"]
    assert scale0 > 0


def test_in_extra_pass_flag_tells_the_closure_which_pass_runs():
    model = mlp()
    opt = kbfgs.KBFGS(model, lr=0.05, damping=1.0, update_freq=2)
    seen = []
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)

    def closure():
        seen.append(opt.in_extra_pass)
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
        return loss

    for _ in range(4):
        opt.step(closure)
    assert seen == [False, False, True, False, False, True]
    assert opt.in_extra_pass is False
    with pytest.raises(AttributeError):
        opt.in_extra_pass = True


@pytest.mark.parametrize("name", ["kbfgs", "kfac"])
def test_compiled_model_gives_the_eager_losses_with_few_recompilations(name):
    import torch._dynamo as dynamo

    dynamo.reset()
    dynamo.utils.counters.clear()  # reset() keeps the counters of earlier compilations
    losses = {}
    for compiled in (False, True):
        model = mlp()
        net = torch.compile(model, backend="eager") if compiled else model
        if name == "kfac":
            opt = kbfgs.KFAC(net, lr=0.05, damping=1.0, likelihood="gaussian", stat_freq=2,
                             inv_freq=2)
        else:
            opt = kbfgs.KBFGS(net, lr=0.05, damping=1.0, update_freq=2)
        g = torch.Generator().manual_seed(1)
        out = []
        for _ in range(12):
            x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)

            def closure(x=x, y=y, opt=opt, net=net):
                opt.zero_grad()
                loss = 0.5 * (net(x) - y).pow(2).sum(1).mean()
                loss.backward()
                return loss

            out.append(float(opt.step(closure)))
        losses[compiled] = out
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]),
                               rtol=1e-5, atol=1e-6)
    # the passes with hooks run eagerly, so the plain steps' graph is reused: 1 graph for K-BFGS
    # and for KFAC over these 12 steps (measured; Dynamo's limit is 8 per frame)
    graphs = dynamo.utils.counters["stats"].get("unique_graphs", 0)
    assert graphs <= 3, dict(dynamo.utils.counters["stats"])


def test_compiled_model_with_closure_free_kbfgs_plus_gives_the_eager_losses_quietly():
    """kbfgs-plus leaves its recordings open across the user's own loop, so a compiled model
    calls the hooks from compiled code: they run eagerly there (before, Dynamo traced them,
    warned that it cannot trace the hooks' timer and made 19 graphs for these 12 steps)."""
    import warnings

    import torch._dynamo as dynamo

    losses = {}
    for compiled in (False, True):
        dynamo.reset()
        dynamo.utils.counters.clear()  # reset() keeps the counters of earlier compilations
        torch.manual_seed(0)
        model = ConvBN()
        net = torch.compile(model, backend="eager") if compiled else model
        opt = KBFGSPlus(net, lr=3e-3, damping=1.0, update_freq=2, fisher_G=True)
        out = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for x, y in _convbn_data(12, dtype=torch.float32):
                opt.zero_grad()
                loss = F.cross_entropy(net(x), y)
                loss.backward()
                opt.step()
                out.append(loss.item())
        losses[compiled] = out
        if compiled:
            assert not [w for w in caught if "Dynamo" in str(w.message)], caught[0].message
            graphs = dynamo.utils.counters["stats"].get("unique_graphs", 0)
            assert graphs <= 8, dict(dynamo.utils.counters["stats"])
            assert opt.stats()["layers"]["c1"]["fisher_G"]
    torch.testing.assert_close(torch.tensor(losses[True]), torch.tensor(losses[False]),
                               rtol=1e-5, atol=1e-6)
