"""Hugging Face interop: checkpoints load and save both ways with the same fp32 logits as transformers."""
import json
import re
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from conftest import tiny_config
from dsv3_min.hf import CheckpointError, from_pretrained, save_pretrained
from dsv3_min.model import DeepSeekV3

transformers.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
REL_TOL = 1e-5  # max |logit difference| / max |logit|, fp32

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32, "mscale_all_dim": 1.0}
CONFIGS = {
    "qlora-groups2-dense1-yarn-untied": dict(q_lora_rank=32, n_group=2, topk_group=1, first_k_dense_replace=1,
                                             rope_scaling=YARN, tie_word_embeddings=False),
    "noqlora-groups1-dense0-tied": dict(q_lora_rank=None, n_group=1, topk_group=1, first_k_dense_replace=0,
                                        tie_word_embeddings=True),
    "qlora-groups4-dense2": dict(q_lora_rank=32, n_group=4, topk_group=2, first_k_dense_replace=2, num_hidden_layers=3),
    "noqlora-groups2-dense0-yarn-tied": dict(q_lora_rank=None, n_group=2, topk_group=2, first_k_dense_replace=0,
                                             rope_scaling=YARN, tie_word_embeddings=True),
}


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _hf_model(cfg, seed=0):
    """transformers' model for cfg with non-trivial expert weights and a non-zero router correction bias."""
    torch.manual_seed(seed)
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_hf())).eval()
    with torch.no_grad():
        for layer in m.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.1)
                for p in layer.mlp.experts.parameters():
                    p.normal_(0, 0.05)
    return m


@pytest.mark.parametrize("name", CONFIGS)
def test_theirs_to_ours_same_logits(name, tmp_path):
    """A transformers checkpoint (save_pretrained) loads into DeepSeekV3 and gives the same fp32 logits."""
    cfg = tiny_config(**CONFIGS[name])
    theirs = _hf_model(cfg)
    theirs.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="no MTP weights"):
        ours = from_pretrained(tmp_path).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert _rel_err(ours(x), theirs(x).logits) < REL_TOL


@pytest.mark.parametrize("name", CONFIGS)
def test_ours_to_theirs_same_logits(name, tmp_path):
    """DeepSeekV3.save_pretrained writes a directory transformers loads, with the same fp32 logits."""
    cfg = tiny_config(**CONFIGS[name])
    torch.manual_seed(1)
    ours = DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.1)
    ours.save_pretrained(tmp_path)
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        assert _rel_err(ours(x), theirs(x).logits) < REL_TOL


def test_round_trip_keeps_mtp_and_config(tmp_path):
    """Our own save -> load keeps every tensor (the MTP layer `model.layers.{L}` included) and the config."""
    cfg = tiny_config(num_nextn_predict_layers=1, gated_attention=False)
    a = DeepSeekV3(cfg)
    save_pretrained(a, tmp_path)
    keys = json.loads((tmp_path / "config.json").read_text())
    assert keys["num_nextn_predict_layers"] == 1
    b = from_pretrained(tmp_path)
    assert b.config == cfg
    for (ka, ta), (kb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(ta, tb), ka


def test_merged_expert_keys_and_shards_load(tmp_path):
    """transformers v5's merged expert keys (gate_up_proj/down_proj) load, and so does a sharded directory."""
    cfg = tiny_config(tie_word_embeddings=False)
    theirs = _hf_model(cfg)
    merged = {k: v.contiguous() for k, v in theirs.state_dict().items()}
    assert any(k.endswith("experts.gate_up_proj") for k in merged)
    save_file(merged, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({**cfg.to_hf(), "num_nextn_predict_layers": 0}))
    ours = from_pretrained(tmp_path).eval()
    x = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        assert _rel_err(ours(x), theirs(x).logits) < REL_TOL
    shard_dir = tmp_path / "sharded"
    save_pretrained(ours, shard_dir, max_shard_bytes=20_000)
    assert len(list(shard_dir.glob("model-*-of-*.safetensors"))) > 1 and (shard_dir / "model.safetensors.index.json").exists()
    again = from_pretrained(shard_dir).eval()
    theirs2 = DeepseekV3ForCausalLM.from_pretrained(shard_dir).eval()
    with torch.no_grad():
        assert torch.equal(again(x), ours(x))
        assert _rel_err(ours(x), theirs2(x).logits) < REL_TOL


def test_bad_checkpoint_lists_every_problem(tmp_path):
    """Missing, unexpected and mis-shaped keys are reported together in one CheckpointError (nothing is loaded)."""
    cfg = tiny_config()
    save_pretrained(DeepSeekV3(cfg), tmp_path)
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("model.norm.weight")
    sd.pop("model.layers.1.mlp.experts.3.up_proj.weight")
    sd["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(2, 2)
    sd["model.extra.weight"] = torch.zeros(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError) as e:
        from_pretrained(tmp_path)
    msg = str(e.value)
    assert "missing: norm.weight" in msg
    assert "unexpected: model.extra.weight" in msg
    assert "mis-shaped: layers.0.self_attn.o_proj.weight" in msg
    assert "layers.1.mlp.experts" in msg  # the incomplete per-expert set
    assert "nothing was loaded" in msg


def test_truncated_file_gives_clear_error(tmp_path):
    """A truncated safetensors file is refused with an error naming the file."""
    save_pretrained(DeepSeekV3(tiny_config()), tmp_path)
    f = tmp_path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        from_pretrained(tmp_path)


def test_missing_config_and_fp8_are_refused(tmp_path):
    """A directory without config.json, or an FP8 checkpoint with weight_scale_inv tensors, is refused clearly."""
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    cfg = tiny_config()
    save_pretrained(DeepSeekV3(cfg), tmp_path)
    from safetensors.torch import load_file
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd["model.layers.0.self_attn.o_proj.weight_scale_inv"] = torch.ones(1)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="FP8"):
        from_pretrained(tmp_path)


def test_no_pickle_anywhere_in_the_package():
    """No module of dsv3_min calls torch.load or pickle: checkpoints are safetensors and JSON only."""
    root = Path(__file__).resolve().parent.parent / "dsv3_min"
    for f in root.glob("*.py"):
        src = f.read_text()
        assert not re.search(r"torch\.load\(|import pickle|pickle\.load", src), f.name
