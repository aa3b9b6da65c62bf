"""Shared fixtures: tiny configs and deterministic seeding."""
import os
import warnings

import pytest
import torch

from dsv3_min.config import ModelConfig

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides) -> ModelConfig:
    """A tiny config (NOT a real model size) that exercises every V3 mechanism: MLA with query compression,
    a dense first layer then MoE with shared experts and 2 groups, MTP depth 1."""
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=128, q_lora_rank=32, kv_lora_rank=24,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=8, n_shared_experts=1,
                num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5, first_k_dense_replace=1,
                num_nextn_predict_layers=1, attn_backend="eager")
    base.update(overrides)
    return ModelConfig(**base)


@pytest.fixture
def tiny():
    """The tiny test config (see `tiny_config`)."""
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
