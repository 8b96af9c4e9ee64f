"""Tests of ``kbfgs.layers`` against explicit float64 references built in this file.

The references form the patches a_t(n) with ``F.unfold`` (Conv2d) or a reshape (Linear), add
the homogeneous 1 for a trainable bias, and build every quantity of Section 2 / eq. (15) as
explicit sums; gradients come from autograd.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kbfgs.layers import (
    Conv2dHelper,
    LinearHelper,
    damping_split,
    helper_for,
    unsupported_reason,
)

DT = torch.float64
IN_HW = 11  # input height/width: every configuration of the grid has a non-empty output


# ----------------------------------------------------------------------------------------------
# Grids and references
# ----------------------------------------------------------------------------------------------


def _out_len(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv_grid():
    cases = []
    for stride, padding, dilation, kernel in itertools.product([1, 2], [0, 1], [1, 2], [1, 3, 5]):
        if _out_len(IN_HW, kernel, stride, padding, dilation) < 1:
            continue
        cases.append((kernel, stride, padding, dilation))
    # a few non-square geometries
    cases.append(((3, 1), (2, 1), (1, 0), (1, 2)))
    cases.append(((1, 5), (1, 3), (0, 2), (2, 1)))
    return cases


CONV_GRID = _conv_grid()
CONV_IDS = [f"k{k}-s{s}-p{p}-d{d}" for k, s, p, d in CONV_GRID]


def make_conv(geom, bias, c_in=2, c_out=3, seed=0):
    kernel, stride, padding, dilation = geom
    torch.manual_seed(seed)
    return nn.Conv2d(c_in, c_out, kernel, stride=stride, padding=padding, dilation=dilation,
                     bias=bias).double()


def conv_patches(module: nn.Conv2d, x: torch.Tensor, bias: bool) -> torch.Tensor:
    """(m, T, K [+1]) patches a_t(n) formed with F.unfold."""
    cols = F.unfold(x, module.kernel_size, dilation=module.dilation, padding=module.padding,
                    stride=module.stride).transpose(1, 2)
    if bias:
        cols = torch.cat([cols, torch.ones(*cols.shape[:2], 1, dtype=cols.dtype)], dim=2)
    return cols


def linear_patches(x: torch.Tensor, bias: bool) -> torch.Tensor:
    """(m, T, d [+1]) with every leading position of x a location."""
    a = x.reshape(x.shape[0], -1, x.shape[-1])
    if bias:
        a = torch.cat([a, torch.ones(*a.shape[:2], 1, dtype=a.dtype)], dim=2)
    return a


def explicit_A(a: torch.Tensor) -> torch.Tensor:
    """E_n[sum_t a_t(n) a_t(n)^T] by an explicit double loop over n and t."""
    m, T, K = a.shape
    A = torch.zeros(K, K, dtype=a.dtype)
    for n in range(m):
        for t in range(T):
            A += torch.outer(a[n, t], a[n, t])
    return A / m


def scalar_loss(h: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """A random nonlinear scalar function of the layer output."""
    g = torch.Generator().manual_seed(seed)
    R = torch.randn(h.shape, generator=g, dtype=h.dtype)
    return (R * h).sum() + 0.25 * (h**2 * R.abs()).sum() + torch.sin(h).sum()


def w_grad(module) -> torch.Tensor:
    gw = module.weight.grad.reshape(module.weight.shape[0], -1)
    if module.bias is not None and module.bias.requires_grad:
        gw = torch.cat([gw, module.bias.grad[:, None]], dim=1)
    return gw


# ----------------------------------------------------------------------------------------------
# Theorem 2.1 (i): DW = sum_n sum_t Dh_t(n) a_t(n)^T
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("geom", CONV_GRID, ids=CONV_IDS)
def test_theorem_2_1_conv_gradient(geom, bias):
    conv = make_conv(geom, bias)
    x = torch.randn(3, 2, IN_HW, IN_HW, dtype=DT)
    h = conv(x)
    assert h.numel() > 0
    h.retain_grad()
    scalar_loss(h).backward()
    g = h.grad.reshape(h.shape[0], h.shape[1], -1)  # (m, out, T)
    a = conv_patches(conv, x, bias)  # (m, T, K)
    ref = torch.einsum("not,ntk->ok", g, a)
    got = w_grad(conv)
    assert torch.allclose(got, ref, rtol=1e-10, atol=1e-10)
    # dims and split_matrix agree with the W = [weight.reshape(out, -1), bias] layout
    assert Conv2dHelper(conv).dims() == tuple(ref.shape)
    views = Conv2dHelper(conv).split_matrix(ref)
    assert len(views) == (2 if bias else 1)
    assert torch.allclose(views[0], conv.weight.grad, rtol=1e-10, atol=1e-10)
    if bias:
        assert torch.allclose(views[1], conv.bias.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5), (2, 3, 2, 5)])
def test_theorem_2_1_linear_gradient(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(shape[-1], 3, bias=bias).double()
    x = torch.randn(*shape, dtype=DT)
    h = lin(x)
    h.retain_grad()
    scalar_loss(h).backward()
    g = h.grad.reshape(shape[0], -1, 3)
    a = linear_patches(x, bias)
    ref = torch.einsum("nto,ntk->ok", g, a)
    assert torch.allclose(w_grad(lin), ref, rtol=1e-10, atol=1e-10)
    assert LinearHelper(lin).dims() == tuple(ref.shape)


# ----------------------------------------------------------------------------------------------
# a_bar, A s (eq. 15), A, h_bar
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("geom", CONV_GRID, ids=CONV_IDS)
def test_conv_curvature_vectors(geom, bias):
    conv = make_conv(geom, bias)
    m = 3
    x = torch.randn(m, 2, IN_HW, IN_HW, dtype=DT)
    a = conv_patches(conv, x, bias)
    K = a.shape[2]
    A_ref = explicit_A(a)
    s = torch.randn(K, dtype=DT)
    # A s = (mean_n sum_t a_t a_t^T) s
    got = Conv2dHelper(conv).A_s(x, s)
    assert got.shape == (K,)
    assert torch.allclose(got, A_ref @ s, rtol=1e-10, atol=1e-10)
    # the explicit A
    assert torch.allclose(Conv2dHelper(conv).A(x), A_ref, rtol=1e-10, atol=1e-10)
    # a_bar = mean over n and t of a_t
    a_bar = Conv2dHelper(conv).a_bar(x)
    assert torch.allclose(a_bar, a.mean(dim=(0, 1)), rtol=1e-10, atol=1e-12)
    if bias:
        assert float(a_bar[-1]) == pytest.approx(1.0, abs=1e-14)
    # h_bar and locations
    with torch.no_grad():
        h = conv(x)
    assert torch.allclose(Conv2dHelper.h_bar(h), h.mean(dim=(0, 2, 3)), rtol=1e-12, atol=1e-14)
    T = a.shape[1]
    assert Conv2dHelper(conv).locations(h) == T == h.shape[2] * h.shape[3]


def test_conv_frozen_bias_has_no_homogeneous_one():
    conv = make_conv((3, 1, 1, 1), bias=True)
    conv.bias.requires_grad_(False)
    x = torch.randn(2, 2, IN_HW, IN_HW, dtype=DT)
    a = conv_patches(conv, x, bias=False)
    K = a.shape[2]
    assert Conv2dHelper(conv).dims() == (3, K)
    s = torch.randn(K, dtype=DT)
    assert torch.allclose(Conv2dHelper(conv).A_s(x, s), explicit_A(a) @ s, rtol=1e-10, atol=1e-10)
    assert torch.allclose(Conv2dHelper(conv).a_bar(x), a.mean(dim=(0, 1)), rtol=1e-10)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(4, 5), (4, 3, 5), (2, 3, 2, 5)])
def test_linear_curvature_vectors(shape, bias):
    torch.manual_seed(0)
    lin = nn.Linear(shape[-1], 3, bias=bias).double()
    x = torch.randn(*shape, dtype=DT)
    a = linear_patches(x, bias)
    K = a.shape[2]
    A_ref = explicit_A(a)
    s = torch.randn(K, dtype=DT)
    got = LinearHelper(lin).A_s(x, s)
    assert got.shape == (K,)
    assert torch.allclose(got, A_ref @ s, rtol=1e-10, atol=1e-12)
    assert torch.allclose(LinearHelper(lin).A(x), A_ref, rtol=1e-10, atol=1e-12)
    assert torch.allclose(LinearHelper(lin).a_bar(x), a.mean(dim=(0, 1)), rtol=1e-12, atol=1e-14)
    with torch.no_grad():
        h = lin(x)
    h_ref = h.reshape(shape[0], -1, 3).mean(dim=(0, 1))
    assert torch.allclose(LinearHelper.h_bar(h), h_ref, rtol=1e-12, atol=1e-14)
    positions = math.prod(shape[1:-1])
    assert LinearHelper(lin).locations(h) == positions == a.shape[1]
    assert LinearHelper(lin).dims() == (3, K)


# ----------------------------------------------------------------------------------------------
# Dh_bar and the batch-size scaling (Dh(n) = m * d(mean loss)/dh(n))
# ----------------------------------------------------------------------------------------------


def _per_sample_loss(h_n: torch.Tensor, n: int) -> torch.Tensor:
    """f(n): a fixed nonlinear function of sample n's output (depends on n only)."""
    return scalar_loss(h_n, seed=100 + n)


def _dh_reference(module, x: torch.Tensor, spatial_dims) -> torch.Tensor:
    """mean_n mean_t Dh_t(n), with Dh(n) = d f(n) / d h(n) computed sample by sample."""
    outs = []
    for n in range(x.shape[0]):
        h_n = module(x[n:n + 1]).detach().requires_grad_(True)
        (g,) = torch.autograd.grad(_per_sample_loss(h_n, n), h_n)
        outs.append(g.mean(dim=spatial_dims).reshape(-1))
    return torch.stack(outs).mean(0)


def _batch_grad(module, x: torch.Tensor, reduction: str) -> torch.Tensor:
    h = module(x).detach().requires_grad_(True)
    losses = torch.stack([_per_sample_loss(h[n:n + 1], n) for n in range(x.shape[0])])
    loss = losses.mean() if reduction == "mean" else losses.sum()
    (g,) = torch.autograd.grad(loss, h)
    return g


def _modules_and_inputs():
    torch.manual_seed(3)
    conv = make_conv((3, 2, 1, 1), bias=True, seed=3)
    xc = torch.randn(6, 2, IN_HW, IN_HW, dtype=DT)
    lin = nn.Linear(5, 4).double()
    xl3 = torch.randn(6, 3, 5, dtype=DT)
    xl2 = torch.randn(6, 5, dtype=DT)
    return [
        ("conv", Conv2dHelper, conv, xc, (0, 2, 3)),
        ("linear3d", LinearHelper, lin, xl3, (0, 1)),
        ("linear2d", LinearHelper, lin, xl2, (0,)),
    ]


@pytest.mark.parametrize("which", ["conv", "linear3d", "linear2d"])
def test_dh_bar_batch_size_scaling(which):
    _, helper, module, x_all, dims = next(c for c in _modules_and_inputs() if c[0] == which)
    results = {}
    for m in (2, 6):
        x = x_all[:m]
        ref = _dh_reference(module, x, dims)
        g_mean = _batch_grad(module, x, "mean")
        g_sum = _batch_grad(module, x, "sum")
        got_mean = helper.Dh_bar(g_mean, m, "mean")
        got_sum = helper.Dh_bar(g_sum, m, "sum")
        assert torch.allclose(got_mean, ref, rtol=1e-10, atol=1e-12), m
        assert torch.allclose(got_sum, ref, rtol=1e-10, atol=1e-12), m
        # explicitly: "mean" is mean_n mean_t (m * g) and "sum" is mean_n mean_t g
        assert torch.allclose(got_mean, (m * g_mean).mean(dim=dims).reshape(-1), rtol=1e-12)
        assert torch.allclose(got_sum, g_sum.mean(dim=dims).reshape(-1), rtol=1e-12)
        results[m] = got_mean
    # the two batch sizes average different samples: the results must differ
    assert not torch.allclose(results[2], results[6])


@pytest.mark.parametrize("which", ["conv", "linear3d", "linear2d"])
def test_dh_bar_independent_of_batch_size_for_repeated_sample(which):
    """A batch of m copies of one sample: the per-sample Dh_bar does not depend on m."""
    _, helper, module, x_all, dims = next(c for c in _modules_and_inputs() if c[0] == which)
    vals = []
    for m in (1, 3, 7):
        x = x_all[:1].expand(m, *x_all.shape[1:]).contiguous()
        h = module(x).detach().requires_grad_(True)
        f = torch.stack([_per_sample_loss(h[n:n + 1], 0) for n in range(m)])
        (g_mean,) = torch.autograd.grad(f.mean(), h, retain_graph=True)
        (g_sum,) = torch.autograd.grad(f.sum(), h)
        vm = helper.Dh_bar(g_mean, m, "mean")
        vs = helper.Dh_bar(g_sum, m, "sum")
        assert torch.allclose(vm, vs, rtol=1e-12, atol=1e-14)
        vals.append(vm)
    ref = _dh_reference(module, x_all[:1], dims)
    for v in vals:
        assert torch.allclose(v, ref, rtol=1e-10, atol=1e-12)


def test_dh_bar_default_reduction_is_mean():
    g = torch.randn(4, 3, 5, 5, dtype=DT)
    assert torch.allclose(Conv2dHelper.Dh_bar(g, 4), Conv2dHelper.Dh_bar(g, 4, "mean"))
    gl = torch.randn(4, 3, dtype=DT)
    assert torch.allclose(LinearHelper.Dh_bar(gl, 4), 4 * gl.mean(0))


# ----------------------------------------------------------------------------------------------
# Damping split
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lam", [0.3, 1.0, 10.0])
@pytest.mark.parametrize("T", [1, 4, 49, 1024])
def test_damping_split(lam, T):
    la, lg = damping_split(lam, T, True, "spatial")
    assert la == pytest.approx(math.sqrt(T) * math.sqrt(lam), rel=1e-14)
    assert lg == pytest.approx(math.sqrt(lam) / math.sqrt(T), rel=1e-14)
    assert la * lg == pytest.approx(lam, rel=1e-13)
    for is_conv, split in [(False, "spatial"), (False, "sqrt"), (True, "sqrt")]:
        la, lg = damping_split(lam, T, is_conv, split)
        assert la == pytest.approx(math.sqrt(lam), rel=1e-14)
        assert lg == pytest.approx(math.sqrt(lam), rel=1e-14)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_helper_for_and_unsupported_reason():
    lin = nn.Linear(3, 2)
    conv = nn.Conv2d(2, 4, 3)
    assert helper_for(lin) is LinearHelper
    assert helper_for(conv) is Conv2dHelper
    assert unsupported_reason(lin) is None
    assert unsupported_reason(conv) is None
    assert unsupported_reason(nn.Conv2d(2, 4, 3, stride=2, padding=1, dilation=2)) is None

    class MyLinear(nn.Linear):
        pass

    assert helper_for(MyLinear(3, 2)) is LinearHelper

    for bn in (nn.BatchNorm2d(4), nn.BatchNorm1d(4), nn.LayerNorm(4), nn.Embedding(5, 3)):
        assert helper_for(bn) is None

    grouped = nn.Conv2d(4, 4, 3, groups=2)
    reason = unsupported_reason(grouped)
    assert isinstance(reason, str) and "groups" in reason and "2" in reason

    reflect = nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect")
    reason = unsupported_reason(reflect)
    assert isinstance(reason, str) and "reflect" in reason

    circular = nn.Conv2d(2, 4, 3, padding=1, padding_mode="circular")
    assert isinstance(unsupported_reason(circular), str)


def test_conv_A_s_in_sample_chunks_equals_one_chunk(monkeypatch):
    """The conv A s processes samples in chunks bounded by ``_TAP_CHUNK`` elements: one, two
    or all samples per chunk give the unfold reference to rounding."""
    import kbfgs.layers as L

    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, stride=2, padding=1, bias=True).double()
    x = torch.randn(5, 3, 7, 6, dtype=torch.float64)
    s = torch.randn(3 * 9 + 1, dtype=torch.float64)
    # independent reference: explicit patches (with the homogeneous 1), E_n sum_t (a_t^T s) a_t
    cols = F.unfold(x, 3, stride=2, padding=1).transpose(1, 2)  # (n, |T|, 27)
    a = torch.cat([cols, cols.new_ones(*cols.shape[:2], 1)], dim=2)
    ref = torch.einsum("ntk,ntj->j", a @ s[:, None], a) / x.shape[0]
    for bound in (1, 2 * 9 * 9 * 8, 1 << 23):  # 1 sample, 2 samples, all 5 per chunk
        monkeypatch.setattr(L, "_TAP_CHUNK", bound)
        torch.testing.assert_close(L.Conv2dHelper(conv).A_s(x, s), ref, rtol=1e-12, atol=1e-12)
