"""``kbfgs grid``: settings a method refuses are skipped with one line each; a damaged result
file counts as not finished and its run is done again."""

from __future__ import annotations

import json

from kbfgs.experiments.cli import main
from kbfgs.experiments.grid import refusal
from kbfgs.experiments.problems import get_problem
from kbfgs.experiments.report import result_problem
from kbfgs.experiments.runner import resolve_hps

FAST = ["--subset", "200", "--threads", "1", "--no-progress"]


def test_refusal_is_the_optimizers_value_error():
    problem = get_problem("curves-ae")
    model = problem.build_model()
    # double damping (K-BFGS-20) needs mu2 = lambda_G = sqrt(damping) <= 1
    why = refusal("kbfgs-20", model, resolve_hps(problem, "kbfgs-20", {"damping": 3.0}))
    assert why is not None and "lambda_G" in why
    assert refusal("kbfgs-20", model, resolve_hps(problem, "kbfgs-20", {"damping": 1.0})) is None
    assert refusal("kbfgs", model, resolve_hps(problem, "kbfgs", {"damping": 3.0})) is None


def test_grid_skips_refused_points_with_one_line_each(tmp_path, capsys):
    args = ["grid", "--problem", "curves-ae", "--optimizer", "kbfgs-20", "--lr", "0.001",
            "--damping", "0.3", "3", "10", "--time-budget", "0.3", "--out", str(tmp_path),
            *FAST]
    assert main(args) == 0
    out = capsys.readouterr().out
    refused = [ln for ln in out.splitlines() if "refuses" in ln]
    assert len(refused) == 2, out
    assert "damping=3" in refused[0] and "damping=10" in refused[1]
    assert all("lambda_G" in ln for ln in refused)
    assert "1 runs done now" in out and "<- best" in out
    assert len(list(tmp_path.glob("*.json"))) == 1
    summary = json.loads((tmp_path / "grids" / "best__curves-ae__kbfgs-20.json").read_text())
    assert [r["hps"]["damping"] for r in summary["refused"]] == [3.0, 10.0]
    assert summary["best_hps"]["damping"] == 0.3


def test_grid_where_every_point_is_refused_is_a_clean_error(tmp_path, capsys):
    args = ["grid", "--problem", "curves-ae", "--optimizer", "kbfgs-no-dpdlm", "--lr", "0.001",
            "--damping", "3", "--time-budget", "0.3", "--out", str(tmp_path), *FAST]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "refuses every setting" in err and "Traceback" not in err


def test_grid_reruns_a_point_whose_result_file_is_damaged(tmp_path, capsys):
    args = ["grid", "--problem", "curves-ae", "--optimizer", "sgd-m", "--lr", "0.001", "0.003",
            "0.01", "--time-budget", "0.3", "--out", str(tmp_path), *FAST]
    assert main(args) == 0
    files = sorted(tmp_path.glob("*.json"))
    assert len(files) == 3
    capsys.readouterr()
    truncated, no_loss, intact = files
    truncated.write_text(truncated.read_text()[:100])
    res = json.loads(no_loss.read_text())
    del res["final"]["train_loss"]
    no_loss.write_text(json.dumps(res))
    mtime = intact.stat().st_mtime_ns
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "2 runs done now, 1 were already finished" in out
    assert sum("is not a finished run" in ln for ln in out.splitlines()) == 2
    for path in (truncated, no_loss):
        assert result_problem(json.loads(path.read_text())) is None  # replaced by a good one
    assert intact.stat().st_mtime_ns == mtime
