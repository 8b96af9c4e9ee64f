"""kbfgs.KBFGS against the independent dense float64 reference in ``tests/reference.py``.

Every test builds one model, copies it, drives the library optimizer on one copy and the
reference on the other with the same fixed minibatches, and checks the parameters (and the
model buffers, i.e. BatchNorm running statistics) after every step.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from reference import (
    Capture,
    ReferenceKBFGS,
    bfgs_inverse_update,
    double_damping,
    dp_dlm,
    get_W,
    kronecker_layers,
    lbfgs_dense,
    outputs_by_location,
    patches,
)

DT = torch.float64
RTOL, ATOL = 1e-10, 1e-12
STEPS = 6


# ----------------------------------------------------------------------------------------------
# Models and data
# ----------------------------------------------------------------------------------------------


def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 5), nn.ReLU(),
        nn.Linear(5, 4, bias=False), nn.Tanh(),
        nn.Linear(4, 3),
    ).to(DT)


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 4, 3, stride=2, bias=False)
        self.conv3 = nn.Conv2d(4, 3, kernel_size=2, dilation=2, padding=1)
        self.fc = nn.Linear(3 * 3 * 3, 5)

    def forward(self, x):
        # BatchNorm after the ReLU, not directly after conv1: a train-mode BatchNorm makes
        # sum_{n,t} d loss / d h_t(n) = 0 per channel for the conv feeding it, so that conv's
        # y_G would be pure rounding noise and D_P D_LM would amplify the noise into O(1)
        # changes of H_G, making any two correct implementations disagree.
        x = self.bn(F.relu(self.conv1(x)))
        x = F.relu(self.conv2(x))
        x = self.conv3(x)
        return self.fc(x.flatten(1))


def make_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SmallCNN().to(DT)


class SeqMLP(nn.Module):
    """Linear layers on (batch, positions, features): every position is a location t."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4, bias=False)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.fc2(F.relu(self.fc1(x))))
        return self.head(h.mean(1))


def make_seq(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return SeqMLP().to(DT)


def mse_loss(out, y):
    return F.mse_loss(out, y)


def bce_loss(out, y):
    return F.binary_cross_entropy_with_logits(out, y)


def ce_loss(out, y):
    return F.cross_entropy(out, y)


def mse_sum_loss(out, y):
    return F.mse_loss(out, y, reduction="sum")


def make_data(kind: str, n_batches: int, seed: int, loss: str = "mse", sizes=None):
    """Fixed minibatches: batch 8 for the MLP, 6 for the CNN (or the given sizes)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_batches):
        if kind in ("mlp", "seq"):
            m = 8 if sizes is None else sizes[i]
            shape = (m, 6) if kind == "mlp" else (m, 3, 6)
            x = torch.randn(*shape, generator=g, dtype=DT)
            if loss.startswith("mse"):
                y = torch.randn(m, 3, generator=g, dtype=DT)
            else:
                y = (torch.rand(m, 3, generator=g, dtype=DT) > 0.5).to(DT)
        else:
            m = 6 if sizes is None else sizes[i]
            x = torch.randn(m, 2, 7, 7, generator=g, dtype=DT)
            y = torch.randint(0, 5, (m,), generator=g)
        out.append((x, y))
    return out


LOSSES = {"mse": mse_loss, "bce": bce_loss, "ce": ce_loss, "mse_sum": mse_sum_loss}
BUILDERS = {"mlp": make_mlp, "cnn": make_cnn, "seq": make_seq}


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _assert_model_close(lib_model, ref_model, step, what=""):
    for (n1, p1), (n2, p2) in zip(lib_model.named_parameters(), ref_model.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(
            p1.detach(), p2.detach(), rtol=RTOL, atol=ATOL,
            msg=lambda m, n=n1: f"{what} step {step}: parameter {n} differs from reference\n{m}")
    for (n1, b1), (n2, b2) in zip(lib_model.named_buffers(), ref_model.named_buffers()):
        assert n1 == n2
        torch.testing.assert_close(
            b1, b2, rtol=RTOL, atol=ATOL,
            msg=lambda m, n=n1: f"{what} step {step}: buffer {n} differs from reference\n{m}")


def run_and_compare(kind, hp, warm, loss="mse", steps=STEPS, seed=0, lr_schedule=None):
    build = BUILDERS[kind]
    if kind == "cnn":
        loss = "ce"
    loss_fn = LOSSES[loss]
    lib_model = build(seed)
    ref_model = copy.deepcopy(lib_model)
    lib_model.train()
    ref_model.train()

    opt = kbfgs.KBFGS(lib_model, **hp)
    ref = ReferenceKBFGS(ref_model, **hp)

    data = make_data(kind, steps, seed + 1, loss)
    if warm:
        # unequal batch sizes: A_0 is the mean over all samples, not the mean of batch means
        warm_data = make_data(kind, 3, seed + 100, loss, sizes=(7, 2, 4))
        # mix both accepted forms: bare input tensors and (x, y) tuples
        lib_warm = [warm_data[0][0], warm_data[1], warm_data[2][0]]
        opt.warm_start(lib_warm)
        ref.warm_start([b[0] for b in warm_data])
        _assert_model_close(lib_model, ref_model, 0, "after warm_start")

    for k, (x, y) in enumerate(data, start=1):
        if lr_schedule and k in lr_schedule:  # what an lr_scheduler does between steps
            opt.param_groups[0]["lr"] = lr_schedule[k]
            ref.lr = lr_schedule[k]

        def closure(x=x, y=y):
            opt.zero_grad()
            out = loss_fn(lib_model(x), y)
            out.backward()
            return out

        lib_loss = opt.step(closure)
        ref_loss = ref.step(x, y, loss_fn)
        _assert_model_close(lib_model, ref_model, k, f"{kind} {hp} warm={warm}")
        lib_loss = float(torch.as_tensor(lib_loss).detach())
        assert math.isclose(lib_loss, ref_loss, rel_tol=1e-12, abs_tol=1e-14), (
            f"step {k}: returned loss {lib_loss} != first-closure loss {ref_loss}")
    ref.cap.remove()
    return ref


BASE = {"lr": 0.05, "damping": 0.5, "momentum": 0.9}


# ----------------------------------------------------------------------------------------------
# Self-checks of the reference itself (no kbfgs involved)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn", "seq"])
def test_reference_patches_reproduce_autograd_gradient(kind):
    """DW = E_n[sum_t Dh_t a_t^T] and h_t = W a_t: the unfold ordering and Dh scaling are right."""
    model = BUILDERS[kind]()
    loss_fn = ce_loss if kind == "cnn" else mse_loss
    x, y = make_data(kind, 1, 5)[0]
    layers = kronecker_layers(model)
    cap = Capture(layers)
    loss = loss_fn(model(x), y)
    loss.backward()
    m = x.shape[0]
    for name, mod in layers:
        a = patches(mod, cap.inputs[name])
        dh = m * outputs_by_location(mod, cap.outputs[name].grad)
        DW = torch.einsum("nit,njt->ij", dh, a) / m
        torch.testing.assert_close(DW, get_W(mod, "grad"), rtol=1e-12, atol=1e-14)
        h = outputs_by_location(mod, cap.outputs[name].detach())
        torch.testing.assert_close(torch.einsum("ij,njt->nit", get_W(mod), a), h,
                                   rtol=1e-12, atol=1e-14)
    cap.remove()


def test_reference_linear_algebra():
    g = torch.Generator().manual_seed(3)
    n = 5
    M = torch.randn(n, n, generator=g, dtype=DT)
    H = M @ M.T + torch.eye(n, dtype=DT)
    s = torch.randn(n, generator=g, dtype=DT)
    y = torch.randn(n, generator=g, dtype=DT)
    y = y if torch.dot(s, y) > 0 else -y
    H2 = bfgs_inverse_update(H, s, y)
    torch.testing.assert_close(H2 @ y, s)  # secant equation
    torch.testing.assert_close(H2, H2.T)
    assert bfgs_inverse_update(H, s, -y) is H  # s^T y <= 0: skipped
    # D_P D_LM: s~^T y~ >= mu2 ||s~||^2 (Section 3.2.1)
    for mu2 in (0.1, 2.0):
        st, yt = dp_dlm(s, -y, H, 0.2, mu2)
        assert torch.dot(st, yt) >= mu2 * torch.dot(st, st) * (1 - 1e-12)
        st, yt = double_damping(s, -y, H, 0.2, min(mu2, 1.0))
        assert torch.dot(st, yt) >= min(mu2, 1.0) * torch.dot(st, st) * (1 - 1e-12)
    # the L-BFGS matrix with one pair equals one BFGS update of I / lam
    L = lbfgs_dense([(s, y)], n, 0.7, DT)
    torch.testing.assert_close(L, bfgs_inverse_update(torch.eye(n, dtype=DT) / 0.7, s, y))


# ----------------------------------------------------------------------------------------------
# Library vs reference
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("history", [None, 2], ids=["bfgs", "lbfgs2"])
@pytest.mark.parametrize("update_freq", [1, 3], ids=["T1", "T3"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_reference(kind, update_freq, history, warm):
    hp = dict(BASE, update_freq=update_freq, history=history)
    run_and_compare(kind, hp, warm)


def test_matches_reference_mlp_bce_loss():
    hp = dict(BASE, update_freq=1, history=None)
    run_and_compare("mlp", hp, warm=True, loss="bce")


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_reference_weight_decay(kind):
    hp = dict(BASE, update_freq=1, history=None, weight_decay=0.03, momentum=0.9)
    run_and_compare(kind, hp, warm=True)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_matches_reference_weight_decay_lbfgs_no_momentum(kind):
    hp = dict(BASE, update_freq=2, history=3, weight_decay=0.01, momentum=0.0)
    run_and_compare(kind, hp, warm=False)


def test_matches_reference_dense_curvature_exercised():
    """Guard against a vacuous comparison: the curvature really moved away from its start."""
    hp = dict(BASE, update_freq=1, history=None)
    ref = run_and_compare("cnn", hp, warm=True)
    assert ref.counts["powell_damped"] > 0  # both branches of Algorithm 1 line 2 are compared
    assert ref.counts["powell_damped"] < ref.counts["curvature_updates"]
    for st in ref.state.values():
        assert not torch.allclose(st.H_G, torch.eye(st.H_G.shape[0], dtype=DT) / st.lam_g)
        assert torch.linalg.norm(st.s_G) > 0


# -- the 2020 variants (spec section 4), only if the library accepts them --------------------


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_variant_double_damping(kind):
    hp = dict(BASE, update_freq=1, history=None, damping_rule="dd")
    ref = run_and_compare(kind, hp, warm=True)
    assert 0 < ref.counts["dd_damped"] < ref.counts["curvature_updates"]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_variant_moving_average(kind, warm):
    hp = dict(BASE, update_freq=1, history=None, hessian_action="moving_average")
    run_and_compare(kind, hp, warm=warm)


def test_variant_sqrt_split():
    hp = dict(BASE, update_freq=1, history=2, damping_split="sqrt")
    run_and_compare("cnn", hp, warm=True)


def test_variant_kbfgs20_all_three():
    hp = dict(BASE, update_freq=1, history=None, damping_rule="dd",
              hessian_action="moving_average", damping_split="sqrt")
    run_and_compare("cnn", hp, warm=True)


# -- further public behaviour that the reference pins down ----------------------------------


@pytest.mark.parametrize("history", [None, 2], ids=["bfgs", "lbfgs2"])
def test_matches_reference_linear_on_positions(history):
    """spec section 1: a Linear on (batch, positions, features) has |T| = positions, Linear
    split."""
    hp = dict(BASE, update_freq=1, history=history)
    run_and_compare("seq", hp, warm=True)


@pytest.mark.parametrize("kind", ["mlp", "seq"])
def test_matches_reference_sum_reduction(kind):
    """loss_reduction="sum": the closure returns the batch sum, so Dh(n) = d loss / d h(n)."""
    hp = dict(BASE, lr=0.005, update_freq=1, history=None, loss_reduction="sum")
    run_and_compare(kind, hp, warm=True, loss="mse_sum")


def test_matches_reference_lr_changed_between_steps():
    """param_groups[0]["lr"] is read at every step (so every torch lr_scheduler works)."""
    hp = dict(BASE, update_freq=2, history=None)
    run_and_compare("cnn", hp, warm=True, lr_schedule={3: 0.02, 5: 0.005})
