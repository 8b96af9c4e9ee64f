"""Checkpoint files: safe loading (no code runs), atomic durable writes, one-line errors for
unusable files, and the run-id check before anything is loaded (issue 12, items 1 and 2)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch

from kbfgs.experiments import checkpoint, runner, trainer
from kbfgs.experiments import problems as P
from kbfgs.experiments.errors import RunnerError


def _spec(method="sgd-m", seed=1, **kw):
    problem = P.get_problem("curves-ae")
    hps = runner.resolve_hps(problem, method, None)
    kw.setdefault("epochs", 3)
    return runner.make_spec(problem, method, hps, seed, time_budget=None, lr_decay=None,
                            subset=40, batch_size=20, threads=1, checkpoint_every=1, **kw)


def _quiet(spec, out, **kw):
    return runner.run(spec, out, progress=False, echo=lambda s: None, **kw)


def _crash_after_first_epoch(spec, out, monkeypatch):
    """Run ``spec`` until it crashes before iteration 4 (after its epoch-1 checkpoint)."""
    monkeypatch.setenv("KBFGS_FAIL_AT_ITER", "3")
    with pytest.raises(RuntimeError, match="injected"):
        _quiet(spec, out)
    monkeypatch.delenv("KBFGS_FAIL_AT_ITER")
    path = runner.checkpoint_path(out, spec)
    assert path.exists()
    return path


class _Planted:
    """Unpickling this object creates the marker file (any code could run instead)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _plant(path: Path, marker: Path, kind: str) -> None:
    payload = {"model": {}, "optimizer": {}, "extra": {"x": _Planted(marker)}, "world_size": 1}
    if kind == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)


def _one_line_naming(e: pytest.ExceptionInfo, path: Path, *words: str) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


@pytest.mark.parametrize("kind", ["torch.save", "raw pickle"])
def test_a_planted_checkpoint_runs_no_code_and_the_run_refuses(tmp_path, kind):
    """A file placed as a run's ``OUT/<run id>.ckpt`` whose unpickling would create a marker:
    the marker never appears, the run refuses with one line naming the file and ``--force``,
    and ``--force`` then discards it and runs."""
    spec = _spec()
    out = tmp_path / "out"
    out.mkdir()
    marker = tmp_path / "MARKER"
    ckpt = runner.checkpoint_path(out, spec)
    _plant(ckpt, marker, kind)
    with pytest.raises(RunnerError) as e:
        _quiet(spec, out)
    _one_line_naming(e, ckpt, "--force")
    assert not marker.exists()
    assert ckpt.exists() and not runner.result_path(out, spec).exists()  # left as it was
    # the public API refuses it too
    model = P.get_problem("curves-ae").build_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_checkpoint(ckpt, model, opt)
    assert not marker.exists()
    res, ran = _quiet(spec, out, force=True)
    assert ran and "resumed" not in res and not ckpt.exists() and not marker.exists()


def test_unusable_checkpoints_give_one_line_errors_before_any_loading(tmp_path, monkeypatch):
    """Zero-byte, truncated and foreign files, and a checkpoint of another run: one line that
    names the file and says how to proceed; nothing is loaded into the model."""
    spec = _spec()
    out = tmp_path / "out"
    real = _crash_after_first_epoch(spec, out, monkeypatch)
    good = real.read_bytes()
    loaded = []
    real_apply = checkpoint.apply_checkpoint

    def spy(*a, **kw):
        loaded.append(1)
        return real_apply(*a, **kw)

    monkeypatch.setattr(checkpoint, "apply_checkpoint", spy)
    cases = {
        "empty": (b"", "empty"),
        "truncated": (good[: len(good) // 2], "truncated or corrupt"),
        "foreign text": (b'{"not": "a checkpoint"}\n', "cannot be loaded"),
    }
    for content, words in cases.values():
        real.write_bytes(content)
        with pytest.raises(RunnerError) as e:
            _quiet(spec, out)
        _one_line_naming(e, real, words, "--force")
    torch.save({"weights": torch.ones(3)}, real)  # a torch file, not a kbfgs checkpoint
    with pytest.raises(RunnerError) as e:
        _quiet(spec, out)
    _one_line_naming(e, real, "not a kbfgs checkpoint", "--force")
    # another run's checkpoint (another method: its optimizer state would not even load)
    other = _spec("adam", seed=5)
    other_ckpt = _crash_after_first_epoch(other, tmp_path / "other", monkeypatch)
    other_ckpt.replace(real)
    with pytest.raises(RunnerError) as e:
        _quiet(spec, out)
    _one_line_naming(e, real, "belongs to run", other.run_id(), "--force")
    assert loaded == []  # the model was never touched
    res, ran = _quiet(spec, out, force=True)
    assert ran and "resumed" not in res


def test_checkpoint_is_fsynced_before_the_rename(tmp_path, monkeypatch):
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace",
                        lambda a, b: (events.append(f"replace {Path(b).name}"),
                                      real_replace(a, b))[1])
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    checkpoint.save_checkpoint(tmp_path / "c.ckpt", model, opt, {"step": 3})
    assert events[:2] == ["fsync", "replace c.ckpt"], events
    assert [p.name for p in tmp_path.iterdir()] == ["c.ckpt"]  # no temporary file left
    model2 = torch.nn.Linear(3, 2)
    assert checkpoint.load_checkpoint(tmp_path / "c.ckpt", model2, opt) == {"step": 3}
    assert torch.equal(model2.weight, model.weight)


@pytest.mark.parametrize("method", P.METHODS)
def test_every_methods_runner_checkpoint_loads_with_weights_only(tmp_path, monkeypatch,
                                                                method):
    """The runner's own checkpoints (optimizer state, RNG states, the log with optimizer
    statistics, numbers, lists, dicts) load with ``torch.load(weights_only=True)``."""
    spec = _spec(method, epochs=2)
    path = _crash_after_first_epoch(spec, tmp_path, monkeypatch)
    state = torch.load(path, weights_only=True)
    extra = state["extra"]
    assert extra["run_id"] == spec.run_id() and extra["it"] == 2
    assert set(trainer.TrainState.KEYS) <= set(extra)
    res, ran = _quiet(spec, tmp_path)
    assert ran and res["resumed"][0]["iter"] == 2 and res["final"]["iterations"] == 4


def test_train_state_round_trip():
    """TrainState.state_dict / load_state_dict restore every field and the generators."""
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(4)
    st = trainer.TrainState(g_order=g1, g_aug=g2, base_lrs=[0.1, 0.2], it=7, eval_time=1.5,
                            warm_time=0.25, next_eval=9.0, nonfinite=2, last_loss=0.5,
                            running=[1.0, 2.0], log=[{"iter": 0}], resumed=[{"iter": 3}])
    st.clock.process, st.clock.wall = 4.0, 5.0
    saved = st.state_dict()
    expected_order = torch.randperm(10, generator=g1)
    fresh = trainer.TrainState(g_order=torch.Generator(), g_aug=torch.Generator(),
                               base_lrs=[])
    fresh.load_state_dict(saved)
    assert (fresh.it, fresh.eval_time, fresh.warm_time, fresh.next_eval, fresh.nonfinite,
            fresh.last_loss, fresh.running, fresh.log, fresh.resumed, fresh.base_lrs,
            fresh.clock.process, fresh.clock.wall) == (7, 1.5, 0.25, 9.0, 2, 0.5, [1.0, 2.0],
                                                       [{"iter": 0}], [{"iter": 3}],
                                                       [0.1, 0.2], 4.0, 5.0)
    assert torch.equal(torch.randperm(10, generator=fresh.g_order), expected_order)
    assert set(saved) == set(trainer.TrainState.KEYS)
    with pytest.raises(KeyError, match="nonfinite"):
        fresh.load_state_dict({k: v for k, v in saved.items() if k != "nonfinite"})
