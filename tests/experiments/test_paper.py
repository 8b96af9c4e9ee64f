"""The paper's numbers are written once (kbfgs.experiments.paper): the problems' defaults, the
runner's method registry and the benchmarks' hyper-parameters agree with them by construction.
"""

from __future__ import annotations

import pytest

import common  # bench/common.py: bench/ is on pytest's pythonpath (pyproject.toml)
import time_to_loss
from kbfgs.experiments import paper
from kbfgs.experiments.problems import (
    METHOD_FACTORY,
    METHOD_HPS,
    METHOD_TITLES,
    METHODS,
    PEERS,
    RUNNER_METHODS,
    get_problem,
)
from kbfgs.optim.factory import OPTIMIZER_NAMES, title, valid_hps

_AE = {"mnist": "mnist-ae", "faces": "faces-ae", "curves": "curves-ae"}


@pytest.mark.parametrize("dataset", sorted(_AE))
def test_autoencoder_defaults_are_table6(dataset):
    p = get_problem(_AE[dataset])
    for method, (lr, damping) in paper.TABLE6[dataset].items():
        hp = p.defaults(method)
        assert (hp["lr"], hp.get("damping")) == (lr, damping), (dataset, method)
    # Table 7's variants take K-BFGS's value
    for variant in ("kbfgs-no-dpdlm", "kbfgs-no-minibatch"):
        assert p.defaults(variant) == p.defaults("kbfgs")
    assert p.defaults("kbfgs-t20")["update_freq"] == 20 and p.defaults("kbfgs")["update_freq"] == 1
    assert (p.defaults("kfac")["stat_freq"], p.defaults("kfac")["inv_freq"]) == (1, 20)


@pytest.mark.parametrize("name", sorted(paper.TABLE8))
def test_cnn_defaults_are_table8(name):
    p = get_problem(name)
    assert set(p.hps) == set(paper.TABLE8[name]) | {"kbfgs-plus", "kbfgs-plus-extra", "muon",
                                                     "soap", "shampoo"}
    for method, (lr, wd, damping) in paper.TABLE8[name].items():
        hp = p.defaults(method)
        assert (hp["lr"], hp["weight_decay"], hp.get("damping")) == (lr, wd, damping)
    assert p.defaults("kbfgs")["update_freq"] == 20
    assert (p.defaults("kfac")["stat_freq"], p.defaults("kfac")["inv_freq"]) == (10, 100)
    # kbfgs-plus: its setting with the CNN grid's lr, K-BFGS's T and decay per step (lr * wd)
    plus, kb = p.defaults("kbfgs-plus"), p.defaults("kbfgs")
    assert (plus["lr"], plus["damping"], plus["update_freq"]) == (0.01, 1.0, 20)
    assert plus["beta2"] == 0.95
    # the one setting's graft and momentum (row grafting: an option, docs/api.md)
    assert (plus["graft"], plus["nesterov"]) == ("layer", True)
    assert plus["lr"] * plus["weight_decay"] == pytest.approx(kb["lr"] * kb["weight_decay"])
    # the peers: the resnet32-fmnist grid's lr, the same decay per step
    for peer, lr in (("muon", 3e-3), ("soap", 3e-3), ("shampoo", 1e-4)):
        hp = p.defaults(peer)
        assert hp["lr"] == lr
        assert hp["lr"] * hp["weight_decay"] == pytest.approx(kb["lr"] * kb["weight_decay"])


def test_the_former_copies_agree_by_construction():
    """bench/common.py (step time), bench/time_to_loss.py and the problems read one table."""
    fm = get_problem("fmnist-ae")
    for name, hp in common.family_hps("ae").items():
        for key, value in hp.items():
            assert fm.defaults(name)[key] == value, (name, key)
    for name, (lr, wd, damping) in paper.TABLE8["resnet32-cifar10"].items():
        hp = common.family_hps("cnn")[name]
        assert (hp["lr"], hp["weight_decay"], hp.get("damping")) == (lr, wd, damping)
    # time_to_loss: Table 6 CURVES except its two documented changes
    for label, (name, hp) in time_to_loss.HPS["curves-ae"].items():
        method = {"kbfgs(T=20)": "kbfgs-t20", "kfac(1,20)": "kfac"}.get(label, label)
        lr, damping = paper.TABLE6["curves"][method]
        if label == "kbfgs-20":
            assert (hp["lr"], hp["damping"]) == (lr, 0.1)
        elif label == "kfac(1,20)":
            assert (hp["lr"], hp["damping"]) == (0.1, 10.0)
        else:
            assert (hp["lr"], hp.get("damping")) == (lr, damping), label
        assert name == METHOD_FACTORY[method]


def test_the_runner_registry_reads_the_library_registry():
    assert set(METHOD_FACTORY.values()) == set(OPTIMIZER_NAMES)
    for method, rm in RUNNER_METHODS.items():
        assert set(rm.hps) <= set(valid_hps(rm.optimizer)), method
        if method not in ("kbfgs-t20", "kbfgs-plus-extra"):
            assert METHOD_TITLES[method] == title(rm.optimizer)
    assert METHOD_TITLES["kbfgs-t20"] == "K-BFGS \u2020 (T=20)"
    assert METHOD_TITLES["kbfgs-plus-extra"] == "K-BFGS+ (extra pass)"
    assert METHODS[:10] == ("kbfgs", "kbfgs-t20", "kbfgs-no-dpdlm", "kbfgs-no-minibatch",
                            "kbfgs-l", "kbfgs-20", "kbfgs-l-20", "kfac", "adam", "sgd-m")
    assert METHODS[10:12] == ("kbfgs-plus", "kbfgs-plus-extra")
    assert METHODS[12:] == PEERS
    assert METHOD_HPS["kfac"] == ("lr", "damping", "weight_decay", "momentum", "stat_freq",
                                  "inv_freq", "likelihood")
