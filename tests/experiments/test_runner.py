"""Experiment runner: problems, result files, grid resume, report tables and figures."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch

from kbfgs.experiments import grid as grid_mod
from kbfgs.experiments import problems as P
from kbfgs.experiments import report as R
from kbfgs.experiments import rundata, runner, trainer

# ------------------------------------------------------------------------------------------
# Problems and defaults
# ------------------------------------------------------------------------------------------


def test_problem_names_and_bad_name():
    expected = {"mnist-ae", "faces-ae", "curves-ae", "fmnist-ae", "vgg16-cifar10",
                "resnet32-cifar10", "vgg16-cifar100", "resnet32-cifar100", "resnet32-fmnist"}
    assert set(P.PROBLEM_NAMES) == expected
    with pytest.raises(ValueError) as e:
        P.get_problem("mnist-autoencoder")
    msg = str(e.value)
    assert "mnist-autoencoder" in msg
    for name in expected:
        assert name in msg
    with pytest.raises(ValueError, match=r"valid methods: .*kbfgs.*sgd-m"):
        P.check_method("lbfgs")


def test_paper_defaults_table6_table8_and_update_freqs():
    curves = P.get_problem("curves-ae")
    assert curves.batch_size == 1000 and curves.time_budget == 500
    assert curves.defaults("kbfgs") == {"lr": 0.03, "damping": 0.3, "weight_decay": 0.0,
                                        "momentum": 0.9, "update_freq": 1}
    assert curves.defaults("kbfgs-t20")["update_freq"] == 20
    assert (curves.defaults("kbfgs-t20")["lr"], curves.defaults("kbfgs-t20")["damping"]) \
        == (0.3, 30)
    assert curves.defaults("kbfgs-l")["history"] == 100
    assert (curves.defaults("kbfgs-l")["lr"], curves.defaults("kbfgs-l")["damping"]) == (0.1, 3)
    kfac = curves.defaults("kfac")
    assert (kfac["stat_freq"], kfac["inv_freq"], kfac["likelihood"]) == (1, 20, "bernoulli")
    assert curves.defaults("adam") == {"lr": 1e-3, "damping": 1e-3, "weight_decay": 0.0}
    assert P.get_problem("faces-ae").defaults("kfac")["likelihood"] == "gaussian"
    assert P.get_problem("faces-ae").time_budget == 2000
    fm = P.get_problem("fmnist-ae")
    assert (fm.defaults("kbfgs")["lr"], fm.defaults("kbfgs")["damping"]) == (0.03, 1)
    assert (fm.defaults("adam")["lr"], fm.defaults("adam")["damping"]) == (1e-4, 1e-4)
    assert all(m in fm.hp_notes for m in fm.hps)  # every non-paper value says where it's from

    cnn = P.get_problem("resnet32-cifar10")
    assert cnn.batch_size == 128 and cnn.classifier and cnn.criterion == "max_val_acc"
    kb = cnn.defaults("kbfgs")
    assert (kb["lr"], kb["weight_decay"], kb["damping"], kb["update_freq"]) == (100, 1e-5, 1e3,
                                                                              20)
    kf = cnn.defaults("kfac")
    assert (kf["stat_freq"], kf["inv_freq"], kf["lr"], kf["damping"]) == (10, 100, 0.01, 0.01)
    assert cnn.schedule_for("kbfgs") == (150, 50, 0.1)
    assert cnn.schedule_for("sgd-m") == (200, 60, 0.1)
    assert P.get_problem("vgg16-cifar100").defaults("adam") == {"lr": 3e-4, "weight_decay": 1.0,
                                                                "damping": 0.01}
    # grids of Appendix D
    assert len(curves.grid("kbfgs")["lr"]) == 10 and len(curves.grid("kbfgs")["damping"]) == 7
    assert curves.grid("adam")["damping"] == (1e-8, 1e-4, 1e-3, 0.01, 0.1)
    assert set(cnn.grid("sgd-m")) == {"lr", "weight_decay"}


def test_resolve_hps_overrides_and_errors():
    curves = P.get_problem("curves-ae")
    hps = runner.resolve_hps(curves, "kbfgs", {"lr": 0.1, "damping": None})
    assert hps["lr"] == 0.1 and hps["damping"] == 0.3
    with pytest.raises(ValueError, match="takes no hyper-parameter"):
        runner.resolve_hps(curves, "sgd-m", {"damping": 1.0})
    cnn = P.get_problem("resnet32-cifar10")
    with pytest.raises(ValueError, match="--lr"):
        runner.resolve_hps(cnn, "kbfgs-20")
    hps = runner.resolve_hps(cnn, "kbfgs-20", {"lr": 1.0, "damping": 1.0})
    assert hps["update_freq"] == 20  # the CNN family setting


def test_default_budget():
    curves = P.get_problem("curves-ae")
    assert runner.default_budget(curves, "kbfgs", None, None) == (500.0, None, None)
    cnn = P.get_problem("resnet32-fmnist")
    assert runner.default_budget(cnn, "kfac", None, None) == (None, 150.0, (50.0, 0.1))
    assert runner.default_budget(cnn, "adam", None, 3) == (None, 3, (60.0, 0.1))
    assert runner.default_budget(cnn, "adam", None, 3, lr_decay_every=0) == (None, 3, None)
    with pytest.raises(ValueError):
        runner.default_budget(cnn, "adam", 10.0, 3)


# ------------------------------------------------------------------------------------------
# Runs and result files
# ------------------------------------------------------------------------------------------


def _spec(method="sgd-m", seed=1, subset=100, **kw):
    problem = P.get_problem(kw.pop("problem", "curves-ae"))
    hps = runner.resolve_hps(problem, method, kw.pop("hps", None))
    kw.setdefault("epochs", 2)
    kw.setdefault("time_budget", None)
    kw.setdefault("lr_decay", None)
    kw.setdefault("threads", 1)
    return runner.make_spec(problem, method, hps, seed, subset=subset, **kw)


def test_curves_subset_is_prefix_of_full_generator():
    from kbfgs.experiments.data import generate_curves

    assert torch.equal(generate_curves(300, 0)[:40], generate_curves(40, 0))


def test_result_file_has_reproducibility_fields(tmp_path):
    spec = _spec("kbfgs", seed=3, epochs=2)
    _res, ran = runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
    assert ran
    files = list(tmp_path.iterdir())
    assert [f.name for f in files] == [f"{spec.run_id()}.json"]  # no temporary file left
    saved = json.loads(files[0].read_text())
    assert saved["status"] == "finished"
    assert saved["problem"] == "curves-ae" and saved["method"] == "kbfgs"
    assert saved["seed"] == 3
    assert saved["hps"] == {"lr": 0.03, "damping": 0.3, "weight_decay": 0.0, "momentum": 0.9,
                            "update_freq": 1}
    env = saved["env"]
    assert env["torch"] == torch.__version__
    assert env["kbfgs"]
    assert env["device"] == "cpu"
    assert "commit" in env["git"]
    assert saved["spec"]["epochs"] == 2 and saved["spec"]["subset"] == 100
    assert "subset" in saved["data"]["note"]
    assert "100 samples" in saved["data"]["eval"] or "100 training" in saved["data"]["eval"]
    f = saved["final"]
    assert f["iterations"] == 2 and f["epochs"] == 2.0  # batch = min(1000, 100)
    assert f["train_loss"] > 0 and not f["diverged"]
    assert f["time_per_iter_s"] > 0
    log = saved["log"]
    assert log[0]["kind"] == "start" and log[0]["iter"] == 0
    assert [e["iter"] for e in log if e["kind"] == "epoch"] == [1, 2]
    assert "stats" in log[-1] and log[-1]["stats"]["steps"] == 2  # opt.stats() logged
    assert saved["stats"]["curvature_updates"] == 2


def test_time_budget_counts_training_process_time(tmp_path):
    spec = _spec("adam", time_budget=0.5, epochs=None, subset=500, batch_size=25,
                 eval_every=0.1)
    res, _ = runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
    f = res["final"]
    assert f["process_time_s"] >= 0.5
    assert f["process_time_s"] < 0.5 + 10 * f["time_per_iter_s"] + 0.5
    assert res["spec"]["time_budget"] == 0.5
    assert any(e["kind"] == "time" for e in res["log"])  # time points logged too
    # process time is non-decreasing over the log
    times = [e["process_time"] for e in res["log"]]
    assert times == sorted(times)


def test_warm_start_default_is_the_methods(tmp_path):
    """The paper's methods warm-start off the clock (Appendix D.1); kbfgs-plus, compared with
    the peers at equal process time, does not unless asked, and the run records which."""
    assert _spec("kbfgs").warm_start and _spec("kfac").warm_start
    assert not _spec("kbfgs-plus").warm_start and not _spec("kbfgs-plus-extra").warm_start
    assert _spec("kbfgs-plus", warm_start=True).warm_start
    assert not _spec("kbfgs", warm_start=False).warm_start
    assert _spec("kbfgs-plus").run_id() != _spec("kbfgs-plus", warm_start=True).run_id()
    for method, warm in (("kbfgs", True), ("kbfgs-plus", False)):
        res, _ = runner.run(_spec(method, epochs=0.5), tmp_path, progress=False,
                            echo=lambda s: None)
        assert res["stats"]["warm_started"] is warm
        assert (res["final"]["warm_start_process_s"] > 0) is warm


def test_lr_decay_and_rerun_skips(tmp_path):
    spec = _spec("sgd-m", epochs=4, lr_decay=(2.0, 0.1), subset=50)
    res, ran = runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
    assert ran
    lrs = {e["iter"]: e["lr"] for e in res["log"] if e["kind"] == "epoch"}
    assert lrs[1] == pytest.approx(0.003) and lrs[2] == pytest.approx(0.003)
    assert lrs[3] == pytest.approx(0.0003) and lrs[4] == pytest.approx(0.0003)
    path = runner.result_path(tmp_path, spec)
    mtime = path.stat().st_mtime_ns
    msgs = []
    res2, ran2 = runner.run(spec, tmp_path, progress=False, echo=msgs.append)
    assert not ran2 and "skip" in msgs[0]
    assert path.stat().st_mtime_ns == mtime
    assert res2["run_id"] == res["run_id"]


def test_threads_restored_after_a_run(tmp_path):
    before = torch.get_num_threads()
    res, _ = runner.run(_spec("sgd-m", epochs=1, threads=1), tmp_path, progress=False,
                        echo=lambda s: None)
    assert res["env"]["torch_threads"] == 1
    assert torch.get_num_threads() == before


def test_seeds_reproducible_and_distinct(tmp_path):
    a, _ = runner.run(_spec("sgd-m", seed=1, epochs=2), tmp_path / "a", progress=False,
                      echo=lambda s: None)
    b, _ = runner.run(_spec("sgd-m", seed=1, epochs=2), tmp_path / "b", progress=False,
                      echo=lambda s: None)
    c, _ = runner.run(_spec("sgd-m", seed=2, epochs=2), tmp_path / "c", progress=False,
                      echo=lambda s: None)
    assert a["final"]["train_loss"] == b["final"]["train_loss"]
    assert a["final"]["train_loss"] != c["final"]["train_loss"]


def test_divergence_is_recorded(tmp_path):
    spec = _spec("sgd-m", epochs=30, subset=50, hps={"lr": 1e4})
    res, _ = runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
    f = res["final"]
    assert f["diverged"] and f["train_loss"] is None
    assert f["iterations"] < 30
    # the file is valid JSON (no NaN literals)
    json.loads(runner.result_path(tmp_path, spec).read_text())


def test_write_json_atomic_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    runner.write_json_atomic(path, {"a": 1.0, "b": float("nan")})
    assert json.loads(path.read_text()) == {"a": 1.0, "b": None}

    class Boom:
        def __repr__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        runner.write_json_atomic(path, {"x": Boom()})
    assert json.loads(path.read_text()) == {"a": 1.0, "b": None}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_classifier_problem_with_augmentation(tmp_path, monkeypatch):
    """resnet32-fmnist end to end on synthetic 28x28 data (validation accuracy, crop+flip)."""
    from kbfgs.experiments import data as D

    g = torch.Generator().manual_seed(0)
    fake = D.ArrayData(x_train=torch.rand(64, 784, generator=g),
                       y_train=torch.randint(0, 10, (64,), generator=g),
                       x_test=torch.rand(32, 784, generator=g),
                       y_test=torch.randint(0, 10, (32,), generator=g),
                       name="fashion-mnist", note="synthetic")
    monkeypatch.setattr(D, "load_dataset", lambda name, data_dir=None, **kw: fake)
    monkeypatch.setattr(rundata, "_DATA_CACHE", {})
    spec = _spec("kbfgs", problem="resnet32-fmnist", epochs=2, subset=32, batch_size=16,
                 lr_decay=(1.0, 0.5), hps={"update_freq": 2})
    res, _ = runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
    f = res["final"]
    assert 0.0 <= f["val_acc"] <= 1.0 and f["train_loss"] > 0
    assert res["data"]["n_val"] == 32 and res["data"]["n_train"] == 32
    assert "validation accuracy on 32" in res["data"]["eval"]
    assert all("val_acc" in e for e in res["log"] if e["kind"] == "epoch")
    assert res["final"]["iterations"] == 4


# ------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kbfgs", "kfac", "adam"])
def test_interrupted_run_resumes_from_its_checkpoint_bit_identically(tmp_path, monkeypatch,
                                                                    method):
    """A run that crashes after its epoch-2 checkpoint, rerun, ends exactly where the
    uninterrupted run ends: same logged losses, same final loss, same iteration count."""
    kw = dict(epochs=4, subset=64, batch_size=16, checkpoint_every=2,
              lr_decay=(3.0, 0.5))  # the decay falls after the resume point
    spec = _spec(method, **kw)
    full, _ = runner.run(spec, tmp_path / "full", progress=False, echo=lambda s: None)
    ckpt = runner.checkpoint_path(tmp_path / "cut", spec)
    monkeypatch.setenv("KBFGS_FAIL_AT_ITER", "11")  # 4 iterations per epoch: after epoch 2
    with pytest.raises(RuntimeError, match="injected failure before iteration 12"):
        runner.run(spec, tmp_path / "cut", progress=False, echo=lambda s: None)
    assert ckpt.exists() and not runner.result_path(tmp_path / "cut", spec).exists()
    monkeypatch.delenv("KBFGS_FAIL_AT_ITER")
    msgs: list[str] = []
    cut, ran = runner.run(spec, tmp_path / "cut", progress=False, echo=msgs.append)
    assert ran and any("resuming from" in m for m in msgs)
    assert cut["resumed"] == [{"iter": 8, "from_world_size": 1, "world_size": 1}]
    assert not ckpt.exists()  # removed once the result is written
    losses = [(e["iter"], e.get("train_loss"), e["lr"]) for e in full["log"]]
    assert [(e["iter"], e.get("train_loss"), e["lr"]) for e in cut["log"]] == losses
    assert cut["final"]["train_loss"] == full["final"]["train_loss"]
    assert cut["final"]["iterations"] == full["final"]["iterations"] == 16
    assert cut["run_id"] == full["run_id"]  # checkpoint_every is not part of the run's key


def test_time_budget_run_resumes_with_its_clock(tmp_path, monkeypatch):
    """A time-budget run resumed from a checkpoint keeps the process time it had used: the
    budget is spent once over both parts, and the log's clock never goes back."""
    spec = _spec("sgd-m", time_budget=0.6, epochs=None, subset=100, batch_size=25,
                 eval_every=0.1, checkpoint_every=1)
    monkeypatch.setenv("KBFGS_FAIL_AT_ITER", "6")  # 4 iterations per epoch: after epoch 1
    with pytest.raises(RuntimeError, match="injected"):
        runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
    saved = torch.load(runner.checkpoint_path(tmp_path, spec), weights_only=True)["extra"]
    assert saved["it"] == 4 and saved["process"] > 0
    monkeypatch.delenv("KBFGS_FAIL_AT_ITER")
    res, _ = runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
    f = res["final"]
    assert res["resumed"][0]["iter"] == 4
    assert 0.6 <= f["process_time_s"] < 0.6 + 10 * f["time_per_iter_s"] + 0.5
    times = [e["process_time"] for e in res["log"]]
    assert times == sorted(times) and res["log"][0]["kind"] == "start"
    assert [e["kind"] for e in res["log"]].count("start") == 1


def test_checkpoint_of_another_run_is_refused(tmp_path, monkeypatch):
    a = _spec("sgd-m", epochs=3, subset=40, batch_size=20, checkpoint_every=1)
    b = _spec("sgd-m", epochs=3, subset=40, batch_size=20, checkpoint_every=1, seed=2)
    monkeypatch.setenv("KBFGS_FAIL_AT_ITER", "3")
    with pytest.raises(RuntimeError, match="injected"):
        runner.run(a, tmp_path, progress=False, echo=lambda s: None)
    monkeypatch.delenv("KBFGS_FAIL_AT_ITER")
    runner.checkpoint_path(tmp_path, a).rename(runner.checkpoint_path(tmp_path, b))
    with pytest.raises(ValueError, match=r"belongs to run .*seed1"):
        runner.run(b, tmp_path, progress=False, echo=lambda s: None)
    # --force discards it and runs afresh
    res, ran = runner.run(b, tmp_path, progress=False, echo=lambda s: None, force=True)
    assert ran and "resumed" not in res
    with pytest.raises(ValueError, match="checkpoint_every"):
        runner.train(_spec("sgd-m", checkpoint_every=0), progress=False)


# ------------------------------------------------------------------------------------------
# Grid
# ------------------------------------------------------------------------------------------


def test_grid_points_override_and_paper_ranges():
    curves = P.get_problem("curves-ae")
    pts = grid_mod.grid_points(curves, "sgd-m")
    assert [p["lr"] for p in pts] == list(curves.grid("sgd-m")["lr"])
    pts = grid_mod.grid_points(curves, "kbfgs", {"lr": [0.01, 0.03], "damping": [1.0]})
    assert [(p["lr"], p["damping"]) for p in pts] == [(0.01, 1.0), (0.03, 1.0)]
    assert all(p["update_freq"] == 1 for p in pts)
    assert len(grid_mod.grid_points(curves, "kbfgs")) == 70
    cnn = P.get_problem("resnet32-cifar10")
    assert len(grid_mod.grid_points(cnn, "kfac")) == 6 * 4 * 7
    with pytest.raises(ValueError, match="takes no hyper-parameter"):
        grid_mod.grid_points(curves, "sgd-m", {"damping": [1.0]})


def test_interrupted_grid_resumes_without_repeating(tmp_path, monkeypatch):
    curves = P.get_problem("curves-ae")
    pts = grid_mod.grid_points(curves, "sgd-m", {"lr": [1e-3, 3e-3, 1e-2]})
    specs = grid_mod.grid_specs(curves, "sgd-m", pts, [1], time_budget=None, epochs=1,
                                lr_decay=None, subset=50)
    # "Interrupted" after the first run: only its file exists.
    runner.run(specs[0], tmp_path, progress=False, echo=lambda s: None)
    first = runner.result_path(tmp_path, specs[0])
    mtime = first.stat().st_mtime_ns
    # A half-written temporary file of the killed run must not count as finished.
    (tmp_path / f".{runner.result_path(tmp_path, specs[1]).name}.tmp-999").write_text("{")
    trained = []
    real_train = runner.train

    def counting_train(spec, **kw):
        trained.append(spec.run_id())
        return real_train(spec, **kw)

    monkeypatch.setattr(runner, "train", counting_train)
    best, groups, done = grid_mod.run_grid(curves, "sgd-m", specs, tmp_path, progress=False,
                                           echo=lambda s: None)
    assert done == 2
    assert trained == [specs[1].run_id(), specs[2].run_id()]
    assert first.stat().st_mtime_ns == mtime
    for s in specs:
        assert runner.load_result(runner.result_path(tmp_path, s)) is not None
    assert len(groups) == 3
    assert best.hps["lr"] == min(groups, key=lambda g: g.stat("train_loss")[0]).hps["lr"]
    summary = json.loads((tmp_path / "grids" / "best__curves-ae__sgd-m.json").read_text())
    assert summary["best_hps"]["lr"] == best.hps["lr"]
    # A third call runs nothing.
    trained.clear()
    _, _, done = grid_mod.run_grid(curves, "sgd-m", specs, tmp_path, progress=False,
                                   echo=lambda s: None)
    assert done == 0 and trained == []


# ------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------


def _fake_result(problem, method, seed, loss, hps=None, acc=None, points=5):
    classifier = acc is not None
    hps = hps or {"lr": 0.1}
    log = []
    for i in range(points):
        e = {"kind": "epoch", "iter": 10 * i, "epoch": float(i), "process_time": 2.0 * i,
             "train_loss": loss + (points - 1 - i)}
        if classifier:
            e["val_acc"] = acc - 0.01 * (points - 1 - i)
        log.append(e)
    final = {"train_loss": loss, "iterations": 10 * (points - 1), "epochs": points - 1,
             "time_per_iter_s": 0.01, "diverged": False}
    if classifier:
        final["val_acc"] = acc
    return {"status": "finished", "problem": problem, "method": method, "seed": seed,
            "hps": hps, "run_id": f"{problem}-{method}-{seed}-{hps}",
            "spec": {"problem": problem, "method": method, "seed": seed, "time_budget": 8.0,
                     "hps": hps},
            "problem_info": {"classifier": classifier, "description": "d"},
            "data": {"note": "n", "eval": "e", "batch_size": 10},
            "env": {"device": "cpu", "torch": torch.__version__}, "final": final, "log": log}


def test_report_tables_mean_and_sem(tmp_path):
    losses = [50.0, 52.0, 54.0]
    for s, v in enumerate(losses):
        runner.write_json_atomic(tmp_path / f"a{s}.json", _fake_result("curves-ae", "kbfgs", s, v))
        runner.write_json_atomic(tmp_path / f"b{s}.json", _fake_result("curves-ae", "adam", s,
                                                                       v + 10))
    # a grid: two settings of sgd-m, the better one must be reported
    runner.write_json_atomic(tmp_path / "c0.json",
                             _fake_result("curves-ae", "sgd-m", 1, 70.0, {"lr": 0.1}))
    runner.write_json_atomic(tmp_path / "c1.json",
                             _fake_result("curves-ae", "sgd-m", 1, 60.0, {"lr": 0.01}))
    runner.write_json_atomic(tmp_path / "d0.json",
                             _fake_result("resnet32-fmnist", "kfac", 1, 0.3, acc=0.91))
    runner.write_json_atomic(tmp_path / "d1.json",
                             _fake_result("resnet32-fmnist", "kfac", 2, 0.3, acc=0.93))
    out = R.write_report(tmp_path)
    text = out.read_text()
    sem = torch.tensor(losses, dtype=torch.float64).std(unbiased=False).item() / math.sqrt(3)
    assert f"| K-BFGS | 52.00 \u00b1 {sem:.2f} |" in text
    assert f"| Adam | 62.00 \u00b1 {sem:.2f} |" in text
    assert "| SGD-m | 60.00 |" in text  # best of the grid by training loss
    assert "best of 2 settings" in text
    assert "| KFAC | 92.00 \u00b1 0.71 |" in text  # Table 4 style, %, std (ddof 0) / sqrt(2)
    for name in ("curves-ae.png", "resnet32-fmnist.png"):
        png = tmp_path / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({name})" in text


def test_runs_differing_only_in_non_key_fields_are_one_setting():
    """Seeds run with and without --checkpoint-every (or on another device or thread count)
    are one setting in the report, as they are one run key."""
    a = _fake_result("curves-ae", "kbfgs", 1, 50.0)
    b = _fake_result("curves-ae", "kbfgs", 2, 52.0)
    b["spec"].update(checkpoint_every=2, device="cuda", threads=4, data_dir="/d")
    c = _fake_result("curves-ae", "kbfgs", 3, 54.0)
    c["spec"]["checkpoint_every"] = None
    d = _fake_result("curves-ae", "kbfgs", 4, 56.0)
    d["spec"]["epochs"] = 3  # a different budget is a different setting
    groups = R.group_results([a, b, c, d])[("curves-ae", "kbfgs")]
    assert sorted(len(g.runs) for g in groups) == [1, 3]
    assert set(runner.NON_KEY_FIELDS) >= {"checkpoint_every", "device", "threads", "data_dir"}


def test_mean_band():
    import numpy as np

    x = np.array([0.0, 1.0, 2.0])
    # a seed that stops early (diverged) counts only where it has values
    grid, mean, sem = R.mean_band([(x, np.array([1.0, 2.0, 3.0])),
                                   (x, np.array([3.0, 4.0, 5.0])),
                                   (np.array([0.0, 0.5]), np.array([2.0, 2.5]))], points=5)
    assert grid.tolist() == [0.0, 0.5, 1.0, 1.5, 2.0]
    assert mean.tolist() == [2.0, 2.5, 3.0, 3.5, 4.0]
    assert sem[0] == pytest.approx(math.sqrt(2 / 3) / math.sqrt(3))
    assert sem[4] == pytest.approx(1.0 / math.sqrt(2))  # only two curves reach x = 2
    # seeds of one budget end at slightly different x: the grid stops at the shortest
    grid, mean, _ = R.mean_band([(x, np.array([1.0, 2.0, 3.0])),
                                 (np.array([0.0, 1.0, 1.8]), np.array([3.0, 4.0, 5.0]))],
                                points=10)
    assert grid[-1] == pytest.approx(1.8)
    assert np.all(np.isfinite(mean))


def test_report_on_empty_dir_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no finished result"):
        R.write_report(tmp_path)


def test_hidden_and_unfinished_files_are_ignored(tmp_path):
    runner.write_json_atomic(tmp_path / "ok.json", _fake_result("curves-ae", "kbfgs", 1, 5.0))
    (tmp_path / "broken.json").write_text("{")
    (tmp_path / "running.json").write_text(json.dumps({"status": "running"}))
    os.makedirs(tmp_path / ".hidden")
    runner.write_json_atomic(tmp_path / ".hidden" / "x.json",
                             _fake_result("curves-ae", "adam", 1, 5.0))
    res = R.load_results(tmp_path)
    assert [r["method"] for r in res] == ["kbfgs"]
    assert Path(res[0]["_path"]).name == "ok.json"


class _Exploding(torch.optim.SGD):
    """Raises from step() like KFAC sampling targets from NaN outputs (after making the
    parameters NaN, or huge but finite so that the outputs are NaN, when ``poison``)."""

    def __init__(self, params, poison):
        super().__init__(params, lr=0.1)
        self.poison = poison

    def step(self, closure=None):
        closure()
        if self.poison:
            with torch.no_grad():
                for p in self.param_groups[0]["params"]:
                    p.fill_(self.poison)
        raise RuntimeError("Expected p_in >= 0 && p_in <= 1")


def test_optimizer_error_on_blown_up_model_is_divergence(tmp_path, monkeypatch):
    for i, poison in enumerate((float("nan"), 1e30)):
        monkeypatch.setattr(trainer, "make_method_optimizer",
                            lambda method, model, hps, seed=None, poison=poison:
                            _Exploding(model.parameters(), poison))
        spec = _spec("sgd-m", epochs=3, subset=50, seed=20 + i)
        res, _ = runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
        assert res["final"]["diverged"] and "p_in" in res["final"]["error"]
        assert res["final"]["train_loss"] is None and res["final"]["iterations"] == 0
    # with finite parameters the error is a bug, not a divergence: it propagates
    monkeypatch.setattr(trainer, "make_method_optimizer",
                        lambda method, model, hps, seed=None:
                        _Exploding(model.parameters(), 0.0))
    with pytest.raises(RuntimeError, match="p_in"):
        runner.run(_spec("sgd-m", epochs=3, subset=50, seed=9), tmp_path, progress=False,
                   echo=lambda s: None)
    assert not runner.result_path(tmp_path, _spec("sgd-m", epochs=3, subset=50, seed=9)).exists()


def test_figure_zoom_clips_the_initial_drop():
    """The y range of a figure ends near the values after the first quarter of the x range,
    not at an initial loss 60x higher (a sparse, once-per-epoch log)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots()
    grid = np.linspace(0, 4, 200)  # figures draw curves interpolated onto a grid (mean_band)
    ax.plot(grid, np.interp(grid, [0, 1, 2, 3, 4], [60.0, 0.9, 0.6, 0.5, 0.45]))
    ax.plot(grid, np.interp(grid, [0, 1, 2, 3, 4], [58.0, 1.0, 0.8, 0.7, 0.72]))
    R._zoom(ax)
    lo, hi = ax.get_ylim()
    assert 0.4 < lo < 0.45 and 1.0 <= hi < 1.1, (lo, hi)
    # a line that says where its evaluations start (plot_problem sets zoom_from) is cut there
    ax.get_lines()[1].zoom_from = 0.2  # the second line's first evaluation at x = 0.2
    R._zoom(ax)
    assert ax.get_ylim()[1] > 40  # 58 - 0.2 * 57 = 46.6 is in range now
    plt.close(fig)


# ------------------------------------------------------------------------------------------
# Output directory, data identity, logs (issue 12, items 4, 5, 9)
# ------------------------------------------------------------------------------------------


def _no_training(monkeypatch):
    def forbidden(*a, **kw):
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "train", forbidden)


def test_out_that_is_a_file_is_refused_before_training(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    spec = _spec("sgd-m", epochs=1, subset=20)
    f = tmp_path / "results"
    f.write_text("not a directory")
    with pytest.raises(runner.RunnerError, match=r"--out .*results is a file, not a directory"):
        runner.run(spec, f, progress=False, echo=lambda s: None)
    with pytest.raises(runner.RunnerError, match=r"--out .*results.*cannot create"):
        runner.run(spec, f / "sub", progress=False, echo=lambda s: None)
    assert f.read_text() == "not a directory"


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0,
                    reason="root writes into read-only directories")
def test_read_only_out_is_refused_before_training(tmp_path, monkeypatch):
    _no_training(monkeypatch)
    spec = _spec("sgd-m", epochs=1, subset=20)
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(runner.RunnerError, match=r"--out .*ro: cannot write"):
            runner.run(spec, ro, progress=False, echo=lambda s: None)
    finally:
        ro.chmod(0o755)


def test_unwritable_out_is_found_by_writing_not_by_permission_bits(tmp_path, monkeypatch):
    """The check writes a probe file, so whatever makes writing fail (read-only mount, quota,
    permissions; simulated here, as root ignores permission bits) stops the run before it
    trains, and a finished result in such a directory is still found and skipped."""
    spec = _spec("sgd-m", epochs=1, subset=20)
    runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
    import builtins

    real_open = builtins.open

    def read_only_open(file, mode="r", *a, **kw):
        if any(c in mode for c in "wax+") and Path(file).parent == tmp_path:
            raise OSError(30, "Read-only file system")
        return real_open(file, mode, *a, **kw)

    monkeypatch.setattr(builtins, "open", read_only_open)
    _no_training(monkeypatch)
    msgs: list[str] = []
    _, ran = runner.run(spec, tmp_path, progress=False, echo=msgs.append)
    assert not ran and "skip (already finished)" in msgs[0]
    other = _spec("sgd-m", epochs=1, subset=20, seed=2)
    with pytest.raises(runner.RunnerError, match="cannot write result files there "
                                                 r"\(Read-only file system\)"):
        runner.run(other, tmp_path, progress=False, echo=lambda s: None)


def _curves_file(directory, seed=0, n=40):
    import numpy as np
    import scipy.io

    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(directory / "digs3pts_1.mat", {"bdata": rng.random((n, 784)),
                                                    "bdatatest": rng.random((n // 2, 784))})


def test_data_is_part_of_the_run_identity(tmp_path):
    """The stand-in CURVES and a digs3pts_1.mat file give two run ids (no 'skip (already
    finished)' of the wrong data) and two report groups; the same file under another path is
    the same data (same run id: skipped)."""
    out = tmp_path / "out"
    kw = {"epochs": 1, "subset": 40, "batch_size": 20}
    stand_in = _spec("sgd-m", **kw)
    _curves_file(tmp_path / "a")
    from_file = _spec("sgd-m", data_dir=str(tmp_path / "a"), **kw)
    assert stand_in.data.startswith("curves:stand-in generator seed 0:")
    assert from_file.data.startswith("curves:digs3pts_1.mat:")
    assert stand_in.run_id() != from_file.run_id()
    r1, ran1 = runner.run(stand_in, out, progress=False, echo=lambda s: None)
    r2, ran2 = runner.run(from_file, out, progress=False, echo=lambda s: None)
    assert ran1 and ran2 and r1["run_id"] != r2["run_id"]
    assert r2["spec"]["data"] == from_file.data
    assert len(R.group_results([r1, r2])[("curves-ae", "sgd-m")]) == 2
    # the same file elsewhere: the same data
    _curves_file(tmp_path / "b" / "curves")
    moved = _spec("sgd-m", data_dir=str(tmp_path / "b"), **kw)
    assert moved.run_id() == from_file.run_id()
    msgs: list[str] = []
    _, ran3 = runner.run(moved, out, progress=False, echo=msgs.append)
    assert not ran3 and "skip (already finished)" in msgs[0]
    # other values in a file of the same name and shape: other data
    _curves_file(tmp_path / "c", seed=1)
    assert _spec("sgd-m", data_dir=str(tmp_path / "c"), **kw).run_id() != from_file.run_id()
    # a spec built without its data identity gets it when it runs
    bare = dataclasses.replace(stand_in, data=None)
    assert runner.run(bare, out, progress=False, echo=lambda s: None)[1] is False


def test_old_result_files_without_data_identity_still_load(tmp_path):
    """A result written before runs recorded their data: it loads, reports, and forms its own
    group (unknown data), apart from a run of the same setting on identified data."""
    spec = _spec("sgd-m", epochs=1, subset=20)
    res, _ = runner.run(spec, tmp_path, progress=False, echo=lambda s: None)
    old = json.loads(json.dumps(res))
    del old["spec"]["data"]
    runner.write_json_atomic(tmp_path / "old.json", old)
    loaded = R.load_results(tmp_path)
    assert len(loaded) == 2
    groups = R.group_results(loaded)[("curves-ae", "sgd-m")]
    assert sorted(len(g.runs) for g in groups) == [1, 1]


def test_progress_writes_no_carriage_returns_into_a_log(tmp_path, capsys):
    """stderr not a terminal (a log file, a pipe, pytest's capture): no tqdm updates with
    carriage returns; the summary line stays on stdout."""
    spec = _spec("sgd-m", epochs=2, subset=40, batch_size=10)
    runner.run(spec, tmp_path, progress=True)
    out, err = capsys.readouterr()
    assert "\r" not in err and "\r" not in out
    assert "curves-ae sgd-m seed 1: train loss" in out


def test_progress_bar_on_a_terminal(monkeypatch):
    import io

    class Tty(io.StringIO):
        def isatty(self):
            return True

    tty = Tty()
    monkeypatch.setattr("sys.stderr", tty)
    bar = trainer.progress_bar(10, "x", "it", True)
    assert bar is not None
    bar.update(3)
    bar.close()
    assert "\r" in tty.getvalue() and "3/10" in tty.getvalue()
    assert trainer.progress_bar(10, "x", "it", False) is None
