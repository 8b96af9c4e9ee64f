"""``kbfgs reproduce``: the rows of Tables 3, 4 and 7, scaled budgets, skipped data, resume."""

from __future__ import annotations

import subprocess
import sys

import pytest

from cases import kill_after_first_result
from kbfgs.experiments import paper_results as pr
from kbfgs.experiments.cli import main
from kbfgs.experiments.problems import METHODS, get_problem
from kbfgs.experiments.reproduce import estimate_process_seconds, plan, scaled_budget

PY = sys.executable
# 500 s x 0.0006 = 0.3 s of process time per CURVES run
TINY = ["--budget-scale", "0.0006", "--subset", "200", "--threads", "1", "--no-progress"]


def test_default_plan_is_every_row_of_tables_3_4_and_7_with_5_seeds():
    runs = plan()
    assert len(runs) == 3 * 10 * 5 + 4 * 4 * 5
    assert len(set(runs)) == len(runs)  # no duplicate
    assert {r.seed for r in runs} == {1, 2, 3, 4, 5}
    for p in pr.AE_PROBLEMS:
        methods = {r.method for r in runs if r.problem == p}
        assert methods == set(pr.TABLE3) | set(pr.TABLE7)
    for p in pr.CNN_PROBLEMS:
        assert {r.method for r in runs if r.problem == p} == set(pr.TABLE4)
    assert {r.method for r in runs} <= set(METHODS)
    assert {r.problem for r in runs} == set(pr.AE_PROBLEMS) | set(pr.CNN_PROBLEMS)


def test_plan_filters_and_errors():
    runs = plan(["curves-ae", "vgg16-cifar10"], ["kbfgs", "adam"], seeds=2)
    assert [(r.problem, r.method, r.seed) for r in runs] == [
        ("curves-ae", "kbfgs", 1), ("curves-ae", "adam", 1), ("curves-ae", "kbfgs", 2),
        ("curves-ae", "adam", 2), ("vgg16-cifar10", "kbfgs", 1), ("vgg16-cifar10", "adam", 1),
        ("vgg16-cifar10", "kbfgs", 2), ("vgg16-cifar10", "adam", 2)]
    with pytest.raises(ValueError, match="unknown problem"):
        plan(["curves"])
    with pytest.raises(ValueError, match="unknown method"):
        plan(["curves-ae"], ["bfgs"])
    with pytest.raises(ValueError, match="no row of Tables 3, 4 or 7"):
        plan(["vgg16-cifar10"], ["kbfgs-t20"])


def test_budget_scale_shortens_every_budget():
    assert scaled_budget(get_problem("curves-ae"), "kbfgs", 0.02) == (10.0, None, None)
    assert scaled_budget(get_problem("faces-ae"), "kfac", 0.5) == (1000.0, None, None)
    # Section 6.2: 150 epochs, decay every 50 (second order); 200 and 60 (first order)
    b, e, d = scaled_budget(get_problem("vgg16-cifar10"), "kbfgs", 0.02)
    assert b is None and e == pytest.approx(3.0) and d == pytest.approx((1.0, 0.1))
    b, e, d = scaled_budget(get_problem("resnet32-cifar100"), "sgd-m", 0.1)
    assert b is None and e == pytest.approx(20.0) and d == pytest.approx((6.0, 0.1))
    # the estimate in docs/api.md: 10 methods x 5 seeds x (500 + 2000 + 500) s x 0.02
    seconds, epoch_runs = estimate_process_seconds(plan(), 0.02)
    assert seconds == pytest.approx(10 * 5 * 3000 * 0.02) and epoch_runs == 80


def test_reproduce_skips_absent_data_reports_and_redoes_nothing(tmp_path, capsys):
    out = tmp_path / "repro"
    empty = tmp_path / "no-data"
    empty.mkdir()
    args = ["reproduce", "--problems", "mnist-ae", "curves-ae", "--methods", "kbfgs", "sgd-m",
            "--seeds", "2", "--data-dir", str(empty), "--out", str(out), *TINY]
    assert main(args) == 0
    text = capsys.readouterr().out
    skipped = [ln for ln in text.splitlines() if "skipped" in ln and "mnist-ae" in ln]
    assert len(skipped) == 2  # the one line for the problem, and the summary
    assert skipped[0].startswith("mnist-ae: skipped, its data is absent (mnist: could not find")
    assert "4 runs done now, 0 were already finished, 4 skipped" in text
    files = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    assert len(files) == 4 and all(n.startswith("curves-ae__") for n in files)
    assert {n.split("__")[1] for n in files} == {"kbfgs", "sgd-m"}
    md = (out / "report.md").read_text()
    assert "### Compared with the paper" in md and "55.46 (Table 3)" in md
    assert not list(out.glob("*.ckpt"))
    # the same command again: nothing redone, nothing duplicated, the report rewritten
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "0 runs done now, 4 were already finished" in text
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == files


def test_reproduce_with_no_data_at_all_is_a_clean_error(tmp_path, capsys):
    rc = main(["reproduce", "--problems", "mnist-ae", "--data-dir", str(tmp_path),
               "--out", str(tmp_path / "o"), *TINY])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("kbfgs: error: nothing to report") and "Traceback" not in err


@pytest.mark.slow
def test_killed_reproduce_resumes_without_redoing_a_finished_run(tmp_path):
    out = tmp_path / "repro"
    args = ["-m", "kbfgs", "reproduce", "--problems", "curves-ae", "--methods", "sgd-m",
            "adam", "--seeds", "2", "--out", str(out), *TINY]
    finished = kill_after_first_result([PY, *args], out, timeout=180)
    assert 1 <= len(finished) < 4, "the reproduction must be killed part-way"
    rerun = subprocess.run([PY, *args], check=False, capture_output=True, text=True,
                           timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert (f"{4 - len(finished)} runs done now, {len(finished)} were already finished"
            in rerun.stdout)
    assert len(list(out.glob("*.json"))) == 4
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime
    assert (out / "report.md").is_file()
