"""Tests of dsv3_min.step: the one training step (the hand-made sequence, bit for bit, router update included) and the
validation loss."""
import contextlib
import math

import numpy as np
import pytest
import torch

from conftest import tiny_config
from dsv3_min.model import DeepSeekV3
from dsv3_min.optim import make_optimizer
from dsv3_min.step import train_step, val_loss
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
