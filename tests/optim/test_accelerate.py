"""Hugging Face accelerate's gradient accumulation (``accelerator.accumulate``, ``backward``,
``optimizer.step()`` without a closure) with kbfgs-plus ``closure_free=True``: equal to the
plain loop on the whole batch. accelerate is an optional test dependency
(``pip install -e .[frameworks]``); without it this test is skipped."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kbfgs

accelerate = pytest.importorskip("accelerate")

DT = torch.float64


def _net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def test_accelerate_accumulation_equals_the_whole_batch():
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT))
            for _ in range(6)]

    def loss_fn(model, x, y):
        return 0.5 * (model(x) - y).pow(2).sum(1).mean()

    ref = _net()
    ref_opt = kbfgs.make_optimizer("kbfgs-plus", ref, lr=0.01, update_freq=2, closure_free=True)
    for x, y in data:
        ref_opt.zero_grad()
        loss_fn(ref, x, y).backward()
        ref_opt.step()

    acc = accelerate.Accelerator(gradient_accumulation_steps=2, cpu=True)
    model = _net()
    inner = kbfgs.make_optimizer("kbfgs-plus", model, lr=0.01, update_freq=2, closure_free=True)
    model, opt = acc.prepare(model, inner)
    for x, y in data:
        for xm, ym in zip(x.chunk(2), y.chunk(2)):
            with acc.accumulate(model):
                acc.backward(loss_fn(model, xm, ym))
                opt.step()
                opt.zero_grad()
    assert inner.steps == len(data) and inner.curvature_updates == ref_opt.curvature_updates == 2
    for a, b in zip(ref.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)
