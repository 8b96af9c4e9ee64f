"""Training frameworks (issue 11, item 9): the recipes of docs/api.md, "Using kbfgs in your
training code", run under the frameworks themselves.

PyTorch Lightning is an optional test dependency (``pip install -e .[frameworks]``); without it
these tests are skipped.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import kbfgs

pl = pytest.importorskip("lightning.pytorch")


STEPS = 12
UPDATE_FREQ = 2  # curvature steps: 2, 4, ..., 12 -> 6 extra closure calls


def _data(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    w = torch.randn(6, 3, generator=g)
    return x, torch.tanh(x @ w)


class TinyModule(pl.LightningModule):
    """The recipe of docs/api.md: K-BFGS in automatic optimisation (Lightning passes the
    closure), metrics logged only when ``in_extra_pass`` is False."""

    def __init__(self, guard: bool = True):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 3))
        self.guard = guard
        self.logged: list[str] = []
        self.training_steps = 0

    def forward(self, x):
        return self.net(x)

    def log(self, name, value, *args, **kwargs):  # count every log call
        self.logged.append(name)
        super().log(name, value, *args, **kwargs)

    def training_step(self, batch, batch_idx):
        self.training_steps += 1
        x, y = batch
        loss = 0.5 * (self(x).float() - y).pow(2).sum(1).mean()
        if not (self.guard and self.optimizers().in_extra_pass):
            self.log("train_loss", loss, on_step=True, prog_bar=False)
        return loss

    def configure_optimizers(self):
        return kbfgs.KBFGS(self, lr=0.1, damping=1.0, update_freq=UPDATE_FREQ)


def _fit(module: TinyModule, tmp_path, precision="32-true", steps=STEPS):
    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16,
                                         shuffle=False)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, precision=precision,
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's hints (num_workers, ...)
        trainer.fit(module, loader)
    return trainer


def _full_loss(module: TinyModule) -> float:
    x, y = _data()
    with torch.no_grad():
        return float(0.5 * (module(x) - y).pow(2).sum(1).mean())


def test_lightning_logs_metrics_once_per_step(tmp_path):
    module = TinyModule()
    trainer = _fit(module, tmp_path)
    opt = trainer.optimizers[0]
    assert isinstance(opt, kbfgs.KBFGS)
    assert opt.steps == STEPS
    # the closure ran twice on each curvature step ...
    assert module.training_steps == STEPS + STEPS // UPDATE_FREQ
    # ... but the metric was logged once per step
    assert module.logged == ["train_loss"] * STEPS
    assert not opt.in_extra_pass


def test_without_the_flag_lightning_logs_twice_on_curvature_steps(tmp_path):
    # what the flag prevents: the control of the test above
    module = TinyModule(guard=False)
    _fit(module, tmp_path)
    assert len(module.logged) == STEPS + STEPS // UPDATE_FREQ


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_lightning_trains(tmp_path, precision):
    module = TinyModule()
    before = _full_loss(module)
    trainer = _fit(module, tmp_path, precision=precision, steps=40)
    after = _full_loss(module)
    opt = trainer.optimizers[0]
    assert opt.steps == 40 and opt.skipped_steps == 0
    assert opt.curvature_updates == 40 // UPDATE_FREQ
    assert math.isfinite(after) and after < 0.5 * before
    # curvature stays in float32 under bf16 autocast
    for st in opt.layer_state.values():
        assert st.H_A.dtype == torch.float32 and st.H_G.dtype == torch.float32


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="Lightning runs 16-mixed as bf16-mixed on CPU")
def test_lightning_fp16_with_a_scaler_is_refused_with_a_clear_error(tmp_path):
    # Lightning's "16-mixed" calls GradScaler.step(optimizer), i.e. step() without a closure
    class CudaModule(TinyModule):
        def configure_optimizers(self):
            return kbfgs.KBFGS(self, lr=0.1, damping=1.0)

    x, y = _data()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    trainer = pl.Trainer(max_steps=2, accelerator="cuda", devices=1, precision="16-mixed",
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(RuntimeError, match="closure"):
            trainer.fit(CudaModule(), loader)


# ---------------------------------------------------------------------------------------------
# kbfgs-plus with closure_free=True: no extra pass, step() with or without a closure
# ---------------------------------------------------------------------------------------------


class PlusModule(TinyModule):
    """kbfgs-plus without the extra pass: Lightning's closure runs once per step."""

    def configure_optimizers(self):
        return kbfgs.make_optimizer("kbfgs-plus", self, lr=0.01, update_freq=UPDATE_FREQ,
                                    closure_free=True)


class ManualPlusModule(PlusModule):
    """Manual optimisation: ``manual_backward`` then ``step()`` without a closure."""

    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        opt.zero_grad()
        loss = 0.5 * (self(x).float() - y).pow(2).sum(1).mean()
        self.manual_backward(loss)
        opt.step()
        self.training_steps += 1
        return loss


@pytest.mark.parametrize("cls,precision", [(PlusModule, "32-true"), (PlusModule, "bf16-mixed"),
                                           (ManualPlusModule, "32-true")])
def test_lightning_trains_kbfgs_plus_without_the_extra_pass(tmp_path, cls, precision):
    module = cls()
    before = _full_loss(module)
    trainer = _fit(module, tmp_path, precision=precision, steps=40)
    after = _full_loss(module)
    opt = trainer.optimizers[0]
    opt = getattr(opt, "optimizer", opt)  # manual optimisation hands out a wrapper
    assert opt.steps == 40 and opt.skipped_steps == 0
    assert module.training_steps == 40  # one forward-backward per step: no extra pass
    # every curvature step's pair is completed by the next step's pass (the last one waits)
    assert opt.curvature_updates == 40 // UPDATE_FREQ - 1
    assert not opt.demoted
    assert math.isfinite(after) and after < 0.5 * before
