"""ModelConfig: typed validation, presets, Hugging Face round trip (unknown keys refused), and parameter counts."""
import json
import math

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


@pytest.mark.parametrize("kw,message", [
    (dict(rms_norm_eps="1e-6"), "ModelConfig.rms_norm_eps='1e-6': must be a float > 0"),
    (dict(rms_norm_eps="abc"), "ModelConfig.rms_norm_eps='abc': must be a float > 0"),
    (dict(rms_norm_eps=math.nan), "ModelConfig.rms_norm_eps=nan: must be a float > 0"),
    (dict(rope_theta=math.inf), "ModelConfig.rope_theta=inf: must be a float > 0"),
    (dict(routed_scaling_factor=True), "ModelConfig.routed_scaling_factor=True: must be a float > 0"),
    (dict(mtp_loss_weight=-0.5), "ModelConfig.mtp_loss_weight=-0.5: must be a float >= 0"),
    (dict(gated_attention="abc"), "ModelConfig.gated_attention='abc': must be true or false"),
    (dict(tie_word_embeddings="maybe"), "ModelConfig.tie_word_embeddings='maybe': must be true or false"),
    (dict(norm_topk_prob=1), "ModelConfig.norm_topk_prob=1: must be true or false"),
    (dict(attention_bias="false"), "ModelConfig.attention_bias='false': must be true or false"),
    (dict(num_hidden_layers=True), "ModelConfig.num_hidden_layers=True: must be a positive integer"),
    (dict(num_hidden_layers=4.0), "ModelConfig.num_hidden_layers=4.0: must be a positive integer"),
    (dict(num_hidden_layers="4"), "ModelConfig.num_hidden_layers='4': must be a positive integer"),
    (dict(n_shared_experts=-1), "ModelConfig.n_shared_experts=-1: must be a non-negative integer"),
    (dict(eos_token_id="abc"), "ModelConfig.eos_token_id='abc': must be a non-negative integer or None"),
    (dict(attention="gqa", num_key_value_heads="abc"), "ModelConfig.num_key_value_heads='abc': must be a positive integer <= 1024 or None"),
    (dict(q_lora_rank=-3), "ModelConfig.q_lora_rank=-3: must be a non-negative integer <= 65536 or None"),
    (dict(hidden_act="gelu"), "ModelConfig.hidden_act='gelu': must be one of ('silu',)"),
    (dict(attn_backend=None), "ModelConfig.attn_backend=None: must be one of ('eager', 'sdpa', 'flash', 'flash_attn')"),
    (dict(rope_scaling="abc"), "ModelConfig.rope_scaling='abc': must be a dict or None"),
    (dict(rope_scaling={"type": "yarn", "factr": 40}), "unknown key 'factr' (did you mean 'factor'?)"),
    (dict(rope_scaling={"type": "yarn", "factor": "40", "original_max_position_embeddings": 4096}),
     "factor must be a finite number, got '40'"),
    (dict(rope_scaling={"type": 2}), "type must be a string"),
])
def test_wrongly_typed_values_give_one_line_errors(kw, message):
    """Each field is checked by its declared type before use: floats refuse strings, bools and nan/inf; bools accept
    only True/False (never a truthy string); ints refuse bools, floats and strings; rope_scaling is None or a dict of
    known numeric keys. The error is one line naming class, field and value."""
    with pytest.raises(ValueError) as e:
        ModelConfig(**kw)
    assert message in str(e.value) and "\n" not in str(e.value)
    field = next(iter(kw)) if len(kw) == 1 else "num_key_value_heads"
    assert str(e.value).startswith(f"ModelConfig.{field}=")


def test_valid_numbers_are_accepted():
    """An int where a float is declared is fine, and so is None for optional ints: the checks are not too strict."""
    c = ModelConfig(rms_norm_eps=1, rope_theta=10000, pad_token_id=None, q_lora_rank=None,
                    rope_scaling={"type": "yarn", "factor": 4, "original_max_position_embeddings": 4096})
    assert c.rms_norm_eps == 1 and c.rope_scaling["factor"] == 4.0


def test_replace_and_from_dict_reject_unknown_fields():
    """Unknown field names are refused in one line naming the closest valid name (CLI --set and state.json rely on this)."""
    with pytest.raises(ValueError, match=r"unknown ModelConfig field 'hiden_size' \(did you mean 'hidden_size'\?\); valid"):
        PRESETS["cpu-tiny"].replace(hiden_size=3)
    with pytest.raises(ValueError, match="unknown ModelConfig field 'nope'; valid: vocab_size"):
        ModelConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="unknown ModelConfig fields 'num_hiden_layers' .*'rms_eps' \\(did you mean 'rms_norm_eps'"):
        ModelConfig.from_dict({"num_hiden_layers": 4, "rms_eps": 1e-6})
    with pytest.raises(ValueError, match="must be a float > 0"):
        ModelConfig.from_dict({**tiny_config().to_dict(), "rms_norm_eps": "1e-6"})
    with pytest.raises(ValueError, match="available"):
        get_preset("gpu-huge")


def _deepseek_config_json() -> dict:
    """DeepSeek-V3's own config.json (its spelling and extra keys: auto_map, quantization_config, ep_size, ...)."""
    return {"architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "auto_map": {"AutoConfig": "configuration_deepseek.DeepseekV3Config",
                         "AutoModel": "modeling_deepseek.DeepseekV3Model",
                         "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM"},
            "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
            "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
            "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
            "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
            "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
            "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
            "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
            "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [128, 128]},
            "rms_norm_eps": 1e-06, "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0,
                                                    "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096,
                                                    "type": "yarn"},
            "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
            "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
            "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280}


def test_real_config_json_spellings_load():
    """DeepSeek's own config.json and transformers' DeepseekV3Config(...).to_dict() / to_json_string() (with all their
    bookkeeping keys) load: the known-ignored keys are allowed, nothing else is."""
    assert ModelConfig.from_hf(_deepseek_config_json()) == PRESETS["deepseek-v3"]
    cfg = tiny_config(attention="gqa", num_key_value_heads=2)
    hf = DeepseekV3Config(**cfg.to_hf())
    assert ModelConfig.from_hf(hf.to_dict()) == cfg
    assert ModelConfig.from_hf(json.loads(hf.to_json_string())) == cfg
    assert ModelConfig.from_hf(hf) == cfg


@pytest.mark.parametrize("change,message", [
    ({"num_hiden_layers": 4}, "unknown config.json field 'num_hiden_layers' (did you mean 'num_hidden_layers'?)"),
    ({"rms_norm_eps": "1e-6"}, "ModelConfig.rms_norm_eps='1e-6': must be a float > 0"),
    ({"scoring_func": "softmax"}, "config.json scoring_func='softmax' is not supported"),
    ({"rope_interleave": False}, "config.json rope_interleave=False is not supported"),
    ({"dsv3_min": {"atention": "gqa"}}, "unknown config.json 'dsv3_min' field 'atention' (did you mean 'attention'?)"),
    ({"rope_theta": "abc"}, "ModelConfig.rope_theta='abc': must be a float > 0"),
])
def test_bad_config_json_gives_one_line_error(change, message):
    """A typo, a wrongly typed value or an unsupported V3 variant in config.json stops the load in one line."""
    with pytest.raises(ValueError) as e:
        ModelConfig.from_hf({**_deepseek_config_json(), **change})
    assert message in str(e.value) and "\n" not in str(e.value)


def test_to_json_returns_only_a_string():
    """to_json returns the JSON text (it writes nothing: files.write_json does that) and from_dict reads it back."""
    import inspect
    cfg = tiny_config()
    assert list(inspect.signature(ModelConfig.to_json).parameters) == ["self"]
    assert ModelConfig.from_dict(json.loads(cfg.to_json())) == cfg


def test_test_tiny_and_dense_presets():
    """`test-tiny` is the tests' tiny config (counts as in transformers, checked below); `gpu-small-dense` is GQA +
    SwiGLU in every layer whose per-token parameters match gpu-small's active ones within 0.5%."""
    tiny, small, dense = PRESETS["test-tiny"], PRESETS["gpu-small"], PRESETS["gpu-small-dense"]
    assert tiny == tiny_config() and tiny.vocab_size == 97 and tiny.attn_backend == "eager"
    assert count_params(tiny) == count_params(tiny_config())
    assert dense.attention == "gqa" and dense.num_key_value_heads == 4 and not any(
        dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))
    pd, ps = count_params(dense), count_params(small)
    assert pd.total == pd.active and abs(pd.active - ps.active) / ps.active < 0.005
    m = DeepseekV3ForCausalLM(DeepseekV3Config(**tiny.to_hf()))
    n = sum(p.numel() for p in m.parameters()) + sum(
        b.numel() for k, b in m.named_buffers() if k.endswith("e_score_correction_bias"))
    assert count_params(tiny).total == n


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
    """gpu-small is the 284M-parameter shape of the transformers baseline in docs/reference.md."""
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


@pytest.mark.parametrize("field,value,limit", [
    ("hidden_size", 10**9, 65536), ("vocab_size", 10**12, 4194304), ("num_hidden_layers", 10**6, 1024),
    ("n_routed_experts", 10**7, 16384), ("max_position_embeddings", 2**40, 16777216), ("v_head_dim", 10**5, 4096),
    ("intermediate_size", 10**8, 262144), ("q_lora_rank", 10**6, 65536)])
def test_absurd_sizes_are_one_line_errors_with_the_limit(field, value, limit):
    """A size far beyond every published model (a typo such as 10**9) is refused by the config's validation in one
    line that states the limit, instead of reaching the allocator (or hanging); the limits admit deepseek-v3 and
    every preset, and a size at the limit itself is accepted."""
    with pytest.raises(ValueError) as e:
        ModelConfig(**{field: value})
    assert str(e.value).startswith(f"ModelConfig.{field}={value}: must be a ") and f"<= {limit}" in str(e.value)
    assert "\n" not in str(e.value)
    assert ModelConfig(**{field: limit}).to_dict()[field] == limit
    for name in PRESETS:
        get_preset(name)
    assert PRESETS["deepseek-v3"].hidden_size == 7168 and PRESETS["deepseek-v3"].n_routed_experts == 256
