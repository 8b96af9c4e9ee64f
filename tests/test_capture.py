"""kbfgs.capture: the named recordings against hand-derived quantities, and the bound helpers."""

from __future__ import annotations

import subprocess
import sys

import torch
from torch import nn

from kbfgs.capture import Capture, KroneckerLayer
from kbfgs.layers import LinearHelper

DT = torch.float64


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()


def _capture(model: nn.Sequential, reduction: str = "mean") -> Capture:
    layers = [KroneckerLayer(str(i), LinearHelper(model[i])) for i in (0, 2)]
    return Capture(layers, lambda m: DT, reduction, root=model)


def _with_one(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)


def test_helper_keeps_its_bias_flag_when_requires_grad_is_switched_off():
    """The optimizers switch requires_grad off in their extra pass; the layout must not move."""
    lin = nn.Linear(3, 2).double()
    helper = LinearHelper(lin)
    lin.bias.requires_grad_(False)
    x = torch.randn(5, 3, dtype=DT)
    assert helper.has_bias and helper.dims() == (2, 4)
    torch.testing.assert_close(helper.A(x), _with_one(x).T @ _with_one(x) / 5, rtol=1e-12,
                               atol=0)
    assert not LinearHelper(lin).has_bias  # a helper made now sees no trainable bias


def test_kfac_factors_are_omega_and_gamma_with_the_bias_fixed_at_discovery():
    """A = E_n[a a^T], G = m sum_n g g^T (batch-mean loss) with g = dL/dh, by autograd."""
    model = _mlp()
    cap = _capture(model)
    for p in model.parameters():  # as in the optimizers' extra pass
        p.requires_grad_(False)
    x = torch.randn(6, 3, dtype=DT)
    with cap.kfac_factors() as recs, torch.enable_grad():
        out = model(x)
        loss = out.square().sum(1).mean()
        cap.backward(loss, recs)
    assert all(p.grad is None for p in model.parameters())
    assert all(r.dummy is None for r in recs.values())  # dropped at the end of the pass
    # reference: the same forward with explicit leaves on the outputs
    h0 = model[0](x).requires_grad_(True)
    h2 = model[2](torch.tanh(h0))
    g0, g2 = torch.autograd.grad(h2.square().sum(1).mean(), [h0, h2])
    a2 = _with_one(torch.tanh(model[0](x)))
    torch.testing.assert_close(recs["0"].A, _with_one(x).T @ _with_one(x) / 6, rtol=1e-12,
                               atol=1e-14)
    torch.testing.assert_close(recs["2"].A, a2.T @ a2 / 6, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(recs["0"].G, 6 * g0.T @ g0, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(recs["2"].G, 6 * g2.T @ g2, rtol=1e-12, atol=1e-14)


def test_kbfgs_pre_records_the_vectors_of_algorithm_2():
    """a_bar, s_A = s_A_fn(layer, rec), A s_A = E_n[(a^T s) a], h_bar, Dh_bar = m E_n[dL/dh]."""
    model = _mlp()
    cap = _capture(model)
    x = torch.randn(6, 3, dtype=DT)
    s_by_layer = {"0": torch.randn(4, dtype=DT), "2": torch.randn(5, dtype=DT)}
    with cap.kbfgs_pre(lambda layer, rec: s_by_layer[layer.name], need_A=True) as recs:
        out = model(x)
        out.square().sum(1).mean().backward()
    a0 = _with_one(x)
    r = recs["0"]
    assert r.calls == 1 and r.batch == 6 and r.locations == 1
    torch.testing.assert_close(r.a_bar, a0.mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.A_s, a0.T @ (a0 @ s_by_layer["0"]) / 6, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.A, a0.T @ a0 / 6, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(r.h_bar, model[0](x).mean(0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(recs["2"].Dh_bar, (2 * out).mean(0), rtol=1e-12, atol=1e-14)


def test_kbfgs_post_reaches_the_outputs_without_parameter_gradients():
    model = _mlp()
    cap = _capture(model)
    for p in model.parameters():
        p.requires_grad_(False)
    x = torch.randn(6, 3, dtype=DT)
    with cap.kbfgs_post() as recs:
        out = model(x)
        out.square().sum(1).mean().backward()
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(recs["2"].Dh_bar, (2 * out.detach()).mean(0), rtol=1e-12,
                               atol=1e-14)
    assert recs["2"].a_bar is None and recs["2"].A_s is None


def test_hooks_live_for_one_recording_and_reuse_is_counted():
    model = _mlp()
    cap = _capture(model)
    x = torch.randn(2, 3, dtype=DT)
    with cap.probe() as recs:
        model[0](x)
        model(x)
    assert recs["0"].calls == 2 and recs["2"].calls == 1
    assert not model[0]._forward_hooks and not model._forward_hooks
    with cap.model_call() as call:
        model(x, )
    assert call["args"][0] is x and call["output"] is None and not model._forward_pre_hooks


def test_distributed_is_a_leaf():
    """kbfgs.distributed imports only torch and the standard library: its file loads as a
    standalone module, with no ``kbfgs`` package in the interpreter."""
    import kbfgs.distributed as dist_mod

    code = ("import importlib.util, sys; "
            f"spec = importlib.util.spec_from_file_location('leaf', {dist_mod.__file__!r}); "
            "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
            "assert not [k for k in sys.modules if k.startswith('kbfgs')]; "
            "print(m.rank(), m.world_size())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "1"]
