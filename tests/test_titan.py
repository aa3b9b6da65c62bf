"""torchtitan's DeepSeek-V3 (0.2.2, the `titan` extra), the second training peer of bench/train_throughput.py, is our
model: same weights loaded through its own HF adapter, same outputs on CPU in fp32 (bench/titan_peer.py)."""
import importlib.util
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from conftest import tiny_config
from dsv3_min.hf import save_pretrained
from dsv3_min.model import DeepSeekV3
from dsv3_min.train import train_config_for

_spec = importlib.util.spec_from_file_location("titan_peer", Path(__file__).parent.parent / "bench" / "titan_peer.py")
titan_peer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(titan_peer)


def test_titan_matches_ours_router_attention_moe_logits():
    """On test-tiny (MTP off, random router biases) torchtitan's router picks the same experts with the same weights,
    its MLA and MoE layers and its logits (its final norm given our eps) equal ours within the measured fp32 error."""
    res = titan_peer.check(seed=0)
    assert res["router_ids_equal"], res
    for key, tol in titan_peer.TOLERANCES.items():
        assert res[key] <= tol, (key, res)
    assert res["tokens_flipped"] == 0, res


def test_titan_step_runs_its_bias_update(tmp_path):
    """`titan_step` trains torchtitan's model through the package's `train_step` with torchtitan's own bias-update hook:
    the loss is finite, the expert biases move and the per-step expert counts are reset after each step."""
    cfg = tiny_config(num_nextn_predict_layers=0)
    tc = replace(train_config_for("test-tiny", compile=False), batch_size=2, seq_len=16)
    torch.manual_seed(0)
    save_pretrained(DeepSeekV3(cfg), tmp_path)
    model = titan_peer.load_titan(tmp_path, cfg, tc.seq_len)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 4096)
    step = titan_peer.titan_step(model, tc, torch.device("cpu"), tokens)
    for i in range(2):
        parts, _ = step(i)
        assert torch.isfinite(parts[0])
    moes = [b.moe for b in model.layers.values() if b.moe_enabled]
    assert all(m.expert_bias.abs().sum() > 0 for m in moes)
    assert all(m.tokens_per_expert.sum() == 0 for m in moes)
