"""The Hugging Face ``Trainer`` calls ``optimizer.step()`` without a closure: K-BFGS refuses it
(docs/api.md, "Frameworks"), kbfgs-plus (``closure_free=True``, its default) trains under it.
transformers is an optional test dependency; without it these tests are skipped."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import kbfgs

transformers = pytest.importorskip("transformers")

STEPS = 30


class Regressor(nn.Module):
    """A model in the Trainer's contract: keyword inputs, a dict output with the loss."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))

    def forward(self, x, labels=None):
        out = self.net(x)
        loss = None if labels is None else 0.5 * (out - labels).pow(2).sum(1).mean()
        return {"loss": loss, "logits": out}


def _data(n=64):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 6, generator=g)
    y = torch.tanh(x @ torch.randn(6, 3, generator=g))
    return x, y, [{"x": x[i], "labels": y[i]} for i in range(n)]


def _train(model, opt, tmp_path):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=16, max_steps=STEPS,
        lr_scheduler_type="constant", max_grad_norm=0.0, logging_strategy="no",
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_data()[2],
                                   optimizers=(opt, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.train()


def _full_loss(model):
    x, y, _ = _data()
    with torch.no_grad():
        return float(model(x, y)["loss"])


def test_hf_trainer_trains_kbfgs_plus(tmp_path):
    model = Regressor()
    opt = kbfgs.make_optimizer("kbfgs-plus", model, lr=0.01, update_freq=2)
    before = _full_loss(model)
    _train(model, opt, tmp_path)
    after = _full_loss(model)
    assert opt.steps == STEPS and opt.skipped_steps == 0 and not opt.demoted
    assert opt.curvature_updates == STEPS // 2 - 1  # the last curvature step's pair waits
    assert math.isfinite(after) and after < 0.5 * before


def test_hf_trainer_with_kbfgs_is_refused_naming_the_docs(tmp_path):
    model = Regressor()
    opt = kbfgs.KBFGS(model, lr=0.1, damping=1.0)
    with pytest.raises(RuntimeError, match="requires a closure"):
        _train(model, opt, tmp_path)
