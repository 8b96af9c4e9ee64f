"""kbfgs-plus (K-BFGS direction, Adam's per-layer step length): checked against torch's AdamW
and against K-BFGS itself, in float64."""

from __future__ import annotations

import copy
import gc
import math

import pytest
import torch
from torch import nn

import kbfgs
from kbfgs.optim.kbfgs_plus import (
    KBFGSPlus,
    adam_direction,
    average_Gamma,
    fisher_left_factor,
    graft,
    graft_rows,
)

DT = torch.float64


def _net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 6, generator=g, dtype=DT), torch.randn(8, 3, generator=g, dtype=DT))
            for _ in range(n)]


def _closure(opt, model, x, y):
    def closure():
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
        return loss
    return closure


def test_adam_direction_from_a_heavy_ball_buffer_is_adams():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(4, 3, generator=g, dtype=DT) for _ in range(5)]
    b1, b2, eps = 0.9, 0.99, 1e-8
    buf = torch.zeros(4, 3, dtype=DT)
    v = torch.zeros(4, 3, dtype=DT)
    m = torch.zeros(4, 3, dtype=DT)
    for k, gr in enumerate(grads, start=1):
        buf = b1 * buf + gr
        v = b2 * v + (1 - b2) * gr * gr
        m = b1 * m + (1 - b1) * gr  # Adam's first moment, by hand
        expected = (m / (1 - b1 ** k)) / ((v / (1 - b2 ** k)).sqrt() + eps)
        torch.testing.assert_close(adam_direction(buf, v.clone(), b1, b2, k, eps), expected,
                                   rtol=1e-12, atol=1e-14)


def test_graft_keeps_the_direction_and_sets_the_norm():
    P = torch.tensor([[3.0, 0.0], [0.0, 4.0]], dtype=DT)
    out = graft(P.clone(), torch.tensor(10.0, dtype=DT))
    torch.testing.assert_close(out, 2.0 * P)
    zero = graft(torch.zeros(2, 2, dtype=DT), torch.tensor(1.0, dtype=DT))
    assert torch.equal(zero, torch.zeros(2, 2, dtype=DT))


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_without_kronecker_layers_it_is_adamw(wd):
    """skip_layers=[nn.Linear]: every parameter is an other parameter, so kbfgs-plus without
    Nesterov momentum is AdamW (betas (momentum, beta2), decoupled decay) step for step."""
    model, ref_model = _net(), _net()
    opt = KBFGSPlus(model, lr=0.01, damping=1.0, weight_decay=wd, skip_layers=[nn.Linear],
                    beta2=0.99, nesterov=False)
    ref = torch.optim.AdamW(ref_model.parameters(), lr=0.01, betas=(0.9, 0.99), eps=1e-8,
                            weight_decay=wd)
    for x, y in _batches(6):
        opt.step(_closure(opt, model, x, y))
        ref.step(_closure(ref, ref_model, x, y))
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_first_step_is_kbfgs_direction_with_adams_length():
    """At step 1 Adam's direction is g / (|g| + eps): a layer moves by lr * sqrt(#entries with
    a non-zero gradient) along K-BFGS's own (momentum-free at step 1) direction."""
    model = _net()
    ref_model = copy.deepcopy(model)
    lr = 0.01
    opt = KBFGSPlus(model, lr=lr, damping=1.0)
    ref = kbfgs.KBFGS(ref_model, lr=1.0, damping=1.0)
    (x, y), = _batches(1)
    ref.warm_start([x])  # H_A from this minibatch, as kbfgs-plus's first step takes it
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(opt, model, x, y))
    ref.step(_closure(ref, ref_model, x, y))
    layers = {"0": (0, 1), "3": (4, 5)}  # (weight, bias) indices of the Linear layers
    params = list(model.parameters())
    ref_params = list(ref_model.parameters())
    for idx in layers.values():
        d_plus = torch.cat([(params[i].detach() - w0[i]).reshape(-1) for i in idx])
        d_ref = torch.cat([(ref_params[i].detach() - w0[i]).reshape(-1) for i in idx])
        cos = torch.dot(d_plus, d_ref) / (d_plus.norm() * d_ref.norm())
        assert float(cos) == pytest.approx(1.0, abs=1e-12)
        assert float(d_plus.norm()) == pytest.approx(lr * math.sqrt(d_plus.numel()), rel=1e-6)


def test_state_dict_round_trip_is_exact():
    model = _net()
    opt = KBFGSPlus(model, lr=0.01)
    data = _batches(6)
    for x, y in data[:3]:
        opt.step(_closure(opt, model, x, y))
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    for x, y in data[3:]:
        opt.step(_closure(opt, model, x, y))
    expected = [p.detach().clone() for p in model.parameters()]
    model2 = _net()
    model2.load_state_dict(saved_model)
    opt2 = KBFGSPlus(model2, lr=0.01)
    opt2.load_state_dict(saved)
    for x, y in data[3:]:
        opt2.step(_closure(opt2, model2, x, y))
    for a, b in zip(expected, model2.parameters()):
        assert torch.equal(a, b.detach())


@pytest.mark.parametrize("name,value", [("beta2", 1.0), ("beta2", float("nan")), ("eps", 0.0),
                                        ("eps", -1.0)])
def test_bad_arguments_are_value_errors_naming_them(name, value):
    with pytest.raises(ValueError, match=name):
        KBFGSPlus(_net(), **{name: value})


def test_factory_name_and_defaults():
    opt = kbfgs.make_optimizer("kbfgs-plus", _net())
    assert isinstance(opt, KBFGSPlus)
    assert opt.param_groups[0]["lr"] == 5e-3 and opt.param_groups[0]["damping"] == 1.0
    assert opt.beta2 == 0.95
    assert (opt.graft, opt.nesterov) == ("layer", True)


def test_runner_hands_beta2_to_the_optimizer():
    """beta2 is a runner hyper-parameter of kbfgs-plus (default 0.95, recorded in the results)."""
    from kbfgs.experiments.problems import get_problem
    from kbfgs.experiments.trainer import make_method_optimizer

    hps = get_problem("fmnist-ae").defaults("kbfgs-plus")
    assert hps["beta2"] == 0.95
    assert make_method_optimizer("kbfgs-plus", _net(), hps).beta2 == 0.95
    assert make_method_optimizer("kbfgs-plus", _net(), {**hps, "beta2": 0.99}).beta2 == 0.99


def test_cli_flags_graft_nesterov_and_init_reach_the_optimizer():
    """``kbfgs run --graft row --nesterov true --init-H-A identity`` sets the optimizer's
    options; a bad value is refused by the parser, naming the flag."""
    from kbfgs.experiments.cli import _GRAFTS, _INITS_H_A, _overrides, build_parser
    from kbfgs.optim.kbfgs_plus import GRAFTS, INITS_H_A

    assert (_GRAFTS, _INITS_H_A) == (GRAFTS, INITS_H_A)  # the parser's torch-free copies
    from kbfgs.experiments.problems import get_problem
    from kbfgs.experiments.trainer import make_method_optimizer

    args = build_parser().parse_args(["run", "--problem", "curves-ae", "--method", "kbfgs-plus",
                                      "--graft", "row", "--nesterov", "true",
                                      "--init-H-A", "identity", "--fisher-G", "yes"])
    over = {k: v for k, v in _overrides(args).items() if v is not None}
    assert over == {"graft": "row", "nesterov": True, "init_H_A": "identity", "fisher_G": True}
    hps = {**get_problem("curves-ae").defaults("kbfgs-plus"), **over}
    opt = make_method_optimizer("kbfgs-plus", _net(), hps)
    assert (opt.graft, opt.nesterov, opt.init_H_A, opt.fisher_G) == ("row", True, "identity",
                                                                     True)
    assert get_problem("curves-ae").defaults("kbfgs-plus")["init_H_A"] == "minibatch"
    for flag, value in (("--graft", "column"), ("--nesterov", "maybe"), ("--init-H-A", "eye"),
                        ("--fisher-G", "fisher")):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["run", "--problem", "curves-ae", "--method",
                                       "kbfgs-plus", flag, value])


# ---------------------------------------------------------------------------------------------
# closure_free=True: the "+" measurement from the next iteration's own forward-backward
# ---------------------------------------------------------------------------------------------


def _plain_step(opt, model, x, y):
    """A training loop without a closure, as for torch.optim.Adam."""
    opt.zero_grad()
    loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
    loss.backward()
    return opt.step()


@pytest.mark.parametrize("T,history", [(1, None), (3, None), (2, 4)])
def test_closure_free_on_a_repeated_minibatch_equals_the_extra_pass(T, history):
    """On one minibatch repeated, the next iteration's pass *is* Algorithm 2's extra pass (the
    same batch at the updated parameters): the closure-free trajectory equals the exact one.
    A no-grad evaluation pass between steps must not be recorded."""
    (x, y), = _batches(1)
    m1, m2 = _net(), _net()
    o1 = KBFGSPlus(m1, lr=0.01, update_freq=T, history=history, closure_free=False)
    o2 = KBFGSPlus(m2, lr=0.01, update_freq=T, history=history)  # closure_free by default
    probe = torch.randn(3, 6, dtype=DT)
    steps = 3 * T + 2
    for _ in range(steps):
        o1.step(_closure(o1, m1, x, y))
        assert _plain_step(o2, m2, x, y) is None
        with torch.no_grad():
            m2(probe)
    # the pair of a curvature step at the very end waits for its "+" iteration
    assert o2.curvature_updates == o1.curvature_updates - (steps % T == 0)
    assert o1.curvature_updates >= 3
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-15)


def test_closure_free_pair_is_the_difference_of_consecutive_minibatches():
    """One Linear layer, T = 1: after two steps the averaged pair is
    ``(1 - beta)(h_bar(W1; B2) - h_bar(W0; B1))`` and ``(1 - beta)(Dh_bar(W1; B2) -
    Dh_bar(W0; B1))``, with ``Dh_bar = m E_n[dL/dh]`` = the bias gradient, by hand."""
    torch.manual_seed(0)
    model = nn.Linear(6, 3).to(DT)
    # identity: step 1 forms the first half of a pair (a first-minibatch H_A would form none)
    opt = KBFGSPlus(model, lr=0.01, update_freq=1, closure_free=True, init_H_A="identity")
    (x1, y1), (x2, y2) = _batches(2)

    def h_and_Dh(W, b, x, y):
        W, b = W.clone().requires_grad_(True), b.clone().requires_grad_(True)
        h = x @ W.T + b
        loss = 0.5 * (h - y).pow(2).sum(1).mean()
        (gb,) = torch.autograd.grad(loss, [b])
        return h.detach().mean(0), gb

    W0, b0 = model.weight.detach().clone(), model.bias.detach().clone()
    _plain_step(opt, model, x1, y1)
    W1, b1 = model.weight.detach().clone(), model.bias.detach().clone()
    _plain_step(opt, model, x2, y2)
    h0, Dh0 = h_and_Dh(W0, b0, x1, y1)
    h1, Dh1 = h_and_Dh(W1, b1, x2, y2)
    st = opt.layer_state[""] if "" in opt.layer_state else next(iter(opt.layer_state.values()))
    beta = opt.beta
    torch.testing.assert_close(st.s_G, (1 - beta) * (h1 - h0), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st.y_G, (1 - beta) * (Dh1 - Dh0), rtol=1e-12, atol=1e-14)
    assert opt.curvature_updates == 1


def _resume_is_bit_identical(make_model, make_opt, data, split):
    """Run ``data`` in a plain loop, saving after ``data[:split]``; resume a model of another
    initialisation from the save and run the rest: the parameters must be equal. Returns the
    two optimizers and the saved ``state_dict``."""
    model = make_model(0)
    opt = make_opt(model)
    for x, y in data[:split]:
        _plain_step(opt, model, x, y)
    saved_model = copy.deepcopy(model.state_dict())
    saved = copy.deepcopy(opt.state_dict())
    for x, y in data[split:]:
        _plain_step(opt, model, x, y)
    model2 = make_model(5)
    model2.load_state_dict(saved_model)
    opt2 = make_opt(model2)
    opt2.load_state_dict(saved)
    for x, y in data[split:]:
        _plain_step(opt2, model2, x, y)
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    return opt, opt2, saved


def test_closure_free_resume_is_bit_identical():
    """The pending first half of a pair is saved: a run resumed between a curvature step and
    its "+" iteration continues exactly."""
    # step 3 is a curvature step: its pair waits for step 4
    opt, opt2, saved = _resume_is_bit_identical(
        lambda seed: _net(seed=seed),
        lambda m: KBFGSPlus(m, lr=0.01, update_freq=3, closure_free=True), _batches(8), 3)
    assert "pending_pair" in saved["kronecker"]
    assert opt2.curvature_updates == opt.curvature_updates


def test_closure_free_step_with_a_closure_runs_it_once_and_returns_its_loss():
    model = _net()
    opt = KBFGSPlus(model, lr=0.01, update_freq=1, closure_free=True)
    calls = []
    x, y = _batches(1)[0]

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = 0.5 * (model(x) - y).pow(2).sum(1).mean()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert len(calls) == 1 and torch.is_tensor(loss)


def test_without_closure_free_a_closure_is_still_required():
    model = _net()
    opt = KBFGSPlus(model, lr=0.01, closure_free=False)
    x, y = _batches(1)[0]
    with pytest.raises(RuntimeError, match="closure"):
        _plain_step(opt, model, x, y)
    with pytest.raises(TypeError, match="closure_free"):
        KBFGSPlus(model, closure_free=1)


def test_closure_free_pending_pair_of_the_wrong_shape_is_refused_before_loading():
    model = _net()
    opt = KBFGSPlus(model, lr=0.01, update_freq=1, closure_free=True, init_H_A="identity")
    x, y = _batches(1)[0]
    _plain_step(opt, model, x, y)
    sd = copy.deepcopy(opt.state_dict())
    sd["kronecker"]["pending_pair"]["0"]["h_bar"] = torch.zeros(7, dtype=DT)
    fresh = KBFGSPlus(_net(), lr=0.01, update_freq=1, closure_free=True, init_H_A="identity")
    with pytest.raises(ValueError, match=r"pending_pair.*'0'.*h_bar"):
        fresh.load_state_dict(sd)
    assert fresh.steps == 0 and not fresh.layer_state


def test_closure_free_micro_batches_equal_one_batch():
    """Gradient accumulation in the loop (two halves, each loss halved, one step()) records
    the same curvature as the whole batch: the trajectories agree to rounding."""
    data = _batches(7)
    m1, m2 = _net(), _net()
    o1 = KBFGSPlus(m1, lr=0.01, update_freq=2, closure_free=True)
    o2 = KBFGSPlus(m2, lr=0.01, update_freq=2, closure_free=True)
    for x, y in data:
        _plain_step(o1, m1, x, y)
        o2.zero_grad()
        for xm, ym in zip(x.chunk(2), y.chunk(2)):
            (0.5 * 0.5 * (m2(xm) - ym).pow(2).sum(1).mean()).backward()
        o2.step()
    assert o2.curvature_updates == o1.curvature_updates == 3 and not o2.demoted
    for a, b in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("collect", [False, True])
def test_closure_free_hooks_go_with_the_optimizer(collect):
    """The recording left open between steps is removed when the optimizer is dropped: at once
    (no reference cycle), or by the garbage collector when something holds it in a cycle."""
    model = _net()
    opt = KBFGSPlus(model, lr=0.01, update_freq=1)
    x, y = _batches(1)[0]
    _plain_step(opt, model, x, y)
    assert len(model[0]._forward_hooks) == 1
    if collect:
        opt.cycle = opt  # only the garbage collector can free it now
    gc.disable()
    try:
        del opt
        if collect:
            assert len(model[0]._forward_hooks) == 1
            gc.collect()
    finally:
        gc.enable()
    assert len(model[0]._forward_hooks) == 0 and len(model[3]._forward_hooks) == 0


def test_graft_rows_sets_each_rows_norm_and_keeps_its_direction():
    g = torch.Generator().manual_seed(3)
    P = torch.randn(4, 5, generator=g, dtype=DT)
    P[2] = 0.0  # a zero row stays zero
    norms = torch.tensor([1.0, 2.5, 7.0, 0.5], dtype=DT)
    out = graft_rows(P.clone(), norms)
    for i in range(4):
        if i == 2:
            assert torch.equal(out[i], torch.zeros(5, dtype=DT))
            continue
        expected = [float(v) * float(norms[i]) / math.sqrt(sum(float(u) ** 2 for u in P[i]))
                    for v in P[i]]
        assert out[i].tolist() == pytest.approx(expected, rel=1e-12)


def test_row_graft_first_step_moves_each_row_by_adams_length_along_kbfgs():
    """graft="row": at step 1 every output row of a layer moves by lr * sqrt(#entries of the
    row with a non-zero gradient), along that row of K-BFGS's own direction."""
    model = _net()
    ref_model = copy.deepcopy(model)
    lr = 0.01
    opt = KBFGSPlus(model, lr=lr, damping=1.0, graft="row", eps=1e-15)  # |g|/(|g|+eps) = 1
    ref = kbfgs.KBFGS(ref_model, lr=1.0, damping=1.0)
    (x, y), = _batches(1)
    ref.warm_start([x])  # H_A from this minibatch, as kbfgs-plus's first step takes it
    w0 = [p.detach().clone() for p in model.parameters()]
    opt.step(_closure(opt, model, x, y))
    ref.step(_closure(ref, ref_model, x, y))
    params, ref_params = list(model.parameters()), list(ref_model.parameters())
    for w, b in ((0, 1), (4, 5)):  # (weight, bias) of the Linear layers
        d_plus = torch.cat([params[w].detach() - w0[w],
                            (params[b].detach() - w0[b]).unsqueeze(1)], dim=1)
        d_ref = torch.cat([ref_params[w].detach() - w0[w],
                           (ref_params[b].detach() - w0[b]).unsqueeze(1)], dim=1)
        for row, row_ref in zip(d_plus, d_ref):
            cos = torch.dot(row, row_ref) / (row.norm() * row_ref.norm())
            assert float(cos) == pytest.approx(1.0, abs=1e-12)
            # the norms are summed in float32
            assert float(row.norm()) == pytest.approx(lr * math.sqrt(row.numel()), rel=1e-6)


def test_nesterov_without_kronecker_layers_is_adam_on_the_nesterov_momentum():
    """nesterov=True on the other parameters: the direction is Adam's with the heavy-ball buffer
    replaced by ``g + beta1 buf`` (float64 by hand)."""
    model = _net()
    w0 = [p.detach().clone() for p in model.parameters()]
    lr, b1, b2, eps = 0.01, 0.9, 0.95, 1e-8
    opt = KBFGSPlus(model, lr=lr, skip_layers=[nn.Linear], nesterov=True)
    ws = [w.clone() for w in w0]
    bufs = [torch.zeros_like(w) for w in w0]
    vs = [torch.zeros_like(w) for w in w0]
    for k, (x, y) in enumerate(_batches(4), start=1):
        opt.step(_closure(opt, model, x, y))
        ref = _net()
        with torch.no_grad():
            for p, w in zip(ref.parameters(), ws):
                p.copy_(w)
        loss = 0.5 * (ref(x) - y).pow(2).sum(1).mean()
        grads = torch.autograd.grad(loss, list(ref.parameters()))
        for i, gr in enumerate(grads):
            bufs[i] = b1 * bufs[i] + gr
            vs[i] = b2 * vs[i] + (1 - b2) * gr * gr
            m_hat = (gr + b1 * bufs[i]) * (1 - b1) / (1 - b1 ** (k + 1))  # k + 1 terms
            ws[i] = ws[i] - lr * m_hat / ((vs[i] / (1 - b2 ** k)).sqrt() + eps)
    for p, w in zip(model.parameters(), ws):
        torch.testing.assert_close(p.detach(), w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("graft_by", ["layer", "row"])
def test_nesterov_first_kronecker_step_follows_kbfgs_on_the_nesterov_momentum(graft_by):
    """At step 1 the Nesterov momentum is (1 + beta1) g: K-BFGS's direction and, bias-corrected
    over its two terms, Adam's length: the step without Nesterov."""
    model = _net()
    ref_model = copy.deepcopy(model)
    opt = KBFGSPlus(model, lr=0.01, damping=1.0, nesterov=True, graft=graft_by)
    ref = KBFGSPlus(ref_model, lr=0.01, damping=1.0, graft=graft_by, nesterov=False)
    (x, y), = _batches(1)
    opt.step(_closure(opt, model, x, y))
    ref.step(_closure(ref, ref_model, x, y))
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name,value,error", [("graft", "column", ValueError),
                                              ("nesterov", 1, TypeError)])
def test_bad_graft_or_nesterov_is_refused_naming_it(name, value, error):
    with pytest.raises(error, match=name):
        KBFGSPlus(_net(), **{name: value})


def test_graft_of_a_zero_matrix_to_a_large_norm_stays_zero():
    """norm / tiny overflows in float32 for a norm above about 4: no inf * 0 = NaN."""
    zero = graft(torch.zeros(2, 2), torch.tensor(50.0))
    assert torch.equal(zero, torch.zeros(2, 2))


def test_nesterov_kronecker_step_is_the_grafted_kbfgs_product_of_the_nesterov_momentum():
    """A step without a curvature update (T = 2, step 3), by hand in float64 from the state
    before it: ``P = H_G (G + b1 BUF) H_A`` with ``BUF = b1 BUF + G``, grafted to Adam's
    norm with the Nesterov first moment ``(1 - b1) M / (1 - b1^(k + 1))``."""
    model = _net()
    lr, b1, b2, eps = 0.01, 0.9, 0.95, 1e-8
    opt = KBFGSPlus(model, lr=lr, damping=1.0, update_freq=2, closure_free=False, nesterov=True)
    data = _batches(3)
    for x, y in data[:2]:
        opt.step(_closure(opt, model, x, y))
    layer = model[0]
    st = opt.layer_state["0"]
    buf, H_A, H_G = st.buf.clone(), st.H_A.clone(), st.H_G.clone()
    v = [opt.state[p]["exp_avg_sq"].clone() for p in (layer.weight, layer.bias)]
    k = opt.state[layer.weight]["adam_step"] + 1
    W = torch.cat([layer.weight.detach(), layer.bias.detach().unsqueeze(1)], dim=1).clone()
    x, y = data[2]
    opt.zero_grad()
    (0.5 * (model(x) - y).pow(2).sum(1).mean()).backward()
    G = torch.cat([layer.weight.grad, layer.bias.grad.unsqueeze(1)], dim=1).clone()
    buf = b1 * buf + G
    M = G + b1 * buf
    P = H_G @ M @ H_A
    v_all = torch.cat([b2 * v[0] + (1 - b2) * G[:, :-1] ** 2,
                       (b2 * v[1] + (1 - b2) * G[:, -1] ** 2).unsqueeze(1)], dim=1)
    D = ((1 - b1) * M / (1 - b1 ** (k + 1))) / ((v_all / (1 - b2 ** k)).sqrt() + eps)
    expected = W - lr * P * (D.norm() / P.norm())
    opt.step(_closure(opt, model, x, y))
    got = torch.cat([layer.weight.detach(), layer.bias.detach().unsqueeze(1)], dim=1)
    # the graft's norms are summed in float32
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-9)
    assert opt.curvature_updates == 1  # only step 2 updated H_A, H_G


# ------------------------------------------------------------------ first-minibatch H_A
def _conv_net(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 2)).to(DT)


def _conv_batch(seed=2, n=5):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 2, 4, 4, generator=g, dtype=DT),
            torch.randn(n, 2, generator=g, dtype=DT))


def _A_by_hand(model, x):
    """E_n[sum_t a_t a_t^T] of the conv (3x3 patches by F.unfold, a 1 appended) and of the
    Linear (its input with a 1), from the minibatch x."""
    patches = nn.functional.unfold(x, 3, padding=1).transpose(1, 2)  # (n, |T|, 18)
    a = torch.cat([patches, torch.ones(*patches.shape[:2], 1, dtype=DT)], 2)
    A_conv = torch.einsum("nti,ntj->ij", a, a) / x.shape[0]
    h = model[2](model[1](model[0](x))).detach()
    b = torch.cat([h, torch.ones(h.shape[0], 1, dtype=DT)], 1)
    return {"0": A_conv, "3": b.T @ b / x.shape[0]}


@pytest.mark.parametrize("closure_free", [True, False])
def test_first_minibatch_sets_H_A(closure_free):
    """Step 1 sets H_A = (A + lambda_A I)^-1 with A of that minibatch (Algorithm 2 line 3),
    computed by hand here; with init_H_A="identity" H_A stays I / lambda_A."""
    x, y = _conv_batch()
    model = _conv_net()
    A = _A_by_hand(model, x)
    opt = KBFGSPlus(model, lr=0.01, damping=0.3, update_freq=2, closure_free=closure_free)
    plain = KBFGSPlus(_conv_net(), lr=0.01, damping=0.3, update_freq=2, init_H_A="identity")
    for o, m in ((opt, model), (plain, plain.model)):
        o.step(_closure(o, m, x, y))
    for layer in opt.layers:
        st = opt.layer_state[layer.name]
        lam_A = opt._lambdas(layer, st.locations)[0]
        eye = torch.eye(A[layer.name].shape[0], dtype=DT)
        torch.testing.assert_close(st.H_A, torch.linalg.inv(A[layer.name] + lam_A * eye),
                                   rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(plain.layer_state[layer.name].H_A, eye / lam_A)
    assert opt.curvature_updates == 0


def test_first_minibatch_of_micro_batches_is_the_whole_batch():
    """A minibatch back-propagated in two halves before step() gives the whole batch's A."""
    x, y = _conv_batch(n=6)
    whole, split = _conv_net(), _conv_net()
    o1, o2 = KBFGSPlus(whole, lr=0.01), KBFGSPlus(split, lr=0.01)
    (0.5 * (whole(x) - y).pow(2).sum(1).mean()).backward()
    o1.step()
    for sl in (slice(0, 3), slice(3, 6)):
        (0.5 * (split(x[sl]) - y[sl]).pow(2).sum(1).sum() / 6).backward()
    o2.step()
    for name, st in o1.layer_state.items():
        torch.testing.assert_close(o2.layer_state[name].H_A, st.H_A, rtol=1e-10, atol=1e-12)


def test_first_minibatch_init_then_pairs_as_before():
    """T = 1: step 1 only initialises H_A (no pair); from step 2 on every step forms pairs,
    and a warm start before the first step replaces the first-minibatch H_A."""
    model = _net()
    opt = KBFGSPlus(model, lr=0.01, update_freq=1)
    for x, y in _batches(4):
        _plain_step(opt, model, x, y)
    assert opt.curvature_updates == 2  # the pairs of steps 2-3 and 3-4
    warm = KBFGSPlus(_net(), lr=0.01, update_freq=3)
    (x, y), (x2, _) = _batches(2)
    warm.warm_start([x2])
    H_A = {n: st.H_A.clone() for n, st in warm.layer_state.items()}
    _plain_step(warm, warm.model, x, y)
    for n, st in warm.layer_state.items():
        assert torch.equal(st.H_A, H_A[n])  # step 1 is not a curvature step: unchanged
    # T = 1 after a warm start: step 1 is a curvature step, so steps 1-2 form a pair
    warm1 = KBFGSPlus(_net(), lr=0.01, update_freq=1)
    warm1.warm_start([x2])
    for x, y in _batches(2):
        _plain_step(warm1, warm1.model, x, y)
    assert all(float(st.s_G.abs().sum()) > 0 for st in warm1.layer_state.values())
    with pytest.raises(ValueError, match="init_H_A"):
        KBFGSPlus(_net(), init_H_A="first")


# ------------------------------------------------------------------ fisher_G
def test_fisher_left_factor_is_the_damped_inverse_square_root():
    """``F = (I + Gamma / delta)^-1/2``, ``delta`` 1% of the mean eigenvalue: ``F`` symmetric
    with ``F (I + Gamma / delta) F = I``; a rank-deficient Gamma (and one with a negative
    rounding eigenvalue) is damped, a zero Gamma gives I."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(5, 3, generator=g, dtype=DT)
    for Gamma in (X @ X.T, X @ X.T - 1e-14 * torch.eye(5, dtype=DT)):  # rank 3
        F = fisher_left_factor(Gamma)
        delta = 0.01 * torch.trace(Gamma) / 5
        torch.testing.assert_close(F, F.T)
        torch.testing.assert_close(F @ (torch.eye(5, dtype=DT) + Gamma / delta) @ F,
                                   torch.eye(5, dtype=DT), rtol=0, atol=1e-9)
        assert float(torch.linalg.eigvalsh(F).min()) > 0
    torch.testing.assert_close(fisher_left_factor(torch.zeros(4, 4)), torch.eye(4))
    assert fisher_left_factor(X @ X.T).dtype == DT


def test_average_Gamma_starts_from_zero_and_keeps_a_non_finite_update_out():
    G = torch.tensor([[2.0, 1.0], [1.0, 4.0]], dtype=DT)
    first = average_Gamma(None, G, 0.9)
    torch.testing.assert_close(first, 0.1 * G)
    torch.testing.assert_close(average_Gamma(first, 2 * G, 0.9), 0.09 * G + 0.2 * G)
    bad = G.clone()
    bad[0, 1] = float("nan")
    assert torch.equal(average_Gamma(first, bad, 0.9), first)


def _bn_net(seed=0):
    """A conv feeding BatchNorm (its Dh_bar is 0 in exact arithmetic), then a Linear."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),
                         nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).to(DT)


def _conv_W(conv):
    return torch.cat([conv.weight.detach().reshape(conv.out_channels, -1),
                      conv.bias.detach().unsqueeze(1)], 1).clone()


def test_fisher_G_averages_kfacs_Gamma_and_replaces_H_G_of_the_batchnorm_fed_conv():
    """T = 1 without a closure: step 1 sets H_A, steps 2-3 form the conv's first pair, at
    rounding level (the conv joins the Fisher layers), steps 4-5 the first pair whose passes
    record Gamma, so Gamma = (1 - beta) (G_4 + G_5) / 2 with ``G_k = m / |T| sum g g^T`` of
    the conv output's gradient ``g`` in step k's pass (by hand here). Step 6 then moves the
    conv along ``F (G + b1 BUF) H_A`` with ``F`` the Fisher factor of that Gamma; the Linear
    keeps its H_G, and a model without such a layer is not changed by the option.
    (Step 6's pass also completes the pair of step 5, so its Gamma includes G_5 and G_6.)"""
    model = _bn_net()
    opt = KBFGSPlus(model, lr=0.01, damping=0.3, update_freq=1, fisher_G=True)
    conv = model[0]
    grads: list[torch.Tensor] = []

    def keep_grad(module, inputs, out):
        out.register_hook(grads.append)

    conv.register_forward_hook(keep_grad)
    data = [_conv_batch(seed=40 + k, n=6) for k in range(6)]
    for x, y in data[:5]:
        _plain_step(opt, model, x, y)
    assert opt.capture.gram == {"0"}
    assert opt.stats()["layers"]["0"]["fisher_G"] and not opt.stats()["layers"]["4"]["fisher_G"]

    def G_by_hand(gr):
        gf = gr.permute(0, 2, 3, 1).reshape(-1, 3)
        return 6 / 16 * gf.T @ gf

    st = opt.layer_state["0"]
    expected = (1 - opt.beta) * 0.5 * (G_by_hand(grads[3]) + G_by_hand(grads[4]))
    torch.testing.assert_close(st.Gamma, expected, rtol=1e-12, atol=1e-15)
    buf, H_A, W = st.buf.clone(), st.H_A.clone(), _conv_W(conv)
    x, y = data[5]
    _plain_step(opt, model, x, y)
    # step 6's pass completes the pair of step 5 before the step is taken
    expected = opt.beta * expected + (1 - opt.beta) * 0.5 * (G_by_hand(grads[4])
                                                             + G_by_hand(grads[5]))
    torch.testing.assert_close(st.Gamma, expected, rtol=1e-12, atol=1e-15)
    F = fisher_left_factor(expected)
    G = torch.cat([conv.weight.grad.reshape(3, -1), conv.bias.grad.unsqueeze(1)], 1)
    P = F @ (G + 0.9 * (0.9 * buf + G)) @ H_A
    step = W - _conv_W(conv)
    torch.testing.assert_close(step / step.norm(), P / P.norm(), rtol=1e-6, atol=1e-9)
    # without the Fisher factor the step would be along (G + b1 BUF) H_A (H_G = I / lambda_G)
    plain = (G + 0.9 * (0.9 * buf + G)) @ H_A
    assert float((step / step.norm() - plain / plain.norm()).norm()) > 1e-2
    # a model whose layers all learn an H_G: the option changes nothing
    runs = []
    for fisher in (False, True):
        m = _net()
        o = KBFGSPlus(m, lr=0.01, update_freq=1, fisher_G=fisher)
        for xb, yb in _batches(6):
            _plain_step(o, m, xb, yb)
        assert o.capture.gram == set()
        runs.append([p.detach().clone() for p in m.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_fisher_G_resume_is_bit_identical():
    """Gamma and the Gamma of a pending pair are saved: a run resumed between a curvature step
    and its "+" iteration continues exactly."""
    # step 8 is a curvature step: its pair waits for step 9
    _, opt2, saved = _resume_is_bit_identical(
        lambda seed: _bn_net(seed=seed),
        lambda m: KBFGSPlus(m, lr=0.01, update_freq=2, fisher_G=True),
        [_conv_batch(seed=50 + k, n=6) for k in range(12)], 8)
    assert "Gamma" in saved["kronecker"]["layers"]["0"]
    assert "G" in saved["kronecker"]["pending_pair"]["0"]
    assert opt2.capture.gram == {"0"}
    with pytest.raises(TypeError, match="fisher_G"):
        KBFGSPlus(_net(), fisher_G="yes")
