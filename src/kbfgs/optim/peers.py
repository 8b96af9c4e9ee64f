"""The peers: optimizers people pick today, next to the paper's methods (docs/api.md, "Peers").

* :class:`MuonAdamW` (``make_optimizer("muon", ...)``): ``torch.optim.Muon``'s update on the
  hidden matrix weights, ``torch.optim.AdamW`` on every other parameter, as Muon's authors
  prescribe ("Muon should only be used for hidden weight layers. The input embedding, final
  output layer, and any internal gains or biases should be optimized using a standard method
  such as AdamW"; hidden convolution filters are flattened to ``(out, in * kh * kw)``).
* ``soap`` and ``shampoo``: ``SOAP`` and ``ScalableShampoo`` of the ``pytorch-optimizer``
  package (``pip install 'kbfgs[peers]'``), unchanged, with the non-finite step skip.

Every peer skips a step whose loss or gradient is not finite, like the paper's methods
(:class:`~kbfgs.optim.first_order.SkipNonFinite`).

Newton-Schulz precision: ``torch.optim.Muon`` orthogonalises in bfloat16, which a GPU does fast
and a CPU about 3x slower than float32. ``ns_dtype="auto"`` keeps torch's bfloat16 on CUDA and
uses float32 elsewhere; :func:`newton_schulz` is torch's iteration with only the dtype chosen
(equal to torch's function bit for bit in bfloat16, see tests/optim/test_peers.py).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn

from ..distributed import unwrap_model
from .base import momentum_buffers
from .first_order import SkipNonFinite
from .validation import check_choice, check_int, check_number

__all__ = [
    "MuonAdamW",
    "make_shampoo",
    "make_soap",
    "muon_partition",
    "newton_schulz",
    "ns_dtype_for",
]

_NS_DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16,
              "float64": torch.float64}
_MATRIX_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


# ---------------------------------------------------------------------------------------------
# Muon
# ---------------------------------------------------------------------------------------------


def ns_dtype_for(device: torch.device, ns_dtype: str = "auto") -> torch.dtype:
    """The dtype of the Newton-Schulz iteration: torch's bfloat16 on CUDA, float32 on any other
    device, unless ``ns_dtype`` names one."""
    fixed = _NS_DTYPES[ns_dtype]
    if fixed is not None:
        return fixed
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int,
                  eps: float, dtype: torch.dtype) -> Tensor:
    """``torch.optim._muon._zeropower_via_newtonschulz`` with the iteration run in ``dtype``
    (torch hard-codes bfloat16): the quintic iteration ``X <- a X + (b A + c A^2) X``,
    ``A = X X^T``, on ``grad / ||grad||_F`` (transposed so that ``X X^T`` is the smaller Gram
    matrix), ``ns_steps`` times."""
    if grad.ndim != 2:
        raise ValueError(f"Newton-Schulz needs a matrix, got shape {tuple(grad.shape)}")
    a, b, c = ns_coefficients
    x = grad.to(dtype)
    tall = grad.size(0) > grad.size(1)
    if tall:
        x = x.T
    x = x.div(x.norm().clamp(min=eps))
    for _ in range(ns_steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        x = torch.addmm(x, poly, x, beta=a)
    return x.T if tall else x


@contextlib.contextmanager
def _ns_precision(dtype: torch.dtype) -> Iterator[None]:
    """Run ``torch.optim.Muon``'s step with :func:`newton_schulz` in ``dtype`` (torch's own
    function, untouched, when ``dtype`` is bfloat16)."""
    if dtype == torch.bfloat16:
        yield
        return
    from torch.optim import _muon

    original = _muon._zeropower_via_newtonschulz

    def ns(grad: Tensor, coefficients: tuple[float, float, float], steps: int,
           eps: float) -> Tensor:
        return newton_schulz(grad, coefficients, steps, eps, dtype)

    # called positionally by torch's Muon: only the parameter names differ
    _muon._zeropower_via_newtonschulz = ns  # type: ignore[assignment]
    try:
        yield
    finally:
        _muon._zeropower_via_newtonschulz = original


def muon_partition(model: nn.Module, hidden_only: bool = True
                   ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(Muon's parameters, AdamW's parameters) of ``model`` (trainable ones only).

    Muon gets the weights of ``nn.Linear`` and ``nn.Conv1d/2d/3d`` layers, in module order;
    with ``hidden_only`` (Muon's recommendation) not those of the first and the last such layer
    (the input and output layers). AdamW gets everything else: biases, normalisation gains,
    embeddings, other parameters, and the input/output layers' weights.
    """
    model = unwrap_model(model)
    layers = [m for m in model.modules() if isinstance(m, _MATRIX_LAYERS)
              and isinstance(m.weight, Tensor) and m.weight.requires_grad]
    if hidden_only:
        layers = layers[1:-1]
    chosen = {id(m.weight) for m in layers}
    muon: list[nn.Parameter] = []
    rest: list[nn.Parameter] = []
    seen: set[int] = set()
    for p in model.parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (muon if id(p) in chosen else rest).append(p)
    return muon, rest


def _as_matrix(t: Tensor) -> Tensor:
    """The 2-D view ``(out, in * kh * kw)`` of a weight (no copy; itself if already 2-D)."""
    return t if t.ndim == 2 else t.view(t.shape[0], -1)


class MuonAdamW(SkipNonFinite, torch.optim.Optimizer):
    """Muon (``torch.optim.Muon``'s update) on the hidden matrix weights, AdamW on the rest.

    Args:
        model: the model (or a DDP wrapper of it).
        lr: the learning rate of both parts (``adamw_lr`` overrides AdamW's). With the default
            ``adjust_lr="match_rms_adamw"`` Muon's update of an ``A x B`` matrix is scaled by
            ``0.2 sqrt(max(A, B))`` so that its RMS matches AdamW's and one learning rate
            serves both (Liu et al. 2025, "Muon is Scalable for LLM Training"); ``"original"``
            is Keller Jordan's ``sqrt(max(1, A / B))``.
        momentum: Muon's momentum (0.95, Nesterov).
        weight_decay: decoupled weight decay of both parts (``W -= lr wd W``).
        betas, eps: AdamW's (0.9, 0.95) and 1e-8, as Muon's reference code uses for the rest.
        ns_steps: Newton-Schulz iterations (5).
        ns_dtype: ``"auto"`` (bfloat16 on CUDA as torch, float32 elsewhere), ``"float32"``,
            ``"bfloat16"`` or ``"float64"``.
        hidden_only: leave the first and last matrix layer to AdamW (Muon's recommendation;
            False puts every Linear / Conv weight in Muon).

    Conv weights ``(out, in, kh, kw)`` are orthogonalised as the matrix ``(out, in kh kw)``,
    as Muon's reference implementation does. ``param_groups[0]`` is Muon's group (its
    ``"use_muon"`` is True), ``param_groups[1]`` AdamW's; a learning-rate schedule that scales
    every group's ``"lr"`` scales both.
    """

    def __init__(self, model: nn.Module, lr: float, *, adamw_lr: float | None = None,
                 momentum: float = 0.95, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8,
                 ns_steps: int = 5, ns_dtype: str = "auto", hidden_only: bool = True,
                 adjust_lr: str = "match_rms_adamw", check_finite: bool = True) -> None:
        if not hasattr(torch.optim, "Muon"):
            raise ImportError(f"muon needs torch >= 2.9 (torch.optim.Muon); this is torch "
                              f"{torch.__version__}")
        check_number("lr", lr, 0.0)
        check_number("adamw_lr", lr if adamw_lr is None else adamw_lr, 0.0)
        check_number("momentum", momentum, 0.0, high=1.0)
        check_number("weight_decay", weight_decay, 0.0)
        check_number("eps", eps, 0.0, strict=True)
        check_int("ns_steps", ns_steps, 1)
        check_choice("ns_dtype", ns_dtype, _NS_DTYPES)
        check_choice("adjust_lr", adjust_lr, ("match_rms_adamw", "original"))
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        for i, b in enumerate(betas):
            check_number(f"betas[{i}]", b, 0.0, high=1.0)
        muon, rest = muon_partition(model, hidden_only)
        if not muon and not rest:
            raise ValueError("MuonAdamW: the model has no trainable parameter")
        for p in muon:
            if not p.is_contiguous():
                raise ValueError(f"MuonAdamW: a matrix weight of shape {tuple(p.shape)} is not "
                                 "contiguous (channels_last?); Muon needs its (out, -1) view")
        # AdamW's group carries every key torch.optim.AdamW.step reads; it is shared (same dict,
        # same state) with the inner AdamW that computes the step.
        self._adamw = torch.optim.AdamW(rest or [torch.zeros(1)],
                                        lr=lr if adamw_lr is None else adamw_lr,
                                        betas=cast("tuple[float, float]", tuple(betas)), eps=eps,
                                        weight_decay=weight_decay)
        adamw_group = self._adamw.param_groups[0]
        adamw_group["use_muon"] = False
        adamw_group["params"] = rest
        muon_group = {"params": muon, "use_muon": True, "lr": lr, "momentum": momentum,
                      "weight_decay": weight_decay, "nesterov": True,
                      "ns_coefficients": (3.4445, -4.775, 2.0315), "eps": 1e-7,
                      "ns_steps": int(ns_steps), "ns_dtype": ns_dtype, "adjust_lr_fn": adjust_lr}
        super().__init__([muon_group, adamw_group], {})
        self._link_adamw()
        self._init_counters(check_finite)

    def _link_adamw(self) -> None:
        self._adamw.param_groups = [self.param_groups[1]]
        self._adamw.state = self.state

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss, ok = self._run_closure(closure)
        if ok:
            self._muon_step(self.param_groups[0])
            if self.param_groups[1]["params"]:
                self._adamw.step()
            self.steps += 1
        return loss

    @torch.no_grad()
    def _muon_step(self, group: dict[str, Any]) -> None:
        from torch.optim import _muon

        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        bufs = momentum_buffers(self.state, params)
        dtype = ns_dtype_for(params[0].device, group["ns_dtype"])
        with _ns_precision(dtype):
            _muon.muon([_as_matrix(p) for p in params], [_as_matrix(p.grad) for p in params],
                       [_as_matrix(b) for b in bufs], lr=group["lr"],
                       weight_decay=group["weight_decay"], momentum=group["momentum"],
                       nesterov=group["nesterov"], ns_coefficients=group["ns_coefficients"],
                       ns_steps=group["ns_steps"], eps=group["eps"],
                       adjust_lr_fn=group["adjust_lr_fn"], has_complex=False)

    def newton_schulz_dtype(self) -> str:
        """The dtype the Newton-Schulz iteration runs in on this optimizer's device."""
        params = self.param_groups[0]["params"]
        device = params[0].device if params else torch.device("cpu")
        return str(ns_dtype_for(device, self.param_groups[0]["ns_dtype"])).replace("torch.", "")

    def stats(self, condition: bool = True) -> dict[str, Any]:
        return {**super().stats(condition), "newton_schulz_dtype": self.newton_schulz_dtype(),
                "muon_params": len(self.param_groups[0]["params"]),
                "adamw_params": len(self.param_groups[1]["params"])}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link_adamw()


# ---------------------------------------------------------------------------------------------
# SOAP and Shampoo from pytorch-optimizer
# ---------------------------------------------------------------------------------------------


def _pytorch_optimizer() -> Any:
    try:
        import pytorch_optimizer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the peers 'soap' and 'shampoo' need the pytorch-optimizer package: "
                          "pip install 'kbfgs[peers]' (or pip install pytorch-optimizer)"
                          ) from exc
    return pytorch_optimizer


_SKIPPING: dict[type, type] = {}


def _with_skip(cls: type) -> type:
    """``cls`` (a torch optimizer) with the non-finite step skip and the step counters."""
    if cls not in _SKIPPING:
        base: Any = cls  # a torch optimizer class: its __init__ and step take these arguments

        def __init__(self: Any, params: Any, *, check_finite: bool = True, **kw: Any) -> None:
            base.__init__(self, params, **kw)
            self._init_counters(check_finite)

        def step(self: Any, closure: Callable[[], Any] | None = None) -> Any:
            loss, ok = self._run_closure(closure)
            if ok:
                base.step(self)
                self.steps += 1
            return loss

        _SKIPPING[cls] = type(cls.__name__, (SkipNonFinite, cls), {
            "__init__": __init__, "step": step, "__module__": __name__,
            "__doc__": f"``{cls.__module__}.{cls.__name__}`` with the non-finite step skip."})
    return _SKIPPING[cls]


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in unwrap_model(model).parameters() if p.requires_grad]


def make_soap(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
              betas: tuple[float, float] = (0.95, 0.95), precondition_frequency: int = 10,
              check_finite: bool = True) -> torch.optim.Optimizer:
    """SOAP (Vyas et al. 2024: Adam in Shampoo's eigenbasis), ``pytorch_optimizer.SOAP``.

    ``betas`` and ``precondition_frequency`` are the authors' defaults; ``weight_decay`` is
    decoupled (0 here, as the paper's autoencoders; the library's default is 0.01).
    """
    check_number("lr", lr, 0.0)
    check_number("weight_decay", weight_decay, 0.0)
    check_int("precondition_frequency", precondition_frequency, 1)
    cls = _with_skip(_pytorch_optimizer().SOAP)
    return cls(_trainable(model), lr=lr, weight_decay=weight_decay, betas=tuple(betas),
               precondition_frequency=int(precondition_frequency), check_finite=check_finite)


def _shampoo_base() -> type:
    po = _pytorch_optimizer()
    return po.ScalableShampoo


class _ShampooState:
    """``ScalableShampoo`` keeps Python objects in its state (a ``PreConditioner`` and a graft
    per parameter); ``state_dict`` turns them into their tensors, ``load_state_dict`` rebuilds
    them, so that a checkpoint holds tensors only (``torch.load(weights_only=True)``)."""

    _OBJECT_TENSORS: ClassVar[dict[str, tuple[str, ...]]] = {
        "pre_conditioner": ("statistics", "pre_conditioners"),
        "graft": ("momentum", "statistics"),
    }
    # set by torch.optim.Optimizer and ScalableShampoo.__init__ (this class is mixed into it)
    param_groups: list[dict[str, Any]]
    state: dict[Tensor, dict[str, Any]]
    inverse_exponent_override: int
    block_size: int
    skip_preconditioning_rank_lt: int
    no_preconditioning_for_layers_with_dim_gt: int
    shape_interpretation: bool
    pre_conditioner_type: int
    matrix_eps: float
    use_svd: bool
    graft_type: int
    diagonal_eps: float

    def state_dict(self) -> dict[str, Any]:
        sd = super().state_dict()  # type: ignore[misc]  # mixin: ScalableShampoo has it
        state = {}
        for k, st in sd["state"].items():
            st = dict(st)
            for key, attrs in self._OBJECT_TENSORS.items():
                if key in st:
                    obj = st[key]
                    st[key] = {a: getattr(obj, a) for a in attrs if hasattr(obj, a)}
            state[k] = st
        return {**sd, "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        from pytorch_optimizer.optimizer.utils.graft import build_graft
        from pytorch_optimizer.optimizer.utils.preconditioner import PreConditioner

        super().load_state_dict(state_dict)  # type: ignore[misc]  # mixin: ScalableShampoo has it
        for group in self.param_groups:
            for p in group["params"]:
                st = self.state.get(p)
                if not st or not isinstance(st.get("pre_conditioner"), dict):
                    continue
                pc = PreConditioner(p, group["betas"][1], self.inverse_exponent_override,
                                    self.block_size, self.skip_preconditioning_rank_lt,
                                    self.no_preconditioning_for_layers_with_dim_gt,
                                    self.shape_interpretation, self.pre_conditioner_type,
                                    self.matrix_eps, self.use_svd)
                graft = build_graft(p, self.graft_type, self.diagonal_eps)
                for key, obj in (("pre_conditioner", pc), ("graft", graft)):
                    for attr, value in st[key].items():
                        setattr(obj, attr, value)
                st["pre_conditioner"], st["graft"] = pc, graft


def make_shampoo(model: nn.Module, lr: float, *, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999),
                 preconditioning_compute_steps: int = 20, start_preconditioning_step: int = 25,
                 block_size: int = 512, check_finite: bool = True) -> torch.optim.Optimizer:
    """Shampoo as Anil et al. (2020) scale it (blocks of ``block_size``, inverse roots every
    ``preconditioning_compute_steps`` steps, RMSProp grafting for the step size, Nesterov
    momentum), ``pytorch_optimizer.ScalableShampoo``.

    The inverse roots are computed by SVD (``use_svd=True``): the library's default coupled
    Schur-Newton iteration took over a minute per refresh of the MNIST autoencoder's 512-blocks
    on one CPU thread, the SVD about a second. ``preconditioning_compute_steps`` is 20 (the
    library's 1000 would refresh a few times in a 120 s run); the first
    ``start_preconditioning_step`` steps are the graft's (RMSProp).
    """
    check_number("lr", lr, 0.0)
    check_number("weight_decay", weight_decay, 0.0)
    check_int("preconditioning_compute_steps", preconditioning_compute_steps, 1)
    check_int("start_preconditioning_step", start_preconditioning_step, 0)
    check_int("block_size", block_size, 2)
    base = _shampoo_base()
    cls = _with_skip(_SHAMPOO.setdefault(base, type(base.__name__, (_ShampooState, base),
                                                    {"__module__": __name__})))
    from pytorch_optimizer.optimizer.utils.graft import LayerWiseGrafting

    graft = LayerWiseGrafting.RMSPROP
    return cls(_trainable(model), lr=lr, weight_decay=weight_decay, betas=tuple(betas),
               decoupled_weight_decay=True, graft_type=graft, use_svd=True,
               preconditioning_compute_steps=int(preconditioning_compute_steps),
               start_preconditioning_step=int(start_preconditioning_step),
               block_size=int(block_size), check_finite=check_finite)


_SHAMPOO: dict[type, type] = {}
