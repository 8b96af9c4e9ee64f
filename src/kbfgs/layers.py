"""Per-layer-type helpers: the Kronecker-layer quantities of Sections 2-3 for Linear and Conv2d.

For a Kronecker layer the parameters form ``W = [weight.reshape(out, -1), bias]`` (eq. 2; no
bias column when the layer has no trainable bias). ``a_t`` is the input of output location
``t`` (the unfolded patch for Conv2d) with a trailing homogeneous 1 when there is a bias, and
``h_t`` is the output at ``t``. With ``m`` the batch size:

* ``a_bar  = E_n[mean_t a_t(n)]``
* ``A s    = E_n[sum_t (a_t(n)^T s) a_t(n)]``     (eq. 15, without forming ``A``)
* ``A      = E_n[sum_t a_t(n) a_t(n)^T]``         (warm start, the 2020 moving average)
* ``h_bar  = E_n[mean_t h_t(n)]``
* ``Dh_bar = E_n[mean_t Dh_t(n)]`` with ``Dh(n) = m * d(mean loss)/dh(n)``.

A Linear applied to ``(batch, positions..., features)`` treats every position as a location.
A helper is bound to its module (``helper_for(module)(module)``, with the bias flag fixed
then); its methods are pure functions of tensors and the module's configuration. A registry
maps a module type to its helper class so that a new layer type is one class.
"""

from __future__ import annotations

import math
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Conv2dHelper",
    "KroneckerHelper",
    "LinearHelper",
    "bind_helper",
    "damping_split",
    "gram",
    "helper_for",
    "trainable_bias",
    "unsupported_reason",
]

# Largest number of elements of unfolded patches materialised at once when A is formed
# explicitly (warm start, moving-average variant).
_UNFOLD_CHUNK = 1 << 24
# Largest number of elements of each of the two taps x padded-positions buffers of the
# convolution A s (samples are processed in chunks below it).
_TAP_CHUNK = 1 << 23


def damping_split(damping: float, locations: int, is_conv: bool, split: str) -> tuple[float, float]:
    """``(lambda_A, lambda_G)`` of Algorithm 2 line 2 / Appendix A.3 / docs/api.md.

    ``split="spatial"``: Conv2d gets ``sqrt(|T|) sqrt(lambda)`` and ``sqrt(lambda) / sqrt(|T|)``,
    Linear ``sqrt(lambda)`` for both; ``split="sqrt"``: ``sqrt(lambda)`` for both everywhere.
    """
    root = math.sqrt(damping)
    if split == "spatial" and is_conv:
        t = math.sqrt(locations)
        return t * root, root / t
    return root, root


class KroneckerHelper:
    """The Kronecker-layer quantities of one module, bound to it (``LinearHelper(module)``).

    ``has_bias`` is fixed when the helper is made (by default: the module has a bias that
    requires grad), so the quantities keep their layout while an optimizer switches the
    parameters' ``requires_grad`` off for an extra pass. With ``d_in`` the input features (the
    unfolded patch size ``C kh kw`` for Conv2d), ``cols = d_in + has_bias`` and ``rows`` the
    output features, ``x`` the layer input and ``h`` its output:

    ========================  ===============  ============================================
    method                    shape            quantity
    ========================  ===============  ============================================
    ``a_bar(x)``              ``(cols,)``      ``E_n[mean_t a_t(n)]``
    ``A_s(x, s)``             ``(cols,)``      ``E_n[sum_t (a_t^T s) a_t]`` (eq. 15)
    ``A(x)``                  ``(cols, cols)`` ``E_n[sum_t a_t a_t^T]`` (KFAC's Omega)
    ``h_bar(h)``              ``(rows,)``      ``E_n[mean_t h_t(n)]``
    ``Dh_bar(g, m, red)``     ``(rows,)``      ``E_n[mean_t Dh_t(n)]`` from ``g = dL/dh``
    ``G(g, m, red)``          ``(rows, rows)`` ``E_n[mean_t Dh_t Dh_t^T]`` (KFAC's Gamma)
    ========================  ===============  ============================================
    """

    is_conv = False

    def __init__(self, module: nn.Module, has_bias: bool | None = None) -> None:
        self.module = module
        self.has_bias = trainable_bias(module) if has_bias is None else bool(has_bias)

    @property
    def weight(self) -> Tensor:
        """The module's weight (``nn.Module`` types its attributes ``Tensor | Module``)."""
        return cast(Tensor, self.module.weight)

    def dims(self) -> tuple[int, int]:
        """``(rows, cols)`` of W: output features and input features (+1 with a bias)."""
        w = self.weight
        return w.shape[0], w[0].numel() + int(self.has_bias)

    @staticmethod
    def batch_size(x: Tensor) -> int:
        return x.shape[0]

    def locations(self, h: Tensor) -> int:
        """``|T|``: the number of output locations of one sample."""
        raise NotImplementedError

    def a_bar(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def A_s(self, x: Tensor, s: Tensor) -> Tensor:
        raise NotImplementedError

    def A(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def h_bar(h: Tensor) -> Tensor:
        raise NotImplementedError

    @staticmethod
    def Dh_bar(g: Tensor, batch_size: int, reduction: str = "mean") -> Tensor:
        raise NotImplementedError

    def G(self, g: Tensor, batch_size: int, reduction: str = "mean") -> Tensor:
        """KFAC's ``Gamma = E_n[mean_t Dh_t Dh_t^T]`` from ``g = dL/dh``.

        ``reduction="mean"``: ``Dh = m g``, so ``Gamma = m / |T| sum_{n,t} g g^T``;
        ``"sum"``: ``Dh = g``, ``Gamma = 1 / (m |T|) sum_{n,t} g g^T``.
        """
        gf = g.movedim(1, -1) if self.is_conv else g
        gf = gf.reshape(-1, gf.shape[-1])
        locs = max(1, gf.shape[0] // batch_size)
        scale = batch_size / locs if reduction == "mean" else 1.0 / (batch_size * locs)
        return gram(gf, scale)

    def split_matrix(self, P: Tensor) -> list[Tensor]:
        """Views of a W-shaped matrix ``P`` shaped like ``[weight, bias]`` (bias if trainable)."""
        w = self.weight
        k = w[0].numel()
        views = [P[:, :k].view(w.shape)]
        if self.has_bias:
            views.append(P[:, k])
        return views

    def params(self) -> list[nn.Parameter]:
        m = self.module
        return cast("list[nn.Parameter]", [m.weight, m.bias] if self.has_bias else [m.weight])


def trainable_bias(module: nn.Module) -> bool:
    """Whether ``module`` has a bias that requires grad (read once, when a helper is made)."""
    b = getattr(module, "bias", None)
    return b is not None and b.requires_grad


def gram(X: Tensor, alpha: float) -> Tensor:
    """``alpha X^T X`` with the scaling inside the matrix product (no extra pass)."""
    return torch.addmm(X.new_zeros(()), X.mT, X, beta=0.0, alpha=alpha)


def _with_one(v: Tensor, bias: bool, value: float = 1.0) -> Tensor:
    if not bias:
        return v
    return torch.cat([v, v.new_full((1,), value)])


class LinearHelper(KroneckerHelper):
    """``nn.Linear``: ``x`` is ``(m, ..., in)``, every leading position is a location."""

    def locations(self, h: Tensor) -> int:
        return h[0].numel() // h.shape[-1] if h.dim() > 1 else 1

    def a_bar(self, x: Tensor) -> Tensor:
        xf = x.reshape(-1, x.shape[-1])
        return _with_one(xf.mean(0), self.has_bias)

    def A_s(self, x: Tensor, s: Tensor) -> Tensor:
        m = x.shape[0]
        xf = x.reshape(-1, x.shape[-1])
        bias = self.has_bias
        z = xf @ (s[:-1] if bias else s)
        if bias:
            z = z + s[-1]
        out = (xf.mT @ z) / m
        return torch.cat([out, (z.sum() / m).reshape(1)]) if bias else out

    def A(self, x: Tensor) -> Tensor:
        m = x.shape[0]
        xf = x.reshape(-1, x.shape[-1])
        if self.has_bias:
            xf = torch.cat([xf, xf.new_ones(xf.shape[0], 1)], dim=1)
        return gram(xf, 1.0 / m)

    @staticmethod
    def h_bar(h: Tensor) -> Tensor:
        return h.reshape(-1, h.shape[-1]).mean(0)

    @staticmethod
    def Dh_bar(g: Tensor, batch_size: int, reduction: str = "mean") -> Tensor:
        gf = g.reshape(-1, g.shape[-1])
        locs = gf.shape[0] // g.shape[0]
        scale = 1.0 / locs if reduction == "mean" else 1.0 / (locs * batch_size)
        return gf.sum(0) * scale


def _padding(module: nn.Conv2d) -> tuple[int, int]:
    if isinstance(module.padding, str):  # "same" / "valid": such layers are demoted
        raise ValueError(f"string padding {module.padding!r} is not supported")
    return module.padding[0], module.padding[1]


class Conv2dHelper(KroneckerHelper):
    """``nn.Conv2d`` (groups 1, zero padding): ``a_t`` is the unfolded patch of location ``t``."""

    is_conv = True

    @property
    def conv(self) -> nn.Conv2d:
        """The bound module, typed as what it is."""
        return cast(nn.Conv2d, self.module)

    def _geometry(self) -> dict:
        m = self.conv
        return {"stride": m.stride, "padding": m.padding, "dilation": m.dilation}

    def locations(self, h: Tensor) -> int:
        return h.shape[-1] * h.shape[-2]

    def _taps(self, x: Tensor) -> tuple[Tensor, list[tuple[slice, slice]], int, int]:
        """The zero-padded input and, for every kernel tap ``(i, j)`` (row-major, the order of
        the weight's last two dims), the strided window of padded positions that the tap reads
        at the ``Ho x Wo`` output locations: ``a_t`` of location ``t = (ho, wo)`` holds
        ``x_pad[:, c, win_i(ho), win_j(wo)]`` for every channel ``c`` and tap."""
        module = self.conv
        kh, kw = module.kernel_size
        (sh, sw), (ph, pw), (dh, dw) = module.stride, _padding(module), module.dilation
        ho, wo = self.out_size(x)
        xp = F.pad(x, (pw, pw, ph, ph)) if (ph or pw) else x
        wins = [(slice(i * dh, i * dh + sh * (ho - 1) + 1, sh),
                 slice(j * dw, j * dw + sw * (wo - 1) + 1, sw))
                for i in range(kh) for j in range(kw)]
        return xp, wins, ho, wo

    def a_bar(self, x: Tensor) -> Tensor:
        """``E_n mean_t a_t``: per tap, the mean of the batch-summed padded input over that
        tap's window (no patches are formed)."""
        m = x.shape[0]
        xp, wins, ho, wo = self._taps(x.sum(0, keepdim=True))
        cols = torch.stack([xp[0, :, wi, wj].sum(dim=(1, 2)) for wi, wj in wins], dim=1)
        return _with_one(cols.reshape(-1) / (m * ho * wo), self.has_bias)

    def out_size(self, x: Tensor) -> tuple[int, int]:
        module = self.conv
        padding = _padding(module)
        sizes = []
        for i in range(2):
            k, s, p, d = (module.kernel_size[i], module.stride[i], padding[i],
                          module.dilation[i])
            sizes.append((x.shape[2 + i] + 2 * p - d * (k - 1) - 1) // s + 1)
        return sizes[0], sizes[1]

    def A_s(self, x: Tensor, s: Tensor) -> Tensor:
        """``E_n sum_t (a_t^T s) a_t`` with matrix products on the padded input, no patches:
        ``Y = S^T X`` (``S`` = s as channels x taps, ``X`` = the padded input as
        channels x positions, per sample), ``z_t = a_t^T s`` = the sum over taps of ``Y``'s
        tap row read through the tap's window, then ``Z`` = ``z`` written back through every
        tap's window and ``A s = sum_n X Z^T``. Both products are 1/out_channels of the
        layer's own; one-output-channel convolutions (slow in oneDNN) are avoided."""
        module = self.conv
        m, c = x.shape[0], x.shape[1]
        kh, kw = module.kernel_size
        bias = self.has_bias
        k = c * kh * kw
        S = s[:k].to(x.dtype).view(c, kh * kw)
        out = x.new_zeros(c, kh * kw)
        z_sum = x.new_zeros(())
        # samples in chunks: Y and Z take taps x padded positions per sample
        ph, pw = _padding(module)
        per_sample = kh * kw * (x.shape[2] + 2 * ph) * (x.shape[3] + 2 * pw)
        chunk = max(1, _TAP_CHUNK // max(1, per_sample))
        for i in range(0, m, chunk):
            xp, wins, _, _ = self._taps(x[i:i + chunk])
            n, hp, wp = xp.shape[0], xp.shape[2], xp.shape[3]
            X = xp.reshape(n, c, hp * wp)
            Y = torch.matmul(S.t(), X).view(n, kh * kw, hp, wp)
            z = Y[:, 0, wins[0][0], wins[0][1]].clone()
            for t, (wi, wj) in enumerate(wins[1:], 1):
                z.add_(Y[:, t, wi, wj])
            if bias:
                z.add_(s[k].to(x.dtype))
                z_sum = z_sum + z.sum()
            Z = Y.new_zeros(n, kh * kw, hp, wp)
            for t, (wi, wj) in enumerate(wins):
                Z[:, t, wi, wj] = z
            out += torch.matmul(X, Z.view(n, kh * kw, hp * wp).mT).sum(0)
        out = out.reshape(-1) / m
        return torch.cat([out, (z_sum / m).reshape(1)]) if bias else out

    def unfold(self, x: Tensor) -> Tensor:
        """``(m, |T|, J|Delta| [+1])`` patches (for explicit A only)."""
        cols = F.unfold(x, self.conv.kernel_size, **self._geometry()).transpose(1, 2)
        if self.has_bias:
            cols = torch.cat([cols, cols.new_ones(cols.shape[0], cols.shape[1], 1)], dim=2)
        return cols

    def A(self, x: Tensor) -> Tensor:
        """``E_n sum_t a_t a_t^T``, the patches unfolded in chunks of samples."""
        m = x.shape[0]
        ho, wo = self.out_size(x)
        n = self.dims()[1]
        per_sample = max(1, ho * wo * n)
        chunk = max(1, _UNFOLD_CHUNK // per_sample)
        out = x.new_zeros(n, n)
        for i in range(0, m, chunk):
            cols = self.unfold(x[i:i + chunk]).reshape(-1, n)
            out.addmm_(cols.mT, cols, alpha=1.0 / m)
        return out

    @staticmethod
    def h_bar(h: Tensor) -> Tensor:
        return h.mean(dim=(0, 2, 3))

    @staticmethod
    def Dh_bar(g: Tensor, batch_size: int, reduction: str = "mean") -> Tensor:
        locs = g.shape[2] * g.shape[3]
        scale = 1.0 / locs if reduction == "mean" else 1.0 / (locs * batch_size)
        return g.sum(dim=(0, 2, 3)) * scale


_REGISTRY: dict[type, type[KroneckerHelper]] = {
    nn.Linear: LinearHelper,
    nn.Conv2d: Conv2dHelper,
}


def unsupported_reason(module: nn.Module) -> str | None:
    """Why a Linear/Conv2d cannot be a Kronecker layer, or ``None`` when it can."""
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"groups={module.groups}"
        if module.padding_mode != "zeros":
            return f"padding_mode={module.padding_mode!r}"
        if isinstance(module.padding, str):
            return f"padding={module.padding!r}"
    return None


def bind_helper(module: nn.Module) -> KroneckerHelper:
    """The helper of a supported module (:func:`helper_for`), bound to it."""
    cls = helper_for(module)
    if cls is None:
        raise ValueError(f"{type(module).__name__} is not a Kronecker-factored layer")
    return cls(module)


def helper_for(module: nn.Module) -> type[KroneckerHelper] | None:
    """The helper for a module's exact type (subclasses included), or ``None``."""
    for cls in type(module).__mro__:
        if cls in _REGISTRY:
            return _REGISTRY[cls]
    return None
