"""The ``kbfgs`` command line end to end on tiny subsets and budgets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cases import kill_after_first_result
from kbfgs.experiments.cli import main

PY = sys.executable
FAST = ["--subset", "200", "--threads", "1", "--no-progress"]


def _png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_run_two_methods_then_report(tmp_path, capsys):
    out = tmp_path / "res"
    for method, seeds in (("kbfgs", ["1", "2"]), ("adam", ["1"])):
        rc = main(["run", "--problem", "curves-ae", "--optimizer", method, "--time-budget",
                   "0.8", "--seeds", *seeds, "--out", str(out), *FAST])
        assert rc == 0
    files = sorted(p.name for p in out.glob("*.json"))
    assert len(files) == 3 and all(f.startswith("curves-ae__") for f in files)
    res = json.loads((out / files[0]).read_text())
    assert res["spec"]["time_budget"] == 0.8 and res["env"]["torch_threads"] == 1
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| method | curves-ae |" in report  # Table 3 style
    assert "| K-BFGS |" in report and "| Adam |" in report
    assert "\u00b1" in report  # two seeds: mean +- std/sqrt(n)
    assert "(curves-ae.png)" in report
    assert _png(out / "curves-ae.png")
    assert "wrote" in capsys.readouterr().out


def test_demo_tiny(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--time-budget", "0.5", "--methods", "kbfgs", "sgd-m", "--problems",
               "curves-ae", "--out", str(out), *FAST])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| K-BFGS |" in text and "| SGD-m |" in text
    assert "final training loss" in text and "process ms / iteration" in text
    assert "stand-in" in text  # the CURVES data is said to be generated
    assert (out / "report.md").is_file() and _png(out / "curves-ae.png")
    assert len(list((out / "runs").glob("*.json"))) == 2
    # a second demo replaces the run files instead of piling them up
    assert main(["demo", "--time-budget", "0.3", "--methods", "adam", "--problems", "curves-ae",
                 "--out", str(out), *FAST]) == 0
    assert [p.name.split("__")[1] for p in (out / "runs").glob("*.json")] == ["adam"]


def test_bad_names_give_clear_errors(tmp_path, capsys):
    rc = main(["run", "--problem", "curves", "--optimizer", "kbfgs", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown problem 'curves'" in err
    assert "curves-ae" in err and "resnet32-fmnist" in err and "fmnist-ae" in err
    rc = main(["run", "--problem", "curves-ae", "--optimizer", "bfgs", "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown method 'bfgs'" in err and "kbfgs-l" in err
    rc = main(["run", "--problem", "curves-ae", "--optimizer", "sgd-m", "--damping", "1",
               "--out", str(tmp_path)])
    assert rc == 2 and "takes no hyper-parameter" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert not list(tmp_path.glob("*.json"))


def test_grid_cli_resumes(tmp_path, capsys):
    args = ["grid", "--problem", "curves-ae", "--optimizer", "sgd-m", "--lr", "0.001", "0.003",
            "--epochs", "1", "--out", str(tmp_path), *FAST]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "2 settings x 1 seeds = 2 runs" in first and "2 runs done now" in first
    assert "<- best" in first
    assert main(args) == 0
    again = capsys.readouterr().out
    assert "0 runs done now, 2 were already finished" in again
    assert (tmp_path / "grids" / "best__curves-ae__sgd-m.json").is_file()


def test_killed_grid_subprocess_resumes(tmp_path):
    """Kill a grid after its first result file appears; the rerun finishes the rest only."""
    out = tmp_path / "grid"
    args = ["-m", "kbfgs", "grid", "--problem", "curves-ae", "--optimizer", "sgd-m", "--lr",
            "0.001", "0.002", "0.003", "--time-budget", "0.4", "--out", str(out), *FAST]
    finished = kill_after_first_result([PY, *args], out, timeout=120)
    assert 1 <= len(finished) < 3, "the grid must be killed part-way"
    rerun = subprocess.run([PY, *args], check=False, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    done = 3 - len(finished)
    assert f"{done} runs done now, {len(finished)} were already finished" in rerun.stdout
    assert len(list(out.glob("*.json"))) == 3
    for name, mtime in finished.items():
        assert (out / name).stat().st_mtime_ns == mtime  # not rerun
    assert not list(out.glob(".*tmp*"))


def test_python_m_kbfgs_is_the_console_script():
    r = subprocess.run([PY, "-m", "kbfgs", "--help"], check=False, capture_output=True,
                       text=True,
                       timeout=120)
    assert r.returncode == 0
    for cmd in ("demo", "run", "grid", "report"):
        assert cmd in r.stdout

def test_demo_help_says_what_and_how_long(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "minutes" in text and "--fmnist" in text and "--time-budget" in text
    assert "Fashion-MNIST" in text and "stand-in" in text
    assert "K-BFGS(L)" in text and "KFAC" in text and "SGD-m" in text


@pytest.mark.slow
def test_demo_default_budget_runs(tmp_path):  # pragma: no cover - minutes
    r = subprocess.run([PY, "-m", "kbfgs", "demo", "--out", str(tmp_path), "--no-progress"],
                       check=False, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "report.md").is_file()


# --------------------------------------------------------------------------------------------
# Bad input: an argparse error (exit 2, one line naming the option), never a traceback or hang
# --------------------------------------------------------------------------------------------

_RUN = ["run", "--problem", "curves-ae", "--optimizer", "kbfgs"]
_GRID = ["grid", "--problem", "curves-ae", "--optimizer", "kbfgs"]
BAD_ARGS = [
    (_RUN + ["--time-budget", "nan"], "--time-budget"),
    (_RUN + ["--time-budget", "-3"], "--time-budget"),
    (_RUN + ["--time-budget", "0"], "--time-budget"),
    (_RUN + ["--epochs", "inf"], "--epochs"),
    (_RUN + ["--epochs", "1e400"], "--epochs"),
    (_RUN + ["--lr-decay-every", "-1"], "--lr-decay-every"),
    (_RUN + ["--lr-decay-every", "nan"], "--lr-decay-every"),
    (_RUN + ["--lr-decay-factor", "nan"], "--lr-decay-factor"),
    (_RUN + ["--lr-decay-factor", "-0.1"], "--lr-decay-factor"),
    (_RUN + ["--lr-decay-factor", "0"], "--lr-decay-factor"),
    (_RUN + ["--eval-subset", "0"], "--eval-subset"),
    (_RUN + ["--batch-size", "0"], "--batch-size"),
    (_RUN + ["--batch-size", "2.5"], "--batch-size"),
    (_RUN + ["--eval-every", "-1"], "--eval-every"),
    (_RUN + ["--eval-every", "inf"], "--eval-every"),
    (_RUN + ["--threads", "0"], "--threads"),
    (_RUN + ["--device", "foo"], "--device"),
    (_RUN + ["--device", "cuda:99"], "--device"),
    (_RUN + ["--subset", "-1"], "--subset"),
    (_RUN + ["--subset", "0"], "--subset"),
    (_RUN + ["--seeds", "-1"], "--seeds"),
    (_RUN + ["--checkpoint-every", "0"], "--checkpoint-every"),
    (_RUN + ["--lr", "nan"], "--lr"),
    (_RUN + ["--lr", "0"], "--lr"),
    (_RUN + ["--lr", "-0.1"], "--lr"),
    (_RUN + ["--damping", "inf"], "--damping"),
    (_RUN + ["--damping", "0"], "--damping"),
    (_RUN + ["--weight-decay", "-1"], "--weight-decay"),
    (_RUN + ["--weight-decay", "nan"], "--weight-decay"),
    (_RUN + ["--momentum", "1"], "--momentum"),
    (_RUN + ["--momentum", "-0.5"], "--momentum"),
    (_RUN + ["--update-freq", "0"], "--update-freq"),
    (_RUN + ["--history", "0"], "--history"),
    (["run", "--problem", "curves-ae", "--optimizer", "kfac", "--stat-freq", "0"], "--stat-freq"),
    (["run", "--problem", "curves-ae", "--optimizer", "kfac", "--inv-freq", "-2"], "--inv-freq"),
    (["run", "--problem", "curves-ae", "--optimizer", "kfac", "--likelihood", "poisson"],
     "--likelihood"),
    (_GRID + ["--lr", "0.1", "nan"], "--lr"),
    (_GRID + ["--damping", "-1"], "--damping"),
    (["demo", "--time-budget", "nan"], "--time-budget"),
    (["demo", "--threads", "0"], "--threads"),
    (["demo", "--subset", "-1"], "--subset"),
    (["reproduce", "--out", "x", "--budget-scale", "nan"], "--budget-scale"),
    (["reproduce", "--out", "x", "--budget-scale", "0"], "--budget-scale"),
    (["reproduce", "--out", "x", "--budget-scale", "2"], "--budget-scale"),
    (["reproduce", "--out", "x", "--seeds", "0"], "--seeds"),
]


@pytest.mark.parametrize("argv, flag", BAD_ARGS, ids=[" ".join(a[4:] if a[0] in ("run", "grid")
                                                               else a) for a, _ in BAD_ARGS])
def test_bad_numbers_are_argparse_errors(argv, flag, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*argv, *(["--out", str(tmp_path)] if argv[0] in ("run", "grid") else [])])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"error: argument {flag}" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # nothing trained, nothing written


@pytest.mark.parametrize("value", ["abc", "-5", "0", "inf", "nan"])
def test_bad_dist_timeout_is_a_clean_error_at_start(value, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("KBFGS_DIST_TIMEOUT", value)
    rc = main(_RUN + ["--time-budget", "1", "--out", str(tmp_path), *FAST])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("kbfgs: error: ") and "KBFGS_DIST_TIMEOUT" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_bad_input_through_the_console_has_no_traceback(tmp_path):
    env = dict(os.environ, KBFGS_DIST_TIMEOUT="abc")
    r = subprocess.run([PY, "-m", "kbfgs", *_RUN, "--out", str(tmp_path)], check=False,
                       capture_output=True, text=True, timeout=120, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "KBFGS_DIST_TIMEOUT" in r.stderr
    r = subprocess.run([PY, "-m", "kbfgs", *_RUN, "--time-budget", "nan", "--out",
                        str(tmp_path)], check=False, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "argument --time-budget" in r.stderr


def test_warm_start_flags(tmp_path, capsys):
    from kbfgs.experiments.cli import build_parser

    parse = build_parser().parse_args
    base = ["run", "--problem", "curves-ae", "--method", "kbfgs-plus"]
    assert parse(base).warm_start is None  # the method's default
    assert parse(base + ["--warm-start"]).warm_start is True
    assert parse(base + ["--no-warm-start"]).warm_start is False
    with pytest.raises(SystemExit):
        parse(base + ["--warm-start", "--no-warm-start"])
    assert "not allowed with" in capsys.readouterr().err
    out = tmp_path / "res"
    assert main(base + ["--warm-start", "--epochs", "0.5", "--out", str(out), *FAST]) == 0
    res = json.loads(next(out.glob("*.json")).read_text())
    assert res["spec"]["warm_start"] is True and res["stats"]["warm_started"] is True


def test_run_help_says_one_seed_by_default(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "One seed (1) by default" in text and "kbfgs reproduce" in text


def test_demo_uses_fashion_mnist_when_installed(monkeypatch, tmp_path):
    from kbfgs.experiments import cli

    monkeypatch.setattr(cli, "fashion_mnist_available", lambda data_dir: True)
    assert cli.demo_problems(None, False, None) == ["fmnist-ae"]
    monkeypatch.setattr(cli, "fashion_mnist_available", lambda data_dir: False)
    assert cli.demo_problems(None, False, None) == ["curves-ae"]
    assert cli.demo_problems(None, True, None) == ["curves-ae", "fmnist-ae"]
    assert cli.demo_problems(["curves-ae"], False, None) == ["curves-ae"]
    monkeypatch.undo()
    # an empty --data-dir does not hide Debian's copy; a missing one is not found anywhere
    debian = Path("/usr/share/datasets/fashion-mnist")
    assert cli.fashion_mnist_available(str(tmp_path)) == debian.is_dir()


def test_demo_explains_kfac_flat_start(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--time-budget", "0.3", "--methods", "kfac", "--problems", "curves-ae",
               "--out", str(out), *FAST])
    assert rc == 0
    text = capsys.readouterr().out
    (note,) = [ln for ln in text.splitlines() if ln.startswith("note: curves-ae KFAC")]
    assert "fixed damping" in note and "momentum SGD" in note and "docs/results.md" in note
    assert "## Notes" in (out / "report.md").read_text()
