"""Issue 11, items 4-7 and 10 beyond the acceptance tests: bf16 curvature against a float64
reference fed the same low-precision activations, ``step`` called inside autocast, micro-batches
of unequal size / sum reduction / the 2020 variant, the rounding-level rule in float64, loss
scaling for KFAC and fp16 autocast, micro-batches with a compiled model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from cases import mlp
from kbfgs.optim.kbfgs import rounding_level_pair


def _bfgs(H, s, y):
    """(I - rho s y^T) H (I - rho y s^T) + rho s s^T, float64, by the textbook formula."""
    rho = 1.0 / (s @ y)
    eye = torch.eye(len(s), dtype=H.dtype)
    return (eye - rho * torch.outer(s, y)) @ H @ (eye - rho * torch.outer(y, s)) \
        + rho * torch.outer(s, s)


# ----------------------------------------------------------------------------------------------
# 6. bf16 autocast: float32 curvature equal to a float64 reference on the same activations
# ----------------------------------------------------------------------------------------------


def test_bf16_curvature_matches_float64_reference_on_the_same_activations():
    model = mlp()
    damping, beta, mu1 = 0.5, 0.9, 0.2
    opt = kbfgs.KBFGS(model, lr=0.05, damping=damping, beta=beta, mu1=mu1)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)
    names = ["0", "2", "4"]
    seen: list[dict[str, dict]] = []  # per closure call: layer -> {x, h, g}

    def closure():
        rec: dict[str, dict] = {}
        seen.append(rec)

        def make(name):
            def hook(module, inputs, output):  # runs after the optimizer's hooks
                e = rec[name] = {"x": inputs[0].detach().clone(), "h": output.detach().clone()}
                output.register_hook(lambda grad: e.__setitem__("g", grad.detach().clone()))
            return hook

        handles = [model[int(n)].register_forward_hook(make(n)) for n in names]
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        loss = 0.5 * (out.float() - y).pow(2).sum(1).mean()
        loss.backward()
        for h in handles:
            h.remove()
        return loss

    opt.step(closure)
    assert len(seen) == 2
    assert seen[0]["2"]["x"].dtype == torch.bfloat16  # the layers really saw bf16 activations
    state = opt.state_dict()["kronecker"]["layers"]
    lam = math.sqrt(damping)  # Linear layers: lambda_A = lambda_G = sqrt(damping)
    for name in names:
        r0, r1 = seen[0][name], seen[1][name]
        a = torch.cat([r0["x"].double(), torch.ones(16, 1, dtype=torch.float64)], dim=1)
        a_bar = a.mean(0)
        H_A0 = torch.eye(a.shape[1], dtype=torch.float64) / lam
        s_A = H_A0 @ a_bar
        y_A = a.T @ (a @ s_A) / a.shape[0] + lam * s_A
        H_A = _bfgs(H_A0, s_A, y_A)
        s_G = (1 - beta) * (r1["h"].double().mean(0) - r0["h"].double().mean(0))
        y_G = (1 - beta) * (r1["g"].double().sum(0) - r0["g"].double().sum(0))  # Dh = m g
        Hy = y_G / lam  # H_G = I / lambda_G
        sy, yHy = s_G @ y_G, y_G @ Hy
        theta = (1 - mu1) * yHy / (yHy - sy) if sy < mu1 * yHy else 1.0
        s_t = theta * s_G + (1 - theta) * Hy
        H_G = _bfgs(torch.eye(len(s_G), dtype=torch.float64) / lam, s_t, y_G + lam * s_t)
        st = state[name]
        for key, want in (("H_A", H_A), ("s_G", s_G), ("y_G", y_G), ("H_G", H_G)):
            got = st[key]
            assert got.dtype == torch.float32, key
            scale = float(want.abs().max())
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5 * scale,
                                       msg=f"{name}.{key}")


@pytest.mark.parametrize("name", ["kbfgs", "kfac"])
def test_step_called_inside_autocast_keeps_float32_curvature(name):
    """A framework may call ``step`` inside its autocast region: the closure's forward runs in
    bf16 either way, the optimizer's own math in float32; same result as autocast in the
    closure only."""
    results = []
    for outer in (False, True):
        model = mlp()
        if name == "kfac":
            opt = kbfgs.KFAC(model, lr=0.05, damping=1.0, likelihood="gaussian", inv_freq=1)
        else:
            opt = kbfgs.KBFGS(model, lr=0.05, damping=1.0)
        g = torch.Generator().manual_seed(1)
        x, y = torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)

        def closure(opt=opt, model=model, x=x, y=y):
            opt.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(x)
            loss = 0.5 * (out.float() - y).pow(2).sum(1).mean()
            loss.backward()
            return loss

        for _ in range(3):
            if outer:
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    opt.step(closure)
            else:
                opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
        for st in opt.state_dict()["kronecker"]["layers"].values():
            for v in st.values():
                if isinstance(v, torch.Tensor) and v.is_floating_point():
                    assert v.dtype == torch.float32
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------
# 4. Micro-batches: unequal sizes, sum reduction, the 2020 variant
# ----------------------------------------------------------------------------------------------


def _run_micro(make_opt, sizes, reduction, steps=4):
    model = mlp(dtype=torch.float64)
    opt = make_opt(model)
    g = torch.Generator().manual_seed(2)
    for _ in range(steps):
        x = torch.randn(8, 6, generator=g, dtype=torch.float64)
        y = torch.randn(8, 3, generator=g, dtype=torch.float64)

        def closure(x=x, y=y):
            opt.zero_grad()
            total = 0.0
            for xm, ym in zip(x.split(sizes), y.split(sizes)):
                per = 0.5 * (model(xm) - ym).pow(2).sum(1)
                # the batch loss: mean over all 8 samples (each micro-batch's share) or sum
                loss = per.sum() / 8 if reduction == "mean" else per.sum()
                loss.backward()
                total = total + loss.detach()
            return total

        opt.step(closure)
    assert opt.stats(condition=False)["curvature_updates"] > 0
    return [p.detach().clone() for p in model.parameters()]


MAKERS = {
    "kbfgs": lambda red: lambda m: kbfgs.KBFGS(m, lr=0.05, damping=0.3, loss_reduction=red),
    "kbfgs-ma": lambda red: lambda m: kbfgs.KBFGS(m, lr=0.05, damping=0.3, loss_reduction=red,
                                                  hessian_action="moving_average"),
    "kbfgs-exact": lambda red: lambda m: kbfgs.KBFGS(m, lr=0.05, damping=0.3, loss_reduction=red,
                                                     hessian_action="exact"),
    "kfac": lambda red: lambda m: kbfgs.KFAC(m, lr=0.05, damping=0.3, inv_freq=1,
                                             likelihood="gaussian", loss_reduction=red),
}


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("name", list(MAKERS))
def test_unequal_micro_batches_equal_one_batch(name, reduction):
    make = MAKERS[name](reduction)
    ref = _run_micro(make, [8], reduction)
    for sizes in ([3, 5], [1, 2, 5]):
        got = _run_micro(make, sizes, reduction)
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------------------------
# 5. The rounding-level rule
# ----------------------------------------------------------------------------------------------


def test_rounding_level_pair_threshold():
    scale = torch.tensor(2.0, dtype=torch.float32)
    eps = torch.finfo(torch.float32).eps
    assert bool(rounding_level_pair(torch.full((4,), eps), scale))  # ||y||_1 = 4 eps <= 32 eps
    assert not bool(rounding_level_pair(torch.full((4,), 10 * eps), scale))  # 40 eps
    assert bool(rounding_level_pair(torch.zeros(3), torch.tensor(0.0)))  # exact zero: skipped


class ConvBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)
        self.b1 = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 7 * 7, 3)

    def forward(self, x):
        return self.fc(F.relu(self.b1(self.c1(x))).flatten(1))


@pytest.mark.parametrize("history", [None, 5])
def test_conv_feeding_batchnorm_keeps_H_G_at_identity_over_lambda_in_float64(history):
    torch.manual_seed(0)
    model = ConvBN().double()
    opt = kbfgs.KBFGS(model, lr=0.05, damping=0.3, history=history)
    g = torch.Generator().manual_seed(3)
    for _ in range(6):
        x = torch.randn(8, 2, 7, 7, generator=g, dtype=torch.float64)
        y = torch.randint(0, 3, (8,), generator=g)

        def closure(x=x, y=y):
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
    st = opt.layer_state
    layers = opt.stats(condition=False)["layers"]
    assert layers["c1"]["skipped_G_rounding"] == 6 and layers["c1"]["skipped_G"] == 0
    assert layers["fc"]["skipped_G_rounding"] == 0
    lam_G = opt._lambdas(opt.layers[0], st["c1"].locations)[1]
    if history is None:
        # what exact arithmetic gives: the pair (s, lambda_G s) leaves H_G = I / lambda_G
        assert torch.equal(st["c1"].H_G, torch.eye(3, dtype=torch.float64) / lam_G)
        assert not torch.allclose(st["fc"].H_G, torch.eye(3, dtype=torch.float64) / lam_G)
    else:
        assert st["c1"].S.shape[1] == 0 and st["fc"].S.shape[1] == 5  # history 5
    sd = opt.state_dict()["kronecker"]["layers"]["c1"]
    assert int(sd["skipped_G_rounding"]) == 6 and float(sd["Dh_scale"]) > 0


# ----------------------------------------------------------------------------------------------
# 7. Loss scaling: KFAC, fp16 autocast
# ----------------------------------------------------------------------------------------------


def _scaled_run(make_opt, scaler, steps=3, autocast_dtype=None, model_dtype=torch.float32):
    model = mlp(dtype=model_dtype)
    opt = make_opt(model, scaler)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(16, 6, generator=g).to(model_dtype)
        y = torch.randn(16, 3, generator=g).to(model_dtype)

        def closure(x=x, y=y):
            opt.zero_grad()
            if autocast_dtype is None:
                out = model(x)
            else:
                with torch.autocast("cpu", dtype=autocast_dtype):
                    out = model(x)
            loss = 0.5 * (out.float() - y).pow(2).sum(1).mean()
            (loss if scaler is None else scaler.scale(loss)).backward()
            return loss

        opt.step(closure)
    return model, opt


def test_kfac_grad_scaler_equals_unscaled_and_skips_overflow():
    def make(m, s):
        return kbfgs.KFAC(m, lr=0.05, damping=1.0, likelihood="gaussian", inv_freq=1,
                          grad_scaler=s)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    m_s, opt = _scaled_run(make, scaler)
    m_u, _ = _scaled_run(make, None)
    for a, b in zip(m_u.parameters(), m_s.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    # overflow: nothing changes, update() lowered the scale
    sd = copy.deepcopy(opt.state_dict())
    before = [p.detach().clone() for p in m_s.parameters()]
    big = float(torch.finfo(torch.float32).max)
    scaler.update(new_scale=big)
    x, y = torch.randn(16, 6), torch.randn(16, 3) + 100.0

    def closure():
        opt.zero_grad()
        loss = 0.5 * (m_s(x) - y).pow(2).sum(1).mean()
        scaler.scale(loss).backward()
        return loss

    opt.step(closure)
    assert scaler.get_scale() < big
    assert all(torch.equal(a, b) for a, b in zip(before, m_s.parameters()))
    after = opt.state_dict()["kronecker"]
    assert after["steps"] == sd["kronecker"]["steps"] and after["skipped_steps"] == 1
    for name, st in sd["kronecker"]["layers"].items():
        assert torch.equal(after["layers"][name]["Omega"], st["Omega"])


def test_grad_scaler_is_checked():
    with pytest.raises(TypeError, match=r"grad_scaler must be a torch.amp.GradScaler"):
        kbfgs.KBFGS(mlp(), lr=0.05, damping=1.0, grad_scaler=object())


def _cpu_fp16_autocast_works() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            out = nn.Linear(2, 2)(torch.randn(3, 2))
        out.float().sum().backward()
        return out.dtype == torch.float16
    except (RuntimeError, AssertionError):
        return False


@pytest.mark.skipif(not _cpu_fp16_autocast_works(), reason="no fp16 autocast on this CPU build")
@pytest.mark.parametrize("name", ["kbfgs", "kfac"])
def test_fp16_autocast_with_grad_scaler_trains(name):
    def make(m, s):
        if name == "kfac":
            return kbfgs.KFAC(m, lr=0.05, damping=1.0, likelihood="gaussian", grad_scaler=s)
        return kbfgs.KBFGS(m, lr=0.05, damping=1.0, grad_scaler=s)

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _, opt = _scaled_run(make, scaler, steps=8, autocast_dtype=torch.float16)
    stats = opt.stats(condition=False)
    assert stats["steps"] == 8 and stats["curvature_updates"] == 8
    for st in opt.state_dict()["kronecker"]["layers"].values():
        for v in st.values():
            if isinstance(v, torch.Tensor) and v.is_floating_point():
                assert v.dtype == torch.float32 and bool(torch.isfinite(v).all())


# ----------------------------------------------------------------------------------------------
# 10. torch.compile with micro-batches
# ----------------------------------------------------------------------------------------------


def test_compiled_model_with_micro_batches_gives_the_eager_parameters():
    results = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model = mlp(dtype=torch.float64)
        net = torch.compile(model, backend="eager") if compiled else model
        opt = kbfgs.KBFGS(net, lr=0.05, damping=0.3, update_freq=2)
        assert [ly.name for ly in opt.layers] == ["0", "2", "4"]  # names of the inner model
        g = torch.Generator().manual_seed(2)
        for _ in range(5):
            x = torch.randn(8, 6, generator=g, dtype=torch.float64)
            y = torch.randn(8, 3, generator=g, dtype=torch.float64)

            def closure(x=x, y=y, opt=opt, net=net):
                opt.zero_grad()
                for xm, ym in zip(x.chunk(2), y.chunk(2)):
                    (0.5 * (net(xm) - ym).pow(2).sum(1).mean() / 2).backward()
                return torch.zeros(())

            opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)
