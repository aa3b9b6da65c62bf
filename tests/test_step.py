"""Tests of dsv3_min.step: the one training step (the hand-made sequence, bit for bit, router update included) and the
validation loss."""
import contextlib
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dsv3_min.model import DeepSeekV3, LossParts
from dsv3_min.optim import adamw_step, make_optimizer
from dsv3_min.step import StepLog, means, non_finite, train_step, val_loss
from dsv3_min.train import TrainConfig


def test_val_loss_uniform_model_gives_log_vocab():
    """A model whose logits are all zero has val loss ln V exactly, and bits/byte = log2(V)·tokens/bytes."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg)
    torch.nn.init.zeros_(model.lm_head.weight)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 1000).astype(np.uint16)
    vl = val_loss(model, tokens, 4, 32, None, torch.device("cpu"), contextlib.nullcontext)
    assert vl == pytest.approx(math.log(cfg.vocab_size), rel=1e-6)


def test_train_step_is_backward_clip_adamw_and_the_router_update():
    """One `train_step` (two micro-batches) equals, bit for bit, the documented sequence done by hand on a twin
    model: the mean of the micro-batch losses backpropagated, `clip_grad_norm_`, AdamW at the given learning rate,
    then `update_router_biases` on the step's expert load. Its loss parts and norm are the hand-made ones, the weights
    after it are equal, and so are the router biases, which moved (a step that skips the aux-loss-free bias update,
    or applies it to another load, fails here)."""
    cfg = tiny_config(bias_update_speed=0.01)
    torch.manual_seed(0)
    model, twin = DeepSeekV3(cfg), DeepSeekV3(cfg)
    twin.load_state_dict(model.state_dict())
    tc = TrainConfig(lr=1e-2)
    opt, opt2 = (make_optimizer(m, tc, torch.device("cpu")) for m in (model, twin))
    g = torch.Generator().manual_seed(1)
    batches = [(x[:, :-1], x[:, 1:]) for x in torch.randint(0, cfg.vocab_size, (2, 2, 9), generator=g)]
    before = [m.gate.e_score_correction_bias.clone() for m in model.moe_layers()]
    parts, norm = train_step(model, opt, batches, lr=3e-3, grad_clip=0.5)
    want = torch.zeros(4)
    for x, y in batches:
        lp = twin.loss(x, y)
        (lp.loss / 2).backward()
        want += torch.stack([t.detach().float() for t in lp]) / 2
    want_norm = torch.nn.utils.clip_grad_norm_(twin.parameters(), 0.5)
    for group in opt2.param_groups:
        group["lr"] = 3e-3
    opt2.step()
    twin.update_router_biases()
    assert torch.equal(parts, want) and torch.equal(norm, want_norm) and float(norm) > 0.5
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
    after = [m.gate.e_score_correction_bias for m in model.moe_layers()]
    assert all(not torch.equal(a, b) for a, b in zip(before, after))
    assert all(p.grad is None for p in model.parameters())  # ready for the next step


def _nan_at(*calls_that_fail):
    "A loss function that returns NaN parts on the given calls (1-based) and `lm_loss` otherwise."
    calls = []

    def loss_fn(model, x, y):
        calls.append(1)
        lp = model.loss(x, y)
        return LossParts(*(t * float("nan") for t in lp)) if len(calls) in calls_that_fail else lp
    return loss_fn


def _state(model, opt):
    "Copies of every tensor of the model's state dict (router biases included) and of the optimizer's state."
    return [t.clone() for t in model.state_dict().values()] + [t.clone() for s in opt.state.values() for t in s.values()]


def _optimizer(kind, model):
    "Fused or plain torch AdamW, or our Muon (Muon for matrices, AdamW for the rest, as `make_optimizer` builds it)."
    if kind == "muon":
        return make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-2), torch.device("cpu"))
    return torch.optim.AdamW(model.parameters(), lr=1e-2, fused=kind == "fused")


@pytest.mark.parametrize("kind", ["fused", "plain", "muon"])
def test_a_non_finite_step_is_skipped_with_every_later_one_until_the_flag_is_read(kind):
    """Given the device flag `healthy`, a step whose loss is NaN leaves every weight, router bias, moment, momentum
    buffer and step count bit for bit as they were and sets the flag False; the next step, finite, is skipped too.
    A fused AdamW and our Muon skip on the device (`found_inf`), a plain AdamW reads the flag on the host: the same
    end state. With the flag True again, a finite step does change the weights (the skip is not a no-op step)."""
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config(bias_update_speed=0.01))
    opt = _optimizer(kind, model)
    g = torch.Generator().manual_seed(1)
    batches = [(x[:, :-1], x[:, 1:]) for x in torch.randint(0, model.config.vocab_size, (3, 2, 9), generator=g)]
    loss_fn = _nan_at(2)
    healthy = torch.ones((), dtype=torch.bool)
    train_step(model, opt, batches[:1], loss_fn, 3e-3, 0.5, healthy=healthy)
    before = _state(model, opt)
    parts = [train_step(model, opt, [b], loss_fn, 3e-3, 0.5, healthy=healthy)[0] for b in batches[1:]]
    assert math.isnan(parts[0][0]) and math.isfinite(parts[1][0]) and not bool(healthy)
    assert all(torch.equal(a, b) for a, b in zip(before, _state(model, opt)))
    assert all(p.grad is None for p in model.parameters())
    healthy.fill_(True)
    train_step(model, opt, batches[:1], loss_fn, 3e-3, 0.5, healthy=healthy)
    assert bool(healthy) and not all(torch.equal(a, b) for a, b in zip(before, _state(model, opt)))


@pytest.mark.parametrize("kind", ["fused", "muon"])
def test_a_step_with_the_device_flag_reads_nothing_back_to_the_host(kind):
    """With `healthy` and an optimizer that takes `found_inf` (fused AdamW, our Muon), `train_step` never copies a
    number to the host (no `aten._local_scalar_dense`, what `.item()`, `bool()` and `float()` of a tensor run);
    without the flag it reads the loss's finiteness once (Muon: and AdamW's step count of each of its 1-D tensors).
    A small model of linear layers, so that the model's own forward reads nothing either."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Reads(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.n += func is torch.ops.aten._local_scalar_dense.default
            return func(*args, **(kwargs or {}))

    def loss_fn(model, x, y):
        loss = torch.nn.functional.mse_loss(model(x), y)
        return LossParts(loss, loss, loss * 0, loss * 0)

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True) if kind == "fused"
           else make_optimizer(model, TrainConfig(optimizer="muon", lr=1e-2), torch.device("cpu")))
    x, y = torch.randn(8, 4), torch.randn(8, 4)
    counts = []
    for healthy in (torch.ones((), dtype=torch.bool), None):
        with Reads() as reads:
            train_step(model, opt, [(x, y)], loss_fn, 1e-3, 1.0, healthy=healthy)
        counts.append(reads.n)
    assert counts == ([0, 1] if kind == "fused" else [0, 3])


def test_muon_skipping_on_the_device_takes_the_same_finite_step_as_without_the_flag():
    """Muon's device-side skip changes nothing on a finite step: one step with the flag and one without give the same
    weights and optimizer state to fp32 rounding (measured 6e-8; tolerance 5e-7). One step, because Muon's bf16
    Newton-Schulz turns any rounding difference into bf16-sized ones at the next step."""
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (2, 9), generator=g)
    ends = []
    for healthy in (torch.ones((), dtype=torch.bool), None):
        torch.manual_seed(0)
        model = DeepSeekV3(tiny_config(bias_update_speed=0.01))
        opt = _optimizer("muon", model)
        train_step(model, opt, [(x[:, :-1], x[:, 1:])], lr=3e-3, grad_clip=0.5, healthy=healthy)
        ends.append(_state(model, opt))
    assert all(torch.allclose(a.cpu(), b, rtol=0, atol=5e-7) for a, b in zip(*ends))


def test_adamw_step_with_keep_equals_the_host_path_over_steps_and_skips_exactly():
    """`adamw_step` with a device `keep` (step counts and bias corrections on the device) follows the host path over
    five steps to fp32 rounding (relative 1e-6), and a step with keep 0 moves no weight, moment or count."""
    gen = torch.Generator().manual_seed(0)
    ps = [torch.randn(5, generator=gen), torch.randn(3, generator=gen)]
    group = dict(betas=(0.9, 0.95), lr=1e-2, weight_decay=0.1, eps=1e-8)
    a, b = [p.clone() for p in ps], [p.clone() for p in ps]
    sa, sb = {p: {} for p in a}, {p: {} for p in b}
    one = torch.ones(())
    for _ in range(5):
        for pa, pb in zip(a, b):
            pa.grad = torch.randn(pa.shape, generator=gen)
            pb.grad = pa.grad.clone()
        adamw_step(sa, a, group)
        adamw_step(sb, b, group, keep=one)
    assert all(torch.allclose(x, y, rtol=1e-6, atol=0) for x, y in zip(a, b))
    before = [t.clone() for t in b] + [t.clone() for st in sb.values() for t in st.values()]
    for pb in b:
        pb.grad = torch.full(pb.shape, float("nan"))
    adamw_step(sb, b, group, keep=torch.zeros(()))
    assert all(torch.equal(x, y) for x, y in zip(before, [*b, *(t for st in sb.values() for t in st.values())]))


def test_step_log_reads_a_window_at_once_and_averages_it_exactly():
    """`StepLog` keeps each step's [loss, main, mtp, balance, grad_norm] on the device and `read` returns them all with
    the learning rates and the index of the first non-finite step, then starts empty; `means` of one row is that row,
    and of several the exactly rounded mean (`math.fsum`)."""
    log = StepLog(torch.device("cpu"))
    rows = [[0.1, 0.2, 0.3, 0.4, 0.5], [1.0, 2.0, 3.0, 4.0, 5.0], [float("nan"), 1, 1, 1, 1], [1, 1, 1, 1, float("inf")]]
    for i, r in enumerate(rows):
        log.add(torch.tensor(r[:4]), torch.tensor(r[4]), lr=i / 10)
    got, lrs, bad = log.read()
    assert len(log) == 0 and lrs == [0.0, 0.1, 0.2, 0.3] and bad == 2
    f32 = [[float(torch.tensor(v)) for v in r] for r in rows]
    assert got[:2] == f32[:2] and means(got[:1]) == got[0]
    assert means(got[:2]) == [math.fsum(c) / 2 for c in zip(*f32[:2])]
    assert non_finite(*got[3][0:5:4]) == "non-finite gradient norm (inf)" and non_finite(1.0, 2.0) is None
