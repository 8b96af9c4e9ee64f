"""The runner's process helpers (kbfgs.experiments.launch) and what docs/distributed.md tells
users about launching on several nodes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kbfgs import distributed
from kbfgs.experiments import launch

DOCS = Path(__file__).resolve().parents[2] / "docs" / "distributed.md"


def test_single_process_helpers_are_identities():
    t = torch.arange(6)
    assert launch.shard(t) is t and launch.shard(None) is None
    assert launch.shard_dataset(t) is t
    assert launch.agree(True) is True and launch.broadcast_object({"a": 1}) == {"a": 1}
    assert launch.is_main_process()
    launch.barrier()
    with launch.launch("cpu") as world:
        assert world == 1 and distributed.world_size() == 1


def test_rank_seed_keeps_rank_0_and_differs_per_rank():
    assert launch.rank_seed(7, 0) == 7
    seeds = {launch.rank_seed(7, r) for r in range(1, 9)}
    assert len(seeds) == 8 and 7 not in seeds
    assert launch.rank_seed(7, 3) == launch.rank_seed(7, 3) != launch.rank_seed(8, 3)
    assert all(0 <= s < 2**63 for s in seeds)


@pytest.mark.parametrize("raw", ["abc", "0", "-3", "nan", "inf"])
def test_bad_timeout_names_the_variable(monkeypatch, raw):
    monkeypatch.setenv(launch.ENV_TIMEOUT, raw)
    with pytest.raises(ValueError, match=f"{launch.ENV_TIMEOUT} must be a finite number"):
        launch.timeout_seconds()
    monkeypatch.setenv(launch.ENV_TIMEOUT, "12.5")
    assert launch.timeout_seconds() == 12.5


def test_runner_helpers_left_kbfgs_distributed():
    """Issue 10: distributed.py keeps the collectives; launching, sharding, seeding and
    checkpoint files live in kbfgs.experiments."""
    for name in ("launch", "prepare_model", "rank_seed", "shard", "shard_dataset", "agree",
                 "broadcast_object", "barrier", "timeout_seconds", "save_checkpoint",
                 "load_checkpoint", "ENV_TIMEOUT", "ENV_SYNC_BN"):
        assert not hasattr(distributed, name), name


def test_docs_warn_that_the_rendezvous_store_is_unauthenticated():
    text = " ".join(DOCS.read_text().split())
    assert "not authenticated" in text and "all interfaces" in text
    assert "--rdzv-endpoint" in text and "--master-addr" in text
    assert "private" in text
