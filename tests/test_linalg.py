"""Tests of ``kbfgs.linalg`` against references written out independently in this file.

Everything numeric is float64 (except the explicit float32 tiny-pair test). The references are
explicit dense formulas: the product form of the BFGS update (11), Algorithm 1 / Algorithm 4 of
the paper, the double damping of spec section 4 and sequential dense BFGS updates for L-BFGS.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kbfgs.linalg import (
    bfgs_update,
    double_damping,
    dpdlm,
    dpidlm,
    lbfgs_apply,
    lbfgs_compact_factors,
    lbfgs_dense,
    pair_is_valid,
)

DT = torch.float64


# ----------------------------------------------------------------------------------------------
# Independent helpers
# ----------------------------------------------------------------------------------------------


def random_spd(n: int, gen: torch.Generator, lo: float = 0.5, hi: float = 2.0) -> torch.Tensor:
    """Random symmetric positive definite matrix with eigenvalues in [lo, hi]."""
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=DT))
    eig = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=DT)
    H = q @ torch.diag(eig) @ q.T
    return 0.5 * (H + H.T)


def product_form_bfgs(H: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(I - rho s y^T) H (I - rho y s^T) + rho s s^T, written with explicit n x n products."""
    n = H.shape[0]
    rho = 1.0 / torch.dot(s, y)
    eye = torch.eye(n, dtype=H.dtype)
    left = eye - rho * torch.outer(s, y)
    right = eye - rho * torch.outer(y, s)
    return left @ H @ right + rho * torch.outer(s, s)


def positive_pair(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    s = torch.randn(n, generator=gen, dtype=DT)
    B = random_spd(n, gen, 0.3, 3.0)
    y = B @ s + 0.01 * torch.randn(n, generator=gen, dtype=DT)
    assert torch.dot(s, y) > 0
    return s, y


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


# ----------------------------------------------------------------------------------------------
# BFGS update (11)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5, 9])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bfgs_secant_symmetry_pd(n, seed):
    gen = torch.Generator().manual_seed(seed)
    H = random_spd(n, gen)
    s, y = positive_pair(n, gen)
    H_new, applied = bfgs_update(H, s, y)
    assert applied.dtype == torch.bool and applied.dim() == 0 and bool(applied)
    # secant equation H+ y = s
    assert rel_err(H_new @ y, s) <= 1e-10
    # symmetry
    assert (H_new - H_new.T).abs().max() <= 1e-12 * H_new.abs().max()
    # positive definiteness kept
    assert torch.linalg.eigvalsh(0.5 * (H_new + H_new.T)).min() > 0
    # equals the product form of (11)
    assert rel_err(H_new, product_form_bfgs(H, s, y)) <= 1e-12
    # not in place by default
    assert H_new.data_ptr() != H.data_ptr()


def test_bfgs_random_sign_pairs_only_positive_applied():
    gen = torch.Generator().manual_seed(11)
    n = 6
    for _ in range(30):
        H = random_spd(n, gen)
        s = torch.randn(n, generator=gen, dtype=DT)
        y = torch.randn(n, generator=gen, dtype=DT)
        H_new, applied = bfgs_update(H, s, y)
        if torch.dot(s, y) > 0:
            assert bool(applied)
            assert rel_err(H_new, product_form_bfgs(H, s, y)) <= 1e-10
            assert rel_err(H_new @ y, s) <= 1e-9
        else:
            assert not bool(applied)
            assert torch.equal(H_new, H)


@pytest.mark.parametrize(
    "case", ["negative", "zero_sy", "zero_s", "zero_both", "nan_y", "inf_s", "nan_s", "inf_y"]
)
def test_bfgs_invalid_pair_not_applied(case):
    gen = torch.Generator().manual_seed(3)
    n = 5
    H = random_spd(n, gen)
    H_before = H.clone()
    s, y = positive_pair(n, gen)
    if case == "negative":
        y = -s + 0.1 * torch.randn(n, generator=gen, dtype=DT)
        assert torch.dot(s, y) < 0
    elif case == "zero_sy":
        s = torch.tensor([1.0, 0.0, 0.0, 0.0, 0.0], dtype=DT)
        y = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=DT)
    elif case == "zero_s":
        s = torch.zeros(n, dtype=DT)
    elif case == "zero_both":
        s = torch.zeros(n, dtype=DT)
        y = torch.zeros(n, dtype=DT)
    elif case == "nan_y":
        y = y.clone()
        y[2] = float("nan")
    elif case == "inf_s":
        s = s.clone()
        s[1] = float("inf")
    elif case == "nan_s":
        s = s.clone()
        s[0] = float("nan")
    elif case == "inf_y":
        y = y.clone()
        y[4] = float("-inf")
    H_new, applied = bfgs_update(H, s, y)
    assert applied.dtype == torch.bool and not bool(applied)
    assert torch.equal(H_new, H_before)
    assert torch.isfinite(H_new).all()
    # in place: H itself is left unchanged as well
    H2 = H_before.clone()
    out, applied2 = bfgs_update(H2, s, y, inplace=True)
    assert not bool(applied2)
    assert torch.equal(H2, H_before)
    assert torch.equal(out, H_before)
    assert not bool(pair_is_valid(s, y))


def test_bfgs_inplace_modifies_H():
    gen = torch.Generator().manual_seed(5)
    n = 6
    H = random_spd(n, gen)
    ref = product_form_bfgs(H, *positive_pair(n, torch.Generator().manual_seed(7)))
    s, y = positive_pair(n, torch.Generator().manual_seed(7))
    ptr = H.data_ptr()
    out, applied = bfgs_update(H, s, y, inplace=True)
    assert bool(applied)
    assert out.data_ptr() == ptr
    assert rel_err(H, ref) <= 1e-12
    # the non-inplace variant leaves its input unchanged
    H0 = random_spd(n, gen)
    H0c = H0.clone()
    bfgs_update(H0, s, y)
    assert torch.equal(H0, H0c)


@pytest.mark.parametrize("scale", [1e-12, 1e-15, 1e-9])
def test_bfgs_tiny_pairs_float32(scale):
    gen = torch.Generator().manual_seed(8)
    n = 16
    H64 = random_spd(n, gen)
    s64, y64 = positive_pair(n, gen)
    H = H64.float()
    s = (s64 * scale).float()
    y = (y64 * scale).float()
    H_new, applied = bfgs_update(H, s, y)
    assert bool(applied)
    assert torch.isfinite(H_new).all()
    # against a float64 product-form reference on the same float32 inputs
    ref = product_form_bfgs(H.double(), s.double(), y.double())
    assert rel_err(H_new.double(), ref) <= 1e-4
    # also when only s is tiny (large curvature ratio)
    H_new2, applied2 = bfgs_update(H, s, y64.float())
    assert torch.isfinite(H_new2).all()
    if bool(applied2):
        ref2 = product_form_bfgs(H.double(), s.double(), y64)
        assert rel_err(H_new2.double(), ref2) <= 1e-3


# ----------------------------------------------------------------------------------------------
# D_P D_LM (Algorithm 1) and D_P(I) D_LM (Algorithm 4): property-based
# ----------------------------------------------------------------------------------------------


@st.composite
def damping_cases(draw):
    n = draw(st.integers(1, 8))
    seed = draw(st.integers(0, 2**31 - 1))
    kind = draw(st.sampled_from(["random", "negative", "orthogonal", "positive", "zero_y",
                                 "zero_s", "tiny_positive"]))
    s_exp = draw(st.integers(-6, 6))
    y_exp = draw(st.integers(-6, 6))
    h_exp = draw(st.integers(-3, 3))
    mu1 = draw(st.floats(0.01, 0.99))
    mu2 = draw(st.one_of(st.floats(1e-3, 1.0), st.floats(1.0, 50.0)))
    gen = torch.Generator().manual_seed(seed)
    s = torch.randn(n, generator=gen, dtype=DT) * 10.0**s_exp
    noise = torch.randn(n, generator=gen, dtype=DT)
    if kind == "random":
        y = noise * 10.0**y_exp
    elif kind == "negative":
        y = (-s / s.norm() + 0.1 * noise) * 10.0**y_exp
    elif kind == "orthogonal":
        y = noise - torch.dot(noise, s) / torch.dot(s, s) * s
        y = y * 10.0**y_exp
    elif kind == "positive":
        y = random_spd(n, gen) @ s * 10.0 ** (y_exp - s_exp)
    elif kind == "zero_y":
        y = torch.zeros(n, dtype=DT)
    elif kind == "zero_s":
        s = torch.zeros(n, dtype=DT)
        y = noise * 10.0**y_exp
    else:  # tiny positive curvature, far below mu1 y^T H y
        y = (1e-8 * s / s.norm() + noise) * 10.0**y_exp
        y = y - (torch.dot(y, s) / torch.dot(s, s)) * s + 1e-8 * 10.0**y_exp * s / s.norm()
    H = random_spd(n, gen, 0.2, 5.0) * 10.0**h_exp
    return s, y, H, mu1, mu2


def _tol(*terms: torch.Tensor) -> float:
    return 1e-9 * float(sum(t.abs() for t in terms)) + 1e-300


def _ref_powell(s, y, Hy, mu1):
    """Lines 2-7 of Algorithm 1, written out."""
    sy = float(torch.dot(s, y))
    yHy = float(torch.dot(y, Hy))
    if sy < mu1 * yHy:
        theta = (1 - mu1) * yHy / (yHy - sy)
    else:
        theta = 1.0
    return theta * s + (1 - theta) * Hy, theta


@settings(max_examples=200, deadline=None)
@given(damping_cases(), st.booleans())
def test_dpdlm_properties(case, as_callable):
    s, y, H, mu1, mu2 = case
    Hop = (lambda v: H @ v) if as_callable else H
    s_t, y_t, theta = dpdlm(s, y, Hop, mu1, mu2)
    Hy = H @ y
    yHy = torch.dot(y, Hy)
    sty = torch.dot(s_t, y)
    # Powell: s~^T y >= mu1 y^T H y
    assert sty >= mu1 * yHy - _tol(torch.linalg.norm(s_t) * torch.linalg.norm(y), yHy)
    # LM: s~^T y~ >= mu2 ||s~||^2
    ss = torch.dot(s_t, s_t)
    assert torch.dot(s_t, y_t) >= mu2 * ss - _tol(
        torch.linalg.norm(s_t) * torch.linalg.norm(y), mu2 * ss, yHy
    )
    # y~ = y + mu2 s~ (line 8)
    assert torch.allclose(y_t, y + mu2 * s_t, rtol=1e-12, atol=0)
    # matches Algorithm 1 written out
    s_ref, theta_ref = _ref_powell(s, y, Hy, mu1)
    assert math.isclose(float(theta), theta_ref, rel_tol=1e-9, abs_tol=1e-12)
    assert torch.allclose(s_t, s_ref, rtol=1e-9, atol=1e-12 * float(s_ref.abs().max() + 1e-300))
    assert 0.0 <= float(theta) <= 1.0 + 1e-12
    if float(torch.dot(s, y)) >= mu1 * float(yHy):
        assert float(theta) == 1.0
        assert torch.equal(s_t, s)


@settings(max_examples=100, deadline=None)
@given(damping_cases())
def test_dpdlm_no_damping_needed_keeps_s(case):
    _, _, H, mu1, mu2 = case
    n = H.shape[0]
    gen = torch.Generator().manual_seed(n)
    s = torch.randn(n, generator=gen, dtype=DT)
    # y with s^T y well above mu1 y^T H y: y = c H^{-1} s with c < 1/mu1
    y = 0.5 * torch.linalg.solve(H, s)
    assert torch.dot(s, y) >= mu1 * torch.dot(y, H @ y)
    s_t, y_t, theta = dpdlm(s, y, H, mu1, mu2)
    assert float(theta) == 1.0
    assert torch.equal(s_t, s)
    assert torch.allclose(y_t, y + mu2 * s, rtol=1e-14, atol=0)


def test_dpdlm_crafted_case():
    # s^T y = -1 < mu1 y^T H y: explicit numbers.
    s = torch.tensor([1.0, 0.0], dtype=DT)
    y = torch.tensor([-1.0, 1.0], dtype=DT)
    H = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=DT)
    mu1, mu2 = 0.2, 3.0
    # y^T H y = 3, s^T y = -1, theta = 0.8 * 3 / 4 = 0.6
    # s~ = 0.6 [1, 0] + 0.4 [-2, 1] = [-0.2, 0.4]; y~ = y + 3 s~ = [-1.6, 2.2]
    s_t, y_t, theta = dpdlm(s, y, H, mu1, mu2)
    assert math.isclose(float(theta), 0.6, rel_tol=1e-14)
    assert torch.allclose(s_t, torch.tensor([-0.2, 0.4], dtype=DT), rtol=0, atol=1e-14)
    assert torch.allclose(y_t, torch.tensor([-1.6, 2.2], dtype=DT), rtol=0, atol=1e-14)


@pytest.mark.parametrize("mu1,mu2", [(0.0, 1.0), (1.0, 1.0), (-0.5, 1.0), (0.2, 0.0), (0.2, -1.0)])
def test_dpdlm_invalid_mu(mu1, mu2):
    s = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError):
        dpdlm(s, s, torch.eye(3, dtype=DT), mu1, mu2)
    with pytest.raises(ValueError):
        dpidlm(s, s, mu1, mu2)


@settings(max_examples=200, deadline=None)
@given(damping_cases())
def test_dpidlm_lemma_5_1(case):
    s, y, _, mu1, mu2 = case
    if float(torch.linalg.norm(s)) == 0 and float(torch.linalg.norm(y)) == 0:
        return
    s_t, y_t, theta = dpidlm(s, y, mu1, mu2)
    mu3 = mu1 / (mu2 * (1 + 2 * mu1))
    sty = torch.dot(s_t, y_t)
    assert sty > 0
    ss = torch.dot(s_t, s_t)
    yy = torch.dot(y_t, y_t)
    assert ss / sty <= (1 / mu2) * (1 + 1e-9)
    assert yy / sty <= (1 / mu3) * (1 + 1e-9)
    # Algorithm 4 written out: Algorithm 1 with H = I / mu2
    s_ref, theta_ref = _ref_powell(s, y, y / mu2, mu1)
    assert math.isclose(float(theta), theta_ref, rel_tol=1e-9, abs_tol=1e-12)
    assert torch.allclose(s_t, s_ref, rtol=1e-9, atol=1e-12 * float(s_ref.abs().max() + 1e-300))
    assert torch.allclose(y_t, y + mu2 * s_t, rtol=1e-12, atol=0)
    # and the same as dpdlm with the explicit matrix I / mu2
    n = s.shape[0]
    s2, y2, _ = dpdlm(s, y, torch.eye(n, dtype=DT) / mu2, mu1, mu2)
    assert torch.allclose(s_t, s2, rtol=1e-12, atol=1e-12 * float(s2.abs().max() + 1e-300))
    assert torch.allclose(y_t, y2, rtol=1e-12, atol=1e-12 * float(y2.abs().max() + 1e-300))


# ----------------------------------------------------------------------------------------------
# Double damping (spec section 4)
# ----------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(damping_cases())
def test_double_damping_properties(case):
    s, y, H, mu1, mu2 = case
    mu2 = min(mu2, 1.0)
    s_t, y_t, theta1, theta2 = double_damping(s, y, H, mu1, mu2)
    ss = torch.dot(s_t, s_t)
    sty = torch.dot(s_t, y_t)
    Hy = H @ y
    assert sty >= mu2 * ss - _tol(torch.linalg.norm(s_t) * torch.linalg.norm(y), ss)
    # the Powell step is that of Algorithm 1
    s_ref, theta_ref = _ref_powell(s, y, Hy, mu1)
    assert math.isclose(float(theta1), theta_ref, rel_tol=1e-9, abs_tol=1e-12)
    assert torch.allclose(s_t, s_ref, rtol=1e-9, atol=1e-12 * float(s_ref.abs().max() + 1e-300))
    # second damping written out
    ss_r = float(torch.dot(s_ref, s_ref))
    sy_r = float(torch.dot(s_ref, y))
    if sy_r < mu2 * ss_r:
        th2 = (1 - mu2) * ss_r / (ss_r - sy_r)
    else:
        th2 = 1.0
    assert math.isclose(float(theta2), th2, rel_tol=1e-8, abs_tol=1e-10)
    y_ref = th2 * y + (1 - th2) * s_ref
    assert torch.allclose(
        y_t, y_ref, rtol=1e-8, atol=1e-10 * float(y_ref.abs().max() + 1e-300)
    )
    assert 0.0 <= float(theta2) <= 1.0 + 1e-12


def test_double_damping_crafted_case():
    s = torch.tensor([1.0, 0.0], dtype=DT)
    y = torch.tensor([-1.0, 1.0], dtype=DT)
    H = torch.tensor([[2.0, 0.0], [0.0, 1.0]], dtype=DT)
    mu1, mu2 = 0.2, 0.5
    # Powell (see test_dpdlm_crafted_case): theta1 = 0.6, s~ = [-0.2, 0.4]
    # s~^T s~ = 0.2, s~^T y = 0.2 + 0.4 = 0.6 >= mu2 * 0.2 = 0.1 -> no second damping
    s_t, y_t, th1, th2 = double_damping(s, y, H, mu1, mu2)
    assert math.isclose(float(th1), 0.6, rel_tol=1e-14)
    assert float(th2) == 1.0
    assert torch.allclose(s_t, torch.tensor([-0.2, 0.4], dtype=DT), rtol=0, atol=1e-14)
    assert torch.allclose(y_t, y, rtol=0, atol=1e-15)

    # A case that triggers the second damping only: s^T y = 0.5 >= mu1 y^T H y = 0.2 * 0.5
    # (no Powell), but 0.5 < mu2 s^T s = 0.9 * 2 = 1.8.
    s = torch.tensor([1.0, 1.0], dtype=DT)
    y = torch.tensor([0.5, 0.0], dtype=DT)
    H = torch.eye(2, dtype=DT) * 2.0
    mu1, mu2 = 0.2, 0.9
    # theta2 = (1 - 0.9) * 2 / (2 - 0.5) = 0.2 / 1.5 = 2/15
    # y~ = 2/15 [0.5, 0] + 13/15 [1, 1] = [14/15, 13/15]
    s_t, y_t, th1, th2 = double_damping(s, y, H, mu1, mu2)
    assert float(th1) == 1.0
    assert torch.equal(s_t, s)
    assert math.isclose(float(th2), 2.0 / 15.0, rel_tol=1e-14)
    assert torch.allclose(y_t, torch.tensor([14 / 15, 13 / 15], dtype=DT), rtol=0, atol=1e-14)
    # s~^T y~ = mu2 s~^T s~ exactly when damped
    assert math.isclose(float(torch.dot(s_t, y_t)), mu2 * 2.0, rel_tol=1e-14)

    # Both dampings: H = 100 I, s = [1, 0], y = [-1, 1], mu1 = 0.2, mu2 = 0.5.
    # y^T H y = 200, s^T y = -1, theta1 = 0.8 * 200 / 201 = 160/201, H y = [-100, 100],
    # s~ = 160/201 [1, 0] + 41/201 [-100, 100] = [-3940, 4100] / 201,
    # s~^T y = 8040 / 201 = 40 (= mu1 y^T H y), s~^T s~ = (3940^2 + 4100^2) / 201^2 ~ 800.3,
    # 40 < mu2 s~^T s~ -> theta2 = 0.5 ss / (ss - 40), y~ = theta2 y + (1 - theta2) s~.
    s = torch.tensor([1.0, 0.0], dtype=DT)
    y = torch.tensor([-1.0, 1.0], dtype=DT)
    H = 100.0 * torch.eye(2, dtype=DT)
    mu1, mu2 = 0.2, 0.5
    t1 = 160.0 / 201.0
    s_ref = torch.tensor([-3940.0 / 201.0, 4100.0 / 201.0], dtype=DT)
    ss = (3940.0**2 + 4100.0**2) / 201.0**2
    t2 = 0.5 * ss / (ss - 40.0)
    y_ref = t2 * y + (1 - t2) * s_ref
    s_t, y_t, th1, th2 = double_damping(s, y, H, mu1, mu2)
    assert math.isclose(float(th1), t1, rel_tol=1e-13)
    assert math.isclose(float(th2), t2, rel_tol=1e-12)
    assert torch.allclose(s_t, s_ref, rtol=1e-13, atol=0)
    assert torch.allclose(y_t, y_ref, rtol=1e-12, atol=1e-12)
    assert math.isclose(float(torch.dot(s_t, y_t)), mu2 * ss, rel_tol=1e-12)


@pytest.mark.parametrize("mu2", [0.0, 1.5, -1.0])
def test_double_damping_rejects_mu2(mu2):
    s = torch.ones(3, dtype=DT)
    with pytest.raises(ValueError, match="mu2"):
        double_damping(s, s, torch.eye(3, dtype=DT), 0.2, mu2)


def test_double_damping_accepts_mu2_one_and_callable():
    gen = torch.Generator().manual_seed(4)
    n = 5
    H = 100.0 * random_spd(n, gen)  # large H: ||s~||^2 >> s~^T y after Powell
    s = torch.randn(n, generator=gen, dtype=DT)
    y = -s + 0.1 * torch.randn(n, generator=gen, dtype=DT)
    a = double_damping(s, y, H, 0.2, 1.0)
    b = double_damping(s, y, lambda v: H @ v, 0.2, 1.0)
    for u, v in zip(a, b):
        assert torch.allclose(u, v, rtol=1e-14, atol=1e-14)
    # mu2 = 1: theta2 = 0 when damped, so y~ = s~
    assert float(a[3]) == 0.0
    assert torch.allclose(a[1], a[0], rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Compact L-BFGS
# ----------------------------------------------------------------------------------------------


def make_pairs(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    B = random_spd(n, gen, 0.5, 2.0)
    S = torch.randn(n, k, generator=gen, dtype=DT)
    Y = B @ S + 0.01 * torch.randn(n, k, generator=gen, dtype=DT)
    assert (torch.einsum("ik,ik->k", S, Y) > 0).all()
    return S, Y


def dense_lbfgs(S: torch.Tensor, Y: torch.Tensor, gamma: float) -> torch.Tensor:
    H = gamma * torch.eye(S.shape[0], dtype=DT)
    for i in range(S.shape[1]):
        H = product_form_bfgs(H, S[:, i], Y[:, i])
    return H


@pytest.mark.parametrize("k", [1, 5, 10])
def test_lbfgs_compact_equals_sequential_bfgs(k):
    n, gamma = 7, 0.3
    S, Y = make_pairs(n, k, seed=100 + k)
    U, M = lbfgs_compact_factors(S, Y, gamma)
    assert U.shape == (n, 2 * k) and M.shape == (2 * k, 2 * k)
    H_ref = dense_lbfgs(S, Y, gamma)
    X = torch.randn(n, 5, generator=torch.Generator().manual_seed(k), dtype=DT)
    assert rel_err(lbfgs_apply(U, M, gamma, X), H_ref @ X) <= 1e-10
    x = X[:, 0].clone()
    out_v = lbfgs_apply(U, M, gamma, x)
    assert out_v.shape == (n,)
    assert rel_err(out_v, H_ref @ x) <= 1e-10
    assert rel_err(lbfgs_dense(U, M, gamma, n), H_ref) <= 1e-10


def test_lbfgs_after_old_pairs_drop_out():
    n, gamma, history = 7, 0.3, 10
    S, Y = make_pairs(n, 13, seed=7)
    S_kept, Y_kept = S[:, -history:], Y[:, -history:]
    U, M = lbfgs_compact_factors(S_kept, Y_kept, gamma)
    H_ref = dense_lbfgs(S[:, 3:13].clone(), Y[:, 3:13].clone(), gamma)
    X = torch.randn(n, 5, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert rel_err(lbfgs_apply(U, M, gamma, X), H_ref @ X) <= 1e-10
    x = torch.randn(n, generator=torch.Generator().manual_seed(2), dtype=DT)
    assert rel_err(lbfgs_apply(U, M, gamma, x), H_ref @ x) <= 1e-10
    # and differs from the operator over all 13 pairs (the old pairs really dropped out)
    H_all = dense_lbfgs(S, Y, gamma)
    assert rel_err(H_all, H_ref) > 1e-6


def test_lbfgs_zero_pairs_is_gamma_identity():
    n, gamma = 7, 0.3
    X = torch.randn(n, 5, generator=torch.Generator().manual_seed(3), dtype=DT)
    x = X[:, 1].clone()
    U = torch.zeros(n, 0, dtype=DT)
    M = torch.zeros(0, 0, dtype=DT)
    assert torch.allclose(lbfgs_apply(U, M, gamma, X), gamma * X, rtol=1e-15, atol=0)
    assert torch.allclose(lbfgs_apply(U, M, gamma, x), gamma * x, rtol=1e-15, atol=0)


def test_lbfgs_compact_factors_zero_pairs():
    n, gamma = 7, 0.3
    S = torch.zeros(n, 0, dtype=DT)
    U, M = lbfgs_compact_factors(S, S.clone(), gamma)
    X = torch.randn(n, 5, generator=torch.Generator().manual_seed(4), dtype=DT)
    assert torch.allclose(lbfgs_apply(U, M, gamma, X), gamma * X, rtol=1e-15, atol=0)
