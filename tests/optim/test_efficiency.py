"""Efficiency is part of correctness (issue 2, point 3): checks of what runs, not of timings."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kbfgs
from kbfgs import capture as capture_mod


def _cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2, bias=False), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 4 * 4, 5),
    )


def _closure(model, opt, x, y, seen=None):
    def closure():
        if seen is not None:
            seen.append(sum(len(m._forward_hooks) for m in model.modules()))
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss
    return closure


def test_no_hooks_on_iterations_without_curvature_update():
    model = _cnn()
    opt = kbfgs.KBFGS(model, lr=0.01, damping=1.0, update_freq=3)
    x, y = torch.randn(6, 2, 9, 9), torch.randint(0, 5, (6,))
    for k in range(1, 8):
        seen: list[int] = []
        opt.step(_closure(model, opt, x, y, seen))
        if k % 3 == 0:
            assert seen[0] == 3 and seen[1] == 3  # both passes of a curvature step are recorded
        elif k == 1:
            # the one-time probe of |T| and module reuse, and the one-time watch for layers
            # that feed a BatchNorm (a forward hook per layer; the pre-hook is not counted)
            assert seen == [6]
        else:
            assert seen == [0], f"step {k}: hooks registered on a step without curvature update"
    assert all(len(m._forward_hooks) == 0 for m in model.modules())


def test_conv_A_s_never_unfolds_the_batch(monkeypatch):
    model = _cnn()
    opt = kbfgs.KBFGS(model, lr=0.01, damping=1.0)

    def forbidden(*args, **kwargs):
        raise AssertionError("F.unfold called during a K-BFGS step")

    monkeypatch.setattr(F, "unfold", forbidden)
    x, y = torch.randn(6, 2, 9, 9), torch.randint(0, 5, (6,))
    for _ in range(3):
        opt.step(_closure(model, opt, x, y))
    assert opt.curvature_updates == 3


def test_only_vectors_outlive_the_hooks(monkeypatch):
    """Every tensor kept in a record is at most 1-D, and the layer inputs are freed."""
    model = _cnn()
    opt = kbfgs.KBFGS(model, lr=0.01, damping=1.0)
    kept: list[capture_mod.LayerRecord] = []
    inputs: list[weakref.ref] = []
    original = capture_mod.Capture._pass

    def spy(self, *args, **kwargs):
        cm = original(self, *args, **kwargs)

        class Wrapper:
            def __enter__(self_inner):
                recs = cm.__enter__()
                kept.append(recs)
                return recs

            def __exit__(self_inner, *exc):
                return cm.__exit__(*exc)
        return Wrapper()

    monkeypatch.setattr(capture_mod.Capture, "_pass", spy)  # every recording goes through it
    hook = model[3].register_forward_pre_hook(lambda m, a: inputs.append(weakref.ref(a[0])))
    x, y = torch.randn(6, 2, 9, 9), torch.randint(0, 5, (6,))
    opt.step(_closure(model, opt, x, y))
    hook.remove()
    gc.collect()
    assert kept, "no recording pass ran"
    for recs in kept:
        for rec in recs.values():
            for name in ("a_bar", "s_A", "A_s", "h_bar", "Dh_bar"):
                t = getattr(rec, name)
                assert t is None or t.dim() == 1, f"{name} has shape {tuple(t.shape)}"
    assert inputs and all(r() is None for r in inputs), "a layer input outlived the step"


@pytest.mark.parametrize("history", [None, 3])
def test_extra_pass_computes_no_parameter_gradients(history):
    """The extra pass needs only output gradients: no weight gradient is accumulated in it."""
    model = _cnn()
    opt = kbfgs.KBFGS(model, lr=0.01, damping=1.0, history=history)
    x, y = torch.randn(6, 2, 9, 9), torch.randint(0, 5, (6,))
    grads_required: list[list[bool]] = []

    def closure():
        grads_required.append([p.requires_grad for p in model.parameters()])
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    assert all(grads_required[0]) and not any(grads_required[1])
    assert all(p.requires_grad for p in model.parameters())
    assert all(p.grad is None for p in model.parameters())  # zero_grad(set_to_none) in pass 2
