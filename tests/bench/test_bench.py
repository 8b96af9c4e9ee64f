"""Smoke test of the benchmark code paths (bench/step_time.py, bench/time_to_loss.py) at tiny
sizes: every JSON field the docs read exists and the ratios are computed per window."""

from __future__ import annotations

import json
import math

import pytest
import torch

import common  # bench/common.py: bench/ is on pytest's pythonpath (pyproject.toml)
import op_count
import step_time
import time_to_loss

# the benchmarks' --threads sets torch's global thread count: tests/conftest.py restores it
pytestmark = pytest.mark.fast


def test_step_time_tiny(tmp_path):
    out = tmp_path / "st.json"
    # every configuration whose periods divide the window of 20 (kbfgs-plus's T = 3: below)
    labels = [lab for lab in common.METHODS if "(T=3)" not in lab]
    step_time.main(["--problems", "tiny-ae", "--window", "20", "--repeats", "2",
                    "--warmup", "0", "--threads", "1",
                    "--methods", ",".join(labels), "--no-peak",
                    "--out", str(out)])
    res = json.loads(out.read_text())
    assert res["problem"] == "tiny-ae" and res["batch"] == 16 and res["window"] == 20
    env = res["environment"]
    for key in ("device", "torch", "git", "threads", "loadavg_start", "loadavg_end"):
        assert key in env
    assert list(res["summary"]) == labels
    assert len(res["windows"]) == 2
    assert res["windows"][1]["order"] == labels[1:] + labels[:1]  # rotated
    s = res["summary"]
    assert s["sgd-m"]["ratio"]["sgd-m"]["median"] == pytest.approx(1.0)
    for lab in labels:
        assert s[lab]["per_step"]["median"] > 0
        assert s[lab]["stats"]["skipped_steps"] in (0, None)
        assert set(step_time.BUCKETS) <= set(s[lab]["breakdown_per_step_median"])
        w = res["windows"][0]["times"][lab]
        assert w["seconds"] == pytest.approx(sum(w["breakdown"][b] for b in step_time.BUCKETS))
    # one curvature pass per window of 20 for T = 20
    assert s["kbfgs(T=20)"]["stats"]["curvature_updates"] == 2
    assert s["kbfgs(T=20)"]["breakdown_per_step_median"]["extra_pass"] > 0
    # quick-window rescaling of KFAC's T2 = 100 to the window of 20
    assert res["methods"]["kfac(10,100)"]["hp"]["inv_freq"] == 20
    assert "rescaled" in res["methods"]["kfac(10,100)"]["note"]
    # optimizer state: K-BFGS holds more than SGD-m's momentum buffers
    assert s["kbfgs(T=20)"]["state_bytes"] > s["sgd-m"]["state_bytes"] > 0
    assert s["sgd-m"]["state_bytes"] == res["param_bytes"]  # one momentum buffer per parameter


def test_step_time_kbfgs_plus_default_period(tmp_path):
    out = tmp_path / "st.json"
    step_time.main(["--problems", "tiny-ae", "--window", "6", "--repeats", "1", "--warmup", "0",
                    "--threads", "1", "--methods", "adam,kbfgs-plus,kbfgs-plus-extra",
                    "--no-peak", "--out", str(out)])
    s = json.loads(out.read_text())["summary"]
    # with the extra pass: the pairs of steps 3 and 6; closure-free (the default): the pair of
    # step 3 completed by step 4's pass, step 6's waits for step 7
    assert s["kbfgs-plus-extra(T=3)"]["stats"]["curvature_updates"] == 2
    assert s["kbfgs-plus-extra(T=3)"]["breakdown_per_step_median"]["extra_pass"] > 0
    assert s["kbfgs-plus(T=3)"]["stats"]["curvature_updates"] == 1
    assert s["kbfgs-plus(T=3)"]["breakdown_per_step_median"]["extra_pass"] == 0
    assert s["kbfgs-plus(T=3)"]["per_step"]["median"] > 0


def test_window_must_cover_periods():
    with pytest.raises(SystemExit):
        step_time.main(["--problems", "tiny-ae", "--window", "10",
                        "--methods", "kbfgs-t20", "--no-peak", "--repeats", "1"])


def test_memory_child_cpu():
    r = step_time.memory_child("tiny-ae", "kbfgs(T=20)", True, torch.device("cpu"), 20)
    assert r["state_bytes"] > r["param_bytes"] > 0
    assert r["peak_bytes"] > -2**20 and "VmHWM" in r["method"]  # RSS counters: ~100 kB noise


def test_state_bytes_counts_layer_state_once():
    import kbfgs

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    opt = kbfgs.make_optimizer("kbfgs", model, lr=0.1, damping=1.0)
    x = torch.randn(5, 3)
    opt.step(common.make_closure(opt, model, x, torch.randn(5, 2),
                                 lambda o, t: (o - t).square().sum() / o.shape[0]))
    # per layer: buf (out x in+1), H_A (in+1)^2, H_G out^2, s_G, y_G (out), 5 scalars: the
    # int64 counters skipped_A, skipped_G, skipped_G_rounding and the float32 theta, Dh_scale
    # (the preconditioning scratch is one transient buffer shared by all layers, not state)
    expect = 0
    for i, o in ((3, 4), (4, 2)):
        expect += 4 * (o * (i + 1) + (i + 1) ** 2 + o * o + 2 * o) + 8 * 3 + 4 * 2
    assert common.state_bytes(opt) == expect


def test_time_to_loss_tiny(tmp_path, monkeypatch):
    torch.manual_seed(0)
    x = torch.rand(300, 784)
    monkeypatch.setattr(time_to_loss, "load", lambda problem, n=None: (
        lambda: torch.nn.Sequential(torch.nn.Linear(784, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 784)), x, "random"))
    out = tmp_path / "ttl.json"
    time_to_loss.main(["--problems", "curves-ae", "--methods", "sgd-m,kbfgs,kfac(1,20)",
                       "--budget", "0.05", "--chunk", "2", "--batch", "100", "--eval-size", "200",
                       "--targets", "1e9,1", "--threads", "1", "--out", str(out)])
    res = json.loads(out.read_text())
    assert list(res["table"]) == ["sgd-m", "kbfgs", "kfac(1,20)"]
    for r in res["table"].values():
        assert r["time_to_target"]["1000000000.0"] == 0.0  # reached at the start
        assert r["time_to_target"]["1.0"] is None
        assert r["steps"] >= 2 and not r["diverged"]
        assert math.isfinite(r["final_loss"])
    assert res["table"]["kbfgs"]["warm_start_process_s"] > 0


def test_split_list():
    assert common.split_list("sgd-m, kfac(1,20),kbfgs") == ["sgd-m", "kfac(1,20)", "kbfgs"]
    assert common.resolve_methods("kfac(10,100)") == ["sgd-m", "kfac(10,100)"]


def test_time_to_interpolates():
    log = [{"process": 0.0, "loss": 10.0}, {"process": 2.0, "loss": 6.0},
           {"process": 4.0, "loss": 2.0}]
    assert time_to_loss.time_to(log, 4.0) == pytest.approx(3.0)
    assert time_to_loss.time_to(log, 1.0) is None


def test_op_count_tiny(tmp_path):
    """op_count on the 64-32-8-32-64 autoencoder: SGD-m's step is all closure; K-BFGS T=1
    spends operators in every part, and T=20 amortises its curvature update over 20 steps."""
    out = tmp_path / "op_count-{problem}.json"
    assert op_count.main(["--problems", "tiny-ae", "--methods", "kbfgs,kbfgs-t20",
                          "--window", "20", "--out", str(out)]) == 0
    rows = {r["method"]: r for r in json.loads((tmp_path / "op_count-tiny-ae.json").read_text())
            ["rows"]}
    sgd, t1, t20 = rows["sgd-m"], rows["kbfgs(T=1)"], rows["kbfgs(T=20)"]
    assert set(sgd["per_iteration"]) == {"closure"} and sgd["kronecker_layers"] == 0
    assert t1["kronecker_layers"] == 4
    assert all(t1["per_iteration"][p] > 0 for p in ("closure", "curvature", "update", "finite"))
    # one curvature update per 20 steps instead of one per step, the same update per step
    assert t20["per_iteration"]["curvature"] == pytest.approx(
        t1["per_iteration"]["curvature"] / 20)
    assert t20["per_iteration"]["update"] == t1["per_iteration"]["update"]
