"""The runner flushes subnormal floats to zero during a run (they slow CPU matrix products
some 20x: docs/results.md, "kbfgs-plus"), and restores torch's default afterwards."""

from __future__ import annotations

import torch

from kbfgs.experiments import trainer


def test_flush_denormal_flushes_inside_and_restores_after():
    tiny = torch.tensor([1e-40], dtype=torch.float32)  # subnormal in float32
    assert float(tiny * 1.0) != 0.0
    with trainer.flush_denormal() as supported:
        flushed = float(tiny * 1.0)
    assert float(tiny * 1.0) != 0.0  # torch's default again
    if supported:
        assert flushed == 0.0
