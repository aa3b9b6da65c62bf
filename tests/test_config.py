"""ModelConfig: validation, presets, Hugging Face round trip, and parameter counts."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from conftest import tiny_config
from dsv3_min.config import PRESETS, ModelConfig, count_params, get_preset


@pytest.mark.parametrize("kw,field", [
    (dict(attention="gqa", num_attention_heads=8, num_key_value_heads=3, hidden_size=64), "num_key_value_heads"),
    (dict(n_group=2, topk_group=3, n_routed_experts=8, num_experts_per_tok=2), "topk_group"),
    (dict(n_routed_experts=8, num_experts_per_tok=9, n_group=1, topk_group=1), "num_experts_per_tok"),
    (dict(n_routed_experts=10, n_group=4, topk_group=1, num_experts_per_tok=2), "n_group"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(attention="mha"), "attention"),
    (dict(norm_scheme="postnorm"), "norm_scheme"),
    (dict(attn_backend="cuda"), "attn_backend"),
    (dict(mla_impl="fast"), "mla_impl"),
    (dict(hidden_size=0), "hidden_size"),
    (dict(first_k_dense_replace=99, num_hidden_layers=4), "first_k_dense_replace"),
    (dict(rope_scaling={"type": "dynamic", "factor": 2.0}), "rope_scaling"),
    (dict(bias_update_speed=-1.0), "bias_update_speed"),
])
def test_bad_values_raise_naming_the_field(kw, field):
    """Every impossible value raises ValueError whose message names the offending field."""
    with pytest.raises(ValueError, match=field):
        ModelConfig(**kw)


def test_replace_and_from_dict_reject_unknown_fields():
    """Unknown field names are refused with the list of valid ones (CLI --set relies on this)."""
    with pytest.raises(ValueError, match="unknown ModelConfig field.*valid"):
        PRESETS["cpu-tiny"].replace(hiden_size=3)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="available"):
        get_preset("gpu-huge")


def test_q_lora_rank_zero_means_none():
    """q_lora_rank=0 and None both mean a plain W_q (no query compression)."""
    assert ModelConfig(q_lora_rank=0).q_lora_rank is None


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_through_transformers(name):
    """to_hf() builds a DeepseekV3Config, and from_hf() of it gives back the same ModelConfig (also via JSON)."""
    cfg = PRESETS[name]
    assert ModelConfig.from_hf(DeepseekV3Config(**cfg.to_hf())) == cfg
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_extensions_round_trip_in_config_json():
    """Our extension fields travel in config.json under 'dsv3_min' and come back."""
    cfg = tiny_config(attention="gqa", num_key_value_heads=2, gated_attention=True, norm_scheme="deepnorm",
                      mla_impl="absorb", bias_update_speed=0.0)
    assert ModelConfig.from_hf(json.loads(json.dumps(cfg.to_hf()))) == cfg


def test_reads_deepseek_official_rope_scaling_spelling():
    """DeepSeek's own config.json spelling (rope_scaling with 'type', rope_theta apart) is read as YaRN."""
    d = PRESETS["deepseek-v3"].to_hf()
    d.pop("rope_parameters")
    d["rope_theta"] = 10000
    d["rope_scaling"] = {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1, "mscale": 1.0,
                         "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}
    assert ModelConfig.from_hf(d) == PRESETS["deepseek-v3"]


def test_671b_parameter_counts():
    """The 671B shape counts 671.0B total and 37.5-37.6B active (MTP excluded, reported apart: ~11.6B)."""
    pc = count_params(PRESETS["deepseek-v3"])
    assert round(pc.total / 1e9, 1) == 671.0
    assert 37.5e9 <= pc.active <= 37.6e9
    assert 11.5e9 < pc.mtp < 11.7e9


def test_gpu_small_is_the_baseline_shape():
    """gpu-small is the 284M-parameter shape of shared/reference/baselines.md."""
    c = PRESETS["gpu-small"]
    assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.n_routed_experts, c.q_lora_rank) == (32000, 1024, 8, 16, 384)
    assert round(count_params(c).total / 1e6) == 284


@settings(max_examples=8, deadline=None)
@given(q_lora=st.sampled_from([None, 16]), n_group=st.sampled_from([1, 2, 4]), dense=st.integers(0, 2),
       tie=st.booleans(), kv=st.sampled_from([8, 24]))
def test_count_params_equals_transformers_numel(q_lora, n_group, dense, tie, kv):
    """count_params(cfg).total equals the number of parameters transformers allocates for the same config."""
    cfg = tiny_config(q_lora_rank=q_lora, n_group=n_group, topk_group=1, first_k_dense_replace=dense,
                      tie_word_embeddings=tie, kv_lora_rank=kv, num_hidden_layers=2)
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**cfg.to_hf()))
    n = sum(p.numel() for p in m.parameters()) + sum(
        b.numel() for k, b in m.named_buffers() if k.endswith("e_score_correction_bias"))
    assert count_params(cfg).total == n


def test_no_query_compression_survives_config_json():
    """q_lora_rank=None (plain W_q) survives transformers' config.json (written as null), not reverting to 1536."""
    cfg = tiny_config(q_lora_rank=None)
    assert ModelConfig.from_hf(DeepseekV3Config(**cfg.to_hf()).to_dict()) == cfg
    assert ModelConfig.from_hf(json.loads(DeepseekV3Config(**cfg.to_hf()).to_json_string())) == cfg
