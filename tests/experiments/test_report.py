"""``kbfgs report``: damaged result files are skipped with a warning; the Table 7 layout and the
comparison with the paper's numbers."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from kbfgs.experiments import paper_results as pr
from kbfgs.experiments.cli import main
from kbfgs.experiments.problems import METHODS, PROBLEM_NAMES, get_problem
from kbfgs.experiments.report import load_results, result_problem, write_report


def fake_result(problem: str = "curves-ae", method: str = "kbfgs", seed: int = 1,
                loss: float | None = 55.0, val_acc: float | None = None,
                budget: float = 10.0) -> dict[str, Any]:
    """A result file as the runner writes it (the fields the report reads)."""
    classifier = get_problem(problem).classifier
    final: dict[str, Any] = {"iterations": 100, "epochs": 5.0, "process_time_s": budget,
                             "time_per_iter_s": budget / 100, "diverged": loss is None,
                             "train_loss": loss, "train_loss_set": "full training set"}
    log = [{"kind": "start", "iter": 0, "epoch": 0.0, "process_time": 0.0, "train_loss": 70.0},
           {"kind": "end", "iter": 100, "epoch": 5.0, "process_time": budget,
            "train_loss": loss}]
    if classifier:
        final["val_acc"] = val_acc
        for e, acc in zip(log, (0.1, val_acc)):
            e["val_acc"] = acc
    return {"schema": 1, "status": "finished", "run_id": f"{problem}__{method}__x__seed{seed}",
            "problem": problem, "method": method, "seed": seed, "hps": {"lr": 0.03},
            "spec": {"problem": problem, "method": method, "seed": seed, "hps": {"lr": 0.03},
                     "time_budget": None if classifier else budget,
                     "epochs": 1.5 if classifier else None},
            "problem_info": {"classifier": classifier, "description": problem},
            "data": {"note": f"{problem} test data | fake", "batch_size": 1000},
            "env": {"device": "cpu"}, "final": final, "log": log}


def _write(directory: Path, name: str, obj: Any) -> Path:
    path = directory / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _damaged() -> dict[str, Any]:
    """name -> content of result files the report must skip, each with a reason."""
    good = fake_result()
    no_final = {k: v for k, v in good.items() if k != "final"}
    seed_str = dict(good, seed="1")
    loss_str = dict(good, final=dict(good["final"], train_loss="55.0"))
    iters_float = dict(good, final=dict(good["final"], iterations=1.5))
    no_loss = dict(good, final={k: v for k, v in good["final"].items() if k != "train_loss"})
    log_bad = dict(good, log="nope")
    hps_list = dict(good, hps=[0.03])
    problem_int = dict(good, problem=3)
    return {
        "truncated.json": json.dumps(good)[:57],
        "empty.json": "",
        "list.json": "[1, 2]",
        "binary.json": "\udcff",  # written as bytes below
        "no_final.json": no_final,
        "seed_str.json": seed_str,
        "loss_str.json": loss_str,
        "iters_float.json": iters_float,
        "no_loss.json": no_loss,
        "log_bad.json": log_bad,
        "hps_list.json": hps_list,
        "problem_int.json": problem_int,
        "running.json": dict(good, status="running"),
    }


def test_result_problem_accepts_a_good_result_and_names_each_defect():
    assert result_problem(fake_result()) is None
    assert result_problem(fake_result("vgg16-cifar10", val_acc=0.9)) is None
    assert result_problem(fake_result(loss=None)) is None  # diverged: null loss is allowed
    assert "missing key 'final'" in result_problem(_damaged()["no_final.json"])
    assert "'seed' is not an integer" in result_problem(_damaged()["seed_str.json"])
    assert "'final.train_loss' is not a number" in result_problem(_damaged()["loss_str.json"])
    assert "'final.iterations' is not an integer" in result_problem(
        _damaged()["iters_float.json"])
    assert "missing key 'final.train_loss'" in result_problem(_damaged()["no_loss.json"])
    assert "'log'" in result_problem(_damaged()["log_bad.json"])
    assert "'hps' is not an object" in result_problem(_damaged()["hps_list.json"])
    assert "'problem' is not a string" in result_problem(_damaged()["problem_int.json"])
    assert "not a JSON object" in result_problem([1, 2])


def test_report_warns_about_every_skipped_file_and_never_stops(tmp_path, capsys):
    _write(tmp_path, "good1.json", fake_result(seed=1, loss=55.0))
    _write(tmp_path, "good2.json", fake_result(seed=2, loss=57.0))
    damaged = _damaged()
    for name, content in damaged.items():
        if name == "binary.json":
            (tmp_path / name).write_bytes(b"\xff\xfe\x00garbage")
        else:
            _write(tmp_path, name, content)
    # a grid summary is not a result file: skipped without a warning
    (tmp_path / "grids").mkdir()
    _write(tmp_path / "grids", "best__curves-ae__kbfgs.json",
           {"problem": "curves-ae", "best_hps": {}, "settings": []})
    assert main(["report", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == len(damaged), err
    for name in damaged:
        (line,) = [ln for ln in lines if f"{tmp_path / name}:" in ln]
        assert line.startswith("kbfgs report: warning: skipped ")
        assert len(line.split(": ", 3)[-1]) > 5  # a reason follows the file name
    assert "best__" not in err and "Traceback" not in err
    report = (tmp_path / "report.md").read_text()
    assert "2 finished runs" in report and "56.00 \u00b1 0.71" in report  # std 1 / sqrt(2)


def test_load_results_warn_none_is_silent(tmp_path, capsys):
    _write(tmp_path, "t.json", "{")
    assert load_results(tmp_path, warn=None) == []
    assert capsys.readouterr().err == ""


def test_paper_tables_match_the_paper_text_and_the_registry():
    text = next(Path("/work/shared/paper").glob("*.txt"), None)
    for table in (pr.TABLE3, pr.TABLE4, pr.TABLE7):
        for method, values in table.items():
            assert method in METHODS
            assert set(values) <= set(PROBLEM_NAMES)
    assert set(pr.TABLE3) == set(pr.TABLE3_METHODS) and set(pr.TABLE4) == set(pr.TABLE4_METHODS)
    assert set(pr.TABLE7) == set(pr.TABLE7_METHODS) == set(pr.TABLE7_IMPROVEMENTS)
    # K-BFGS and K-BFGS-20 are the same rows in Tables 3 and 7 (Appendix D.2.1)
    assert pr.TABLE7["kbfgs"] == pr.TABLE3["kbfgs"]
    assert pr.TABLE7["kbfgs-20"] == pr.TABLE3["kbfgs-20"]
    if text is None:  # the paper's text is not shipped with the package
        pytest.skip("paper text not available")
    body = text.read_text()
    # Table 3 / 7 rows: the three numbers in the paper's order MNIST, FACES, CURVES
    for title, method in (("K-BFGS(L)-20", "kbfgs-l-20"), ("KFAC", "kfac"),
                          ("SGD-m", "sgd-m"), ("K-BFGS (#2 off)", "kbfgs-no-minibatch")):
        table = pr.TABLE7 if "#" in title else pr.TABLE3
        nums = "\t".join(f"{table[method][p]:.2f}" for p in pr.AE_PROBLEMS)
        assert re.search(re.escape(title) + r"\t(yes|no\t)*.*" + re.escape(nums), body), title
    for method, title in (("kbfgs", "K-BFGS"), ("sgd-m", "SGD-m")):
        nums = "\t".join(f"{pr.TABLE4[method][p]:.2f}" for p in pr.CNN_PROBLEMS)
        assert f"{title}\t{nums}" in body


def test_report_has_table7_layout_and_the_paper_comparison(tmp_path):
    losses = {"kbfgs": 55.5, "kbfgs-no-dpdlm": 55.9, "kbfgs-no-minibatch": 55.8,
              "kbfgs-20": 56.1, "adam": 55.2}
    for m, loss in losses.items():
        for seed in (1, 2):
            _write(tmp_path, f"{m}-{seed}.json",
                   fake_result(method=m, seed=seed, loss=loss + 0.1 * seed))
    _write(tmp_path, "vgg.json", fake_result("vgg16-cifar10", "kfac", val_acc=0.9012))
    _write(tmp_path, "fm.json", fake_result("fmnist-ae", "kbfgs", loss=20.0))  # not in paper
    out = write_report(tmp_path, out=tmp_path / "r.md")
    md = out.read_text()
    t7 = md[md.index("### Ablation (Table 7 layout)"):]
    t7 = t7[:t7.index("\n\n#")] if "\n\n#" in t7 else t7
    assert "| name of algorithm | improvement #1 | improvement #2 | curves-ae | fmnist-ae |" in t7
    assert "| K-BFGS | yes | yes | 55.65 \u00b1 0.04 | 20.00 |" in t7
    assert "| K-BFGS (#1 off) | no | yes | 56.05 \u00b1 0.04 |  |" in t7
    assert "| K-BFGS (#2 off) | yes | no | 55.95 \u00b1 0.04 |  |" in t7
    assert "| K-BFGS-20 | no | no | 56.25 \u00b1 0.04 |  |" in t7
    t3 = md[md.index("### Training loss (Table 3 style)"):md.index("### Ablation")]
    assert "(#1 off)" not in t3 and "| Adam |" in t3  # the ablations are in Table 7 only
    cmp_ = md[md.index("### Compared with the paper"):]
    assert "copied from the paper, not measured here" in cmp_
    rows = [ln for ln in cmp_.splitlines() if ln.startswith(("| curves-ae", "| vgg16", "| fmnist"))]
    assert not any(r.startswith("| fmnist") for r in rows)  # the paper has no such number
    (kb,) = [r for r in rows if "| K-BFGS |" in r]
    assert "55.65 \u00b1 0.04" in kb and "55.46 (Table 3)" in kb
    assert "curves-ae test data \\| fake" in kb  # our data, escaped for markdown
    assert "10 s process time" in kb and "500 s process time" in kb
    assert "Hinton & Salakhutdinov" in kb
    (nodp,) = [r for r in rows if "(#1 off)" in r]
    assert "55.86 (Table 7)" in nodp
    (vgg,) = [r for r in rows if r.startswith("| vgg16-cifar10")]
    assert "90.12" in vgg and "94.44 (Table 4)" in vgg and "150 epochs" in vgg


def test_report_without_ablation_has_no_table7(tmp_path):
    _write(tmp_path, "a.json", fake_result(method="kbfgs"))
    md = write_report(tmp_path).read_text()
    assert "Table 7 layout" not in md and "### Training loss (Table 3 style)" in md
