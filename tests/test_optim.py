"""Tests of dsv3_min.optim: the LR schedule, the AdamW parameter groups, and the FLOPs-per-token formula (closed
forms, and the matmul FLOPs PyTorch really runs, counted by torch.utils.flop_counter.FlopCounterMode)."""
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from conftest import tiny_config
from dsv3_min.model import DeepSeekV3
from dsv3_min.optim import flops_per_token, lr_at, mfu, param_groups
from dsv3_min.train import TrainConfig


def test_lr_schedule_shape():
    """Warm-up is linear to the peak, the plateau holds it, the cosine falls monotonically to exactly lr*min_lr_ratio
    at the last step; with a time budget the schedule follows the clock when that is further along."""
    tc = TrainConfig(max_steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1, decay_frac=0.5)
    lrs = [lr_at(s, tc) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert lrs[10:50] == pytest.approx([1.0] * 40)  # progress s/99 <= 0.5
    assert lrs[99] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(lrs[50:], lrs[51:]))  # the decay never goes back up
    assert lrs[70] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (70 / 99 - 0.5) / 0.5)))
    timed = TrainConfig(max_steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1, decay_frac=0.5, time_budget=60.0)
    assert lr_at(20, timed, elapsed=10.0) == 1.0 and lr_at(20, timed, elapsed=60.0) == pytest.approx(0.1)
    assert lr_at(20, timed, elapsed=45.0) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    no_decay = TrainConfig(max_steps=10, warmup=1, lr=1.0, decay_frac=0.0, time_budget=5.0)
    assert lr_at(5, no_decay, elapsed=9.0) == pytest.approx(0.1)  # past the budget: the floor, no division by zero


def test_param_groups_decay_matrices_only():
    """Every ≥2-D parameter except the embedding decays; norms, biases and the embedding do not; none is lost."""
    model = DeepSeekV3(tiny_config())
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 and "embed_tokens" not in names[id(p)] for p in decay["params"])
    assert any("embed_tokens" in names[id(p)] for p in no_decay["params"])
    assert any("norm" in names[id(p)] and p.ndim == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_flops_per_token_dense_closed_form():
    """For a dense MHA model without MTP the formula reduces to 6·(L·(4d²+3dI) + Vd) + 6·L·S·d."""
    L, d, I, V, H, S = 3, 64, 96, 97, 4, 128
    cfg = tiny_config(attention="gqa", num_hidden_layers=L, first_k_dense_replace=L, num_nextn_predict_layers=0,
                      hidden_size=d, intermediate_size=I, vocab_size=V, num_attention_heads=H)
    assert flops_per_token(cfg, S) == 6 * (L * (4 * d * d + 3 * d * I) + V * d) + 6 * L * S * d
    assert mfu(1000.0, cfg, S, 1e12) == pytest.approx(1000.0 * flops_per_token(cfg, S) / 1e12)
    assert mfu(1000.0, cfg, S, None) is None


def test_flops_per_token_counts_active_experts_and_mtp():
    """Matmul parameters in the formula equal the real model's active matrices (k of E experts), MTP included."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    n = 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.startswith("embed_tokens"):
            continue
        n += p.numel() * k // E if ".experts." in name else p.numel()
    n += cfg.num_nextn_predict_layers * cfg.vocab_size * cfg.hidden_size  # the MTP depth reuses lm_head
    attn = 3 * (cfg.num_hidden_layers + 1) * cfg.num_attention_heads * 16 * (cfg.qk_head_dim + cfg.v_head_dim)
    assert flops_per_token(cfg, 16) == 6 * n + attn


def _counted(cfg, B, S) -> int:
    "FLOPs FlopCounterMode counts for one forward + backward of `model.loss` on a (B, S) batch."
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    x = torch.randint(0, cfg.vocab_size, (B, S + 1))
    with FlopCounterMode(display=False) as counter:
        model.loss(x[:, :-1], x[:, 1:]).loss.backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("over", [{}, dict(attention="gqa"), dict(q_lora_rank=None), dict(tie_word_embeddings=True)],
                         ids=["mla", "gqa", "mla-no-q-lora", "tied"])
def test_flops_per_token_matches_flop_counter(over):
    """FlopCounterMode counts every matmul (mm, bmm, addmm) of a forward+backward and nothing elementwise (norms, RoPE,
    softmax, SwiGLU products are not counted by either side). Per token it must equal the formula EXACTLY, once the
    two known differences are added: the eager attention computes the full S×S square (the formula counts the causal
    half: + 3·L·H·S·(dqk+dv)), and the balance loss is one einsum Σ_e f_e·P_e per MoE layer (2BE forward + 2BE
    backward). The MoE runs its `loop` implementation (exactly k experts' work per token; `grouped` pads on CPU)."""
    cfg = tiny_config(moe_impl="loop", num_nextn_predict_layers=0, **over)
    B, S = 2, 32
    dqk, dv = (cfg.qk_head_dim, cfg.v_head_dim) if cfg.attention == "mla" else (cfg.head_dim, cfg.head_dim)
    full_square = 3 * cfg.num_hidden_layers * cfg.num_attention_heads * S * (dqk + dv)
    n_moe = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    expected = B * S * (flops_per_token(cfg, S) + full_square) + n_moe * 4 * B * cfg.n_routed_experts
    assert _counted(cfg, B, S) == expected


def test_flops_per_token_mtp_matches_flop_counter():
    """With MTP depth 1 the MTP block runs on S-1 positions (the formula rounds that to S per token): the counted
    FLOPs added by MTP equal B·(S-1)·(6·N_mtp + 6·H·(S-1)·(dqk+dv)) + the MTP MoE's balance einsum, exactly, where
    6·N_mtp is what the formula adds for MTP minus its attention term."""
    B, S = 2, 32
    base, mtp = (tiny_config(moe_impl="loop", num_nextn_predict_layers=D) for D in (0, 1))
    H, dqkv = mtp.num_attention_heads, mtp.qk_head_dim + mtp.v_head_dim
    six_n_mtp = flops_per_token(mtp, S) - flops_per_token(base, S) - 3 * H * S * dqkv
    added = B * (S - 1) * (six_n_mtp + 6 * H * (S - 1) * dqkv) + 4 * B * mtp.n_routed_experts
    assert _counted(mtp, B, S) - _counted(base, B, S) == added
