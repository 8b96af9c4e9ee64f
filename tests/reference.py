"""Independent dense float64 reference implementation of K-BFGS / K-BFGS(L).

This module deliberately imports nothing from ``kbfgs``: it is a direct, slow transcription of
Algorithm 2 of the paper (with Algorithm 1 ``D_P D_LM``) and of sections 2 and 4 of
``spec.md``, used by the tests to check the library's parameters step by step.

Everything is explicit and dense:

* ``a_t`` are formed with ``F.unfold`` (plus a trailing 1 when the layer has a bias) and
  ``A = E_n[sum_t a_t a_t^T]`` is formed as a matrix;
* ``h_t`` and ``d loss / d h_t`` are captured with forward hooks and ``retain_grad``;
* the BFGS update is the textbook ``(I - rho s y^T) H (I - rho y s^T) + rho s s^T`` with full
  matrices; K-BFGS(L)'s ``H_G`` is rebuilt as sequential BFGS updates of ``I / lambda_G`` over
  the kept pairs.

Usage::

    ref = ReferenceKBFGS(model_copy, lr=..., damping=..., ...)
    ref.warm_start(batches)          # optional
    ref.step(x, y, loss_fn)          # one K-BFGS iteration on minibatch (x, y)

``loss_fn(output, y)`` must return the batch MEAN loss (``loss_reduction="mean"``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

Tensor = torch.Tensor

MU1 = 0.2
BETA = 0.9


# ----------------------------------------------------------------------------------------------
# Small dense linear-algebra helpers
# ----------------------------------------------------------------------------------------------


def bfgs_inverse_update(H: Tensor, s: Tensor, y: Tensor) -> Tensor:
    """Textbook BFGS update (11) of an inverse-Hessian approximation. Skips when s^T y <= 0."""
    sy = torch.dot(s, y)
    if not bool(torch.isfinite(sy)) or sy.item() <= 0:
        return H
    rho = 1.0 / sy
    n = H.shape[0]
    eye = torch.eye(n, dtype=H.dtype)
    left = eye - rho * torch.outer(s, y)
    right = eye - rho * torch.outer(y, s)
    return left @ H @ right + rho * torch.outer(s, s)


def lbfgs_dense(pairs: list[tuple[Tensor, Tensor]], n: int, lam_g: float, dtype) -> Tensor:
    """Dense matrix of the L-BFGS operator: sequential BFGS updates of I / lam_g over pairs."""
    H = torch.eye(n, dtype=dtype) / lam_g
    for s, y in pairs:
        H = bfgs_inverse_update(H, s, y)
    return H


def powell_damping(s: Tensor, y: Tensor, H: Tensor, mu1: float = MU1) -> tuple[Tensor, float]:
    """Powell's damping on H (lines 2-7 of Algorithm 1). Returns (s_tilde, theta)."""
    Hy = H @ y
    yHy = torch.dot(y, Hy)
    sy = torch.dot(s, y)
    if sy.item() < mu1 * yHy.item():
        theta = ((1.0 - mu1) * yHy / (yHy - sy)).item()
    else:
        theta = 1.0
    return theta * s + (1.0 - theta) * Hy, theta


def dp_dlm(s: Tensor, y: Tensor, H: Tensor, mu1: float, mu2: float) -> tuple[Tensor, Tensor]:
    """Algorithm 1 (D_P D_LM)."""
    s_t, _ = powell_damping(s, y, H, mu1)
    return s_t, y + mu2 * s_t


def dd_needs_second_damping(s_t: Tensor, y: Tensor, mu2: float) -> bool:
    return torch.dot(s_t, y).item() < mu2 * torch.dot(s_t, s_t).item()


def double_damping(s: Tensor, y: Tensor, H: Tensor, mu1: float, mu2: float
                   ) -> tuple[Tensor, Tensor]:
    """Double damping of Goldfarb et al. (2020), spec section 4 ("dd")."""
    s_t, _ = powell_damping(s, y, H, mu1)
    ss = torch.dot(s_t, s_t)
    sy = torch.dot(s_t, y)
    if sy.item() < mu2 * ss.item():
        theta2 = ((1.0 - mu2) * ss / (ss - sy)).item()
        y_t = theta2 * y + (1.0 - theta2) * s_t
    else:
        y_t = y
    return s_t, y_t


# ----------------------------------------------------------------------------------------------
# Layer bookkeeping
# ----------------------------------------------------------------------------------------------


def kronecker_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every nn.Linear / nn.Conv2d with a trainable weight (the test models only use plain ones)."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv2d)) and mod.weight.requires_grad:
            out.append((name, mod))
    return out


def has_bias(mod: nn.Module) -> bool:
    return mod.bias is not None and mod.bias.requires_grad


def patches(mod: nn.Module, x: Tensor) -> Tensor:
    """a_t(n) for every sample and location: tensor (N, d_A, |T|)."""
    if isinstance(mod, nn.Conv2d):
        a = F.unfold(x, kernel_size=mod.kernel_size, dilation=mod.dilation,
                     padding=mod.padding, stride=mod.stride)
    else:
        if x.dim() == 2:
            a = x.unsqueeze(-1)
        else:  # (N, positions..., features): every position is a location
            a = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    if has_bias(mod):
        ones = torch.ones(a.shape[0], 1, a.shape[2], dtype=a.dtype)
        a = torch.cat([a, ones], dim=1)
    return a


def outputs_by_location(mod: nn.Module, h: Tensor) -> Tensor:
    """h_t(n) for every sample and location: tensor (N, d_G, |T|)."""
    if isinstance(mod, nn.Conv2d):
        return h.reshape(h.shape[0], h.shape[1], -1)
    if h.dim() == 2:
        return h.unsqueeze(-1)
    return h.reshape(h.shape[0], -1, h.shape[-1]).transpose(1, 2)


def get_W(mod: nn.Module, which: str = "data") -> Tensor:
    w = mod.weight.data if which == "data" else mod.weight.grad
    W = w.reshape(w.shape[0], -1)
    if has_bias(mod):
        b = mod.bias.data if which == "data" else mod.bias.grad
        W = torch.cat([W, b.reshape(-1, 1)], dim=1)
    return W


def set_W(mod: nn.Module, W: Tensor) -> None:
    w = mod.weight
    d = w[0].numel()
    w.data.copy_(W[:, :d].reshape(w.shape))
    if has_bias(mod):
        mod.bias.data.copy_(W[:, d])


class Capture:
    """Forward hooks recording each Kronecker layer's input and (grad-retaining) output."""

    def __init__(self, layers: list[tuple[str, nn.Module]]):
        self.inputs: dict[str, Tensor] = {}
        self.outputs: dict[str, Tensor] = {}
        self.handles = []
        for name, mod in layers:
            self.handles.append(mod.register_forward_hook(self._hook(name)))

    def _hook(self, name):
        def hook(mod, inp, out):
            self.inputs[name] = inp[0].detach()
            if out.requires_grad:
                out.retain_grad()
            self.outputs[name] = out

        return hook

    def clear(self):
        self.inputs.clear()
        self.outputs.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def damping_split(mod: nn.Module, T: int, lam: float, split: str) -> tuple[float, float]:
    """(lambda_A, lambda_G) of a layer with |T| locations (spec section 2 item 5 and section 4)."""
    if split == "sqrt" or isinstance(mod, nn.Linear):
        return math.sqrt(lam), math.sqrt(lam)
    if split != "spatial":
        raise ValueError(split)
    return math.sqrt(T) * math.sqrt(lam), math.sqrt(lam) / math.sqrt(T)


@dataclass
class LayerState:
    T: int
    lam_a: float
    lam_g: float
    H_A: Tensor
    H_G: Tensor
    s_G: Tensor
    y_G: Tensor
    pairs: list[tuple[Tensor, Tensor]] = field(default_factory=list)
    A_ma: Tensor | None = None


# ----------------------------------------------------------------------------------------------
# The reference optimizer
# ----------------------------------------------------------------------------------------------


class ReferenceKBFGS:
    def __init__(self, model: nn.Module, lr: float, damping: float, momentum: float = 0.9,
                 update_freq: int = 1, weight_decay: float = 0.0, history: int | None = None,
                 damping_rule: str = "dpdlm", hessian_action: str = "minibatch",
                 damping_split: str = "spatial", loss_reduction: str = "mean"):
        self.model = model
        self.lr = lr
        self.damping = damping
        self.momentum = momentum
        self.update_freq = update_freq
        self.weight_decay = weight_decay
        self.history = history
        self.damping_rule = damping_rule
        self.hessian_action = hessian_action
        self.damping_split = damping_split
        self.loss_reduction = loss_reduction
        self.layers = kronecker_layers(model)
        self.kron_params = set()
        for _, mod in self.layers:
            self.kron_params.add(mod.weight)
            if has_bias(mod):
                self.kron_params.add(mod.bias)
        self.other_params = [p for p in model.parameters()
                             if p.requires_grad and p not in self.kron_params]
        self.buf: dict[Tensor, Tensor] = {}
        self.state: dict[str, LayerState] = {}
        self.A0: dict[str, Tensor] = {}
        self.k = 0
        self.cap = Capture(self.layers)
        # how often each branch was taken (lets tests check that a comparison is not vacuous)
        self.counts = {"curvature_updates": 0, "powell_damped": 0, "dd_damped": 0,
                       "skipped_A": 0, "skipped_G": 0}

    # -- initialisation --------------------------------------------------------------------------

    def _init_layer(self, name: str, mod: nn.Module, T: int, d_a: int, d_g: int, dtype):
        lam_a, lam_g = damping_split(mod, T, self.damping, self.damping_split)
        if name in self.A0:
            H_A = torch.linalg.inv(self.A0[name] + lam_a * torch.eye(d_a, dtype=dtype))
            A_ma = self.A0[name].clone()
        else:
            H_A = torch.eye(d_a, dtype=dtype) / lam_a
            A_ma = torch.zeros(d_a, d_a, dtype=dtype)
        self.state[name] = LayerState(
            T=T, lam_a=lam_a, lam_g=lam_g, H_A=H_A, H_G=torch.eye(d_g, dtype=dtype) / lam_g,
            s_G=torch.zeros(d_g, dtype=dtype), y_G=torch.zeros(d_g, dtype=dtype), A_ma=A_ma)

    def warm_start(self, batches: Iterable) -> None:
        sums: dict[str, Tensor] = {}
        count = 0
        saved = {k: v.clone() for k, v in self.model.named_buffers()}
        with torch.no_grad():
            for b in batches:
                x = b[0] if isinstance(b, (tuple, list)) else b
                self.cap.clear()
                self.model(x)
                count += x.shape[0]
                for name, mod in self.layers:
                    a = patches(mod, self.cap.inputs[name])
                    contrib = torch.einsum("nit,njt->ij", a, a)
                    sums[name] = sums.get(name, 0) + contrib
        for k, v in self.model.named_buffers():
            v.copy_(saved[k])
        self.cap.clear()
        for name, _ in self.layers:
            self.A0[name] = sums[name] / count

    # -- one iteration ---------------------------------------------------------------------------

    def _forward_backward(self, x, y, loss_fn):
        self.model.zero_grad(set_to_none=True)
        self.cap.clear()
        loss = loss_fn(self.model(x), y)
        loss.backward()
        return loss

    def _hbar(self, name, mod, m):
        """(h_bar, Dh_bar); Dh(n) = m * d(mean loss)/dh(n), or d(sum loss)/dh(n) for "sum"."""
        h = outputs_by_location(mod, self.cap.outputs[name].detach())
        g = outputs_by_location(mod, self.cap.outputs[name].grad)
        scale = m if self.loss_reduction == "mean" else 1
        return h.mean(dim=(0, 2)), (scale * g).mean(dim=(0, 2))

    def step(self, x: Tensor, y: Tensor, loss_fn: Callable) -> float:
        self.k += 1
        m = x.shape[0]
        update = self.k % self.update_freq == 0
        loss = self._forward_backward(x, y, loss_fn)

        rec = {}
        for name, mod in self.layers:
            a = patches(mod, self.cap.inputs[name])
            hh = outputs_by_location(mod, self.cap.outputs[name])
            if name not in self.state:
                self._init_layer(name, mod, a.shape[2], a.shape[1], hh.shape[1], a.dtype)
            if update:
                st = self.state[name]
                a_bar = a.mean(dim=(0, 2))
                A = torch.einsum("nit,njt->ij", a, a) / m
                s_A = st.H_A @ a_bar
                h_bar, dh_bar = self._hbar(name, mod, m)
                rec[name] = (s_A, A, h_bar, dh_bar)

        # momentum + parameter update
        lr, lam, wd, mom = self.lr, self.damping, self.weight_decay, self.momentum
        with torch.no_grad():
            for name, mod in self.layers:
                st = self.state[name]
                G = get_W(mod, "grad")
                key = mod.weight
                self.buf[key] = mom * self.buf[key] + G if key in self.buf else G.clone()
                W = get_W(mod, "data")
                P = st.H_G @ self.buf[key] @ st.H_A
                set_W(mod, W - lr * (P + wd * W))
            for p in self.other_params:
                g = p.grad
                self.buf[p] = mom * self.buf[p] + g if p in self.buf else g.clone()
                p.data.copy_(p.data - (lr / lam) * (self.buf[p] + wd * p.data))

        if update:
            saved = {k: v.clone() for k, v in self.model.named_buffers()}
            self._forward_backward(x, y, loss_fn)
            with torch.no_grad():
                for k, v in self.model.named_buffers():
                    v.copy_(saved[k])
            for name, mod in self.layers:
                st = self.state[name]
                s_A, A, h_bar, dh_bar = rec[name]
                h_plus, dh_plus = self._hbar(name, mod, m)
                # H_A
                if self.hessian_action == "moving_average":
                    st.A_ma = BETA * st.A_ma + (1 - BETA) * A
                    A_use = st.A_ma
                else:
                    A_use = A
                y_A = A_use @ s_A + st.lam_a * s_A
                st.H_A = bfgs_inverse_update(st.H_A, s_A, y_A)
                # H_G
                st.s_G = BETA * st.s_G + (1 - BETA) * (h_plus - h_bar)
                st.y_G = BETA * st.y_G + (1 - BETA) * (dh_plus - dh_bar)
                self.counts["curvature_updates"] += 1
                _, theta = powell_damping(st.s_G, st.y_G, st.H_G, MU1)
                self.counts["powell_damped"] += int(theta < 1.0)
                if torch.dot(s_A, y_A).item() <= 0:
                    self.counts["skipped_A"] += 1
                if self.damping_rule == "dd":
                    s_p, _ = powell_damping(st.s_G, st.y_G, st.H_G, MU1)
                    self.counts["dd_damped"] += int(dd_needs_second_damping(s_p, st.y_G,
                                                                            st.lam_g))
                    s_t, y_t = double_damping(st.s_G, st.y_G, st.H_G, MU1, st.lam_g)
                else:
                    s_t, y_t = dp_dlm(st.s_G, st.y_G, st.H_G, MU1, st.lam_g)
                sy = torch.dot(s_t, y_t)
                valid = bool(torch.isfinite(sy)) and sy.item() > 0
                self.counts["skipped_G"] += int(not valid)
                if self.history is None:
                    st.H_G = bfgs_inverse_update(st.H_G, s_t, y_t)
                else:
                    if valid:
                        st.pairs.append((s_t.clone(), y_t.clone()))
                        st.pairs = st.pairs[-self.history:]
                    st.H_G = lbfgs_dense(st.pairs, st.H_G.shape[0], st.lam_g, st.H_G.dtype)
        self.model.zero_grad(set_to_none=True)
        self.cap.clear()
        return loss.item()
