"""LoRA (dsv3_min.lora): peft parity, frozen base, merge/unmerge, the adapter file format."""
import warnings

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_config
from dsv3_min.hf import save_pretrained
from dsv3_min.lora import (
    ADAPTER_WEIGHTS,
    DEFAULT_TARGETS,
    LoRALinear,
    apply_lora,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    parse_targets,
    save_adapter,
    trainable_parameters,
    unmerge_lora,
)
from dsv3_min.model import DeepSeekV3


def _adapted(targets=None, seed=0):
    """A tiny model with adapters whose B is random (so the adapter changes the output), and a batch of ids."""
    torch.manual_seed(seed)
    model = DeepSeekV3(tiny_config()).eval()
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, r=4, alpha=8, targets=targets)
    with torch.no_grad():
        for m in lora_layers(model).values():
            for suffix, t in m.adapter_tensors().items():
                if "lora_B" in suffix:
                    t.normal_(std=0.05)
    return model, base_sd, torch.randint(0, model.config.vocab_size, (2, 12))


def test_peft_gives_our_logits(tmp_path):
    """peft's PeftModel on transformers' DeepseekV3ForCausalLM, loading our saved adapter, gives our logits (1e-5 of max)."""
    peft = pytest.importorskip("peft")
    from transformers import DeepseekV3ForCausalLM
    model, base_sd, ids = _adapted()
    base = DeepSeekV3(model.config).eval()
    base.load_state_dict(base_sd)
    save_pretrained(base, tmp_path / "base")
    save_adapter(model, tmp_path / "adapter")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = peft.PeftModel.from_pretrained(DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base"),
                                            tmp_path / "adapter").eval()
    with torch.no_grad():
        ours, theirs, plain = model(ids), hf(ids).logits, base(ids)
    assert (ours - plain).abs().max() > 1e-2 * plain.abs().max()  # the adapter really changes the output
    assert (ours - theirs).abs().max() <= 1e-5 * ours.abs().max()


def test_adapter_keys_are_peft_names(tmp_path):
    """The saved keys are peft's: base_model.model.<transformers path>.lora_A/B.weight, for every default target."""
    model, _, _ = _adapted()
    save_adapter(model, tmp_path / "a")
    keys = set(load_file(str(tmp_path / "a" / ADAPTER_WEIGHTS)))
    assert "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.2.self_attn.o_proj.lora_B.weight" in keys
    assert len(keys) == 2 * 5 * model.config.num_hidden_layers  # 5 MLA projections per main layer, no MTP


def test_starts_equal_to_the_base():
    """With B = 0 (the initialisation) the adapted model's logits equal the base's exactly, and A is not zero."""
    torch.manual_seed(0)
    model = DeepSeekV3(tiny_config()).eval()
    ids = torch.randint(0, 97, (2, 12))
    with torch.no_grad():
        ref = model(ids)
        apply_lora(model, r=8, alpha=16)
        assert torch.equal(model(ids), ref)
    m = next(iter(lora_layers(model).values()))
    assert m.lora_A.weight.abs().max() > 0 and m.lora_A.weight.abs().max() <= 1 / m.in_features ** 0.5


def test_base_stays_bit_identical_after_training():
    """AdamW with weight decay for a few steps moves only the adapters: every base tensor is bit-identical after."""
    model, base_sd, ids = _adapted(targets="all,experts")
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    lora_before = {n: {k: t.clone() for k, t in m.adapter_tensors().items()} for n, m in lora_layers(model).items()}
    for _ in range(3):
        loss = model.loss(ids[:, :-1], ids[:, 1:]).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if "lora_" not in k}
    assert sd.keys() == base_sd.keys()
    assert all(torch.equal(sd[k], base_sd[k]) for k in base_sd)
    assert all(not torch.equal(t, lora_before[n][k]) for n, m in lora_layers(model).items()
               for k, t in m.adapter_tensors().items())
    trainable, total = trainable_parameters(model)
    assert trainable == sum(t.numel() for m in lora_layers(model).values() for t in m.adapter_tensors().values())


def test_merge_unmerge_exact_to_fp32_rounding(tmp_path):
    """merge() gives the adapted logits, unmerge() the base weights back, both to fp32 rounding; merged saves plain."""
    model, base_sd, ids = _adapted(targets="all,experts")
    with torch.no_grad():
        ref = model(ids)
        merge_lora(model)
        torch.testing.assert_close(model(ids), ref, atol=1e-5, rtol=0)
        unmerge_lora(model)
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            torch.testing.assert_close(v, base_sd[k.replace(".base_layer", "")], atol=1e-7, rtol=0)
    merge_and_unload(model)
    assert not lora_layers(model)
    save_pretrained(model, tmp_path / "merged")
    from dsv3_min.hf import from_pretrained
    with torch.no_grad():
        torch.testing.assert_close(from_pretrained(tmp_path / "merged").eval()(ids), ref, atol=1e-5, rtol=0)


def test_load_adapter_round_trip_and_mismatch(tmp_path):
    """load_adapter on a fresh base reproduces the logits bit for bit; an adapter for another shape raises."""
    model, base_sd, ids = _adapted(targets="all,experts")
    save_adapter(model, tmp_path / "a")
    fresh = DeepSeekV3(model.config).eval()
    fresh.load_state_dict(base_sd)
    load_adapter(fresh, tmp_path / "a")
    with torch.no_grad():
        assert torch.equal(fresh(ids), model(ids))
    other = DeepSeekV3(tiny_config(q_lora_rank=16))
    with pytest.raises(ValueError, match="does not match the model"):
        load_adapter(other, tmp_path / "a")


def test_bad_arguments_raise():
    """Unknown targets, r < 1, dropout outside [0, 1) and double merge raise one-line errors naming the problem."""
    with pytest.raises(ValueError, match="unknown module name"):
        parse_targets("q_a_proj,router")
    assert parse_targets("attention") == DEFAULT_TARGETS
    with pytest.raises(ValueError, match="r=0"):
        LoRALinear(torch.nn.Linear(4, 4), r=0, alpha=1)
    with pytest.raises(ValueError, match="lora_dropout"):
        LoRALinear(torch.nn.Linear(4, 4), r=2, alpha=1, dropout=1.0)
    m = LoRALinear(torch.nn.Linear(4, 4), r=2, alpha=1)
    m.merge()
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()


def test_expert_adapters_equal_the_per_expert_formula():
    """LoRAExperts: the grouped path with adapters equals the loop reference on W_e + (α/r)·B_e·A_e for each expert,
    and the expert adapters receive gradients (the base stacks do not)."""
    from dsv3_min.lora import LoRAExperts
    model, _, ids = _adapted(targets="experts")
    exp = next(m for m in lora_layers(model).values() if isinstance(m, LoRAExperts))
    assert set(lora_layers(model)) == {"layers.1.mlp.experts", "layers.2.mlp.experts"}
    x = torch.randn(10, model.config.hidden_size)
    idx = torch.randint(0, exp.n_experts, (10, 2))
    w = torch.rand(10, 2)
    want = torch.zeros(10, model.config.hidden_size)
    for t in range(10):
        for j in range(2):
            e = int(idx[t, j])
            gu = exp.base_layer.gate_up_proj[e] + 2.0 * exp.gate_up_proj_lora_B[e] @ exp.gate_up_proj_lora_A[e]
            dn = exp.base_layer.down_proj[e] + 2.0 * exp.down_proj_lora_B[e] @ exp.down_proj_lora_A[e]
            g, u = (gu @ x[t]).chunk(2)
            want[t] += w[t, j] * (dn @ (torch.nn.functional.silu(g) * u))
    got = exp(x, w, idx)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    got.square().sum().backward()
    assert exp.gate_up_proj_lora_A.grad is not None and exp.base_layer.gate_up_proj.grad is None


def test_adapter_written_by_peft_loads_into_ours(tmp_path):
    """An adapter made and saved by peft (get_peft_model + save_pretrained on transformers' model) loads with
    load_adapter onto our model and gives peft's logits (1e-5 of the largest logit)."""
    peft = pytest.importorskip("peft")
    from transformers import DeepseekV3ForCausalLM

    from dsv3_min.hf import from_pretrained
    torch.manual_seed(3)
    base = DeepSeekV3(tiny_config()).eval()
    save_pretrained(base, tmp_path / "base")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base")
        pm = peft.get_peft_model(hf, peft.LoraConfig(r=4, lora_alpha=12, target_modules=["q_b_proj", "kv_b_proj",
                                                                                          "o_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.05)
    pm.save_pretrained(tmp_path / "peft_adapter")
    ids = torch.randint(0, base.config.vocab_size, (2, 10))
    with torch.no_grad():
        theirs = pm.eval()(ids).logits
        ours = load_adapter(from_pretrained(tmp_path / "base").eval(), tmp_path / "peft_adapter")
        assert sorted({n.rsplit(".", 1)[-1] for n in lora_layers(ours)}) == ["kv_b_proj", "o_proj", "q_b_proj"]
        got = ours(ids)
    assert (got - base(ids)).abs().max() > 1e-2 * got.abs().max()
    assert (got - theirs).abs().max() <= 1e-5 * got.abs().max()


def _forge(f, key, **change):
    """Rewrite safetensors file `f`'s header entry `key` with `change` (dtype of the same size), bytes unchanged."""
    import json
    b = f.read_bytes()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    header[key].update(change)
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    f.write_bytes(b[:8] + text + b[8 + n:])


@pytest.mark.parametrize("damage", ["truncate", "header", "r-string", "alpha-list", "r-huge", "r-other", "dropout",
                                    "dtype", "nan", "config-list", "no-weights"])
def test_damaged_adapter_is_one_line_error(tmp_path, damage):
    """An adapter is checked like a checkpoint before anything is built or loaded: a truncated file, a forged header
    length, wrong types or ranges in adapter_config.json (r as a string, alpha as a list, dropout 1.5, a list for the
    whole file), a rank that is not the tensors' (an absurd r never reaches the allocator), a tensor forged to int32 or
    holding NaN, a missing weights file: each a one-line ValueError (FileNotFoundError) naming the file; the model is
    left untouched."""
    import json
    model, base_sd, _ = _adapted()
    save_adapter(model, tmp_path / "a")
    w, c = tmp_path / "a" / ADAPTER_WEIGHTS, tmp_path / "a" / "adapter_config.json"
    config = json.loads(c.read_text())
    key = sorted(load_file(str(w)))[0]
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
    elif damage == "header":
        w.write_bytes((10**12).to_bytes(8, "little") + w.read_bytes()[8:])
    elif damage in ("dtype", "nan"):
        if damage == "dtype":
            _forge(w, key, dtype="I32")
        else:
            from safetensors.torch import save_file
            sd = load_file(str(w))
            sd[key] = torch.full_like(sd[key], float("nan"))
            save_file(sd, str(w), metadata={"format": "pt", "dsv3_min_targets": "q_a_proj"})
    elif damage == "no-weights":
        w.unlink()
    elif damage == "config-list":
        c.write_text("[1, 2]")
    else:
        config.update({"r-string": {"r": "4"}, "alpha-list": {"lora_alpha": [8]}, "r-huge": {"r": 10**9},
                       "r-other": {"r": 8}, "dropout": {"lora_dropout": 1.5}}[damage])
        c.write_text(json.dumps(config))
    fresh = DeepSeekV3(model.config).eval()
    fresh.load_state_dict(base_sd)
    with pytest.raises((ValueError, FileNotFoundError)) as e:   # the command line's one-line errors (exit 2)
        load_adapter(fresh, tmp_path / "a")
    assert "\n" not in str(e.value) and str(tmp_path / "a") in str(e.value)
    assert not lora_layers(fresh) and all(torch.equal(v, base_sd[k]) for k, v in fresh.state_dict().items())


def test_adapter_base_does_not_depend_on_the_working_directory(tmp_path, monkeypatch):
    """`save_adapter` records a local base folder given relative to the working directory as an absolute path, so
    `adapter_base` finds the same base from any directory; a relative entry (as peft may write) is taken from the
    adapter's folder, never the working directory; a base that has moved is one line saying how to give it."""
    import json

    from dsv3_min.lora import adapter_base
    model, _, _ = _adapted()
    (tmp_path / "proj").mkdir()
    save_pretrained(DeepSeekV3(tiny_config()), tmp_path / "proj" / "base")
    monkeypatch.chdir(tmp_path / "proj")
    save_adapter(model, "ft/adapter", base_model_name_or_path="base")
    recorded = json.loads((tmp_path / "proj" / "ft" / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == str(tmp_path / "proj" / "base")
    (tmp_path / "elsewhere" / "base").mkdir(parents=True)          # a decoy of the same name in another cwd
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert adapter_base(tmp_path / "proj" / "ft" / "adapter") == tmp_path / "proj" / "base"
    recorded["base_model_name_or_path"] = "../../base"             # relative: from the adapter folder
    (tmp_path / "proj" / "ft" / "adapter" / "adapter_config.json").write_text(json.dumps(recorded))
    assert adapter_base(tmp_path / "proj" / "ft" / "adapter").resolve() == tmp_path / "proj" / "base"
    (tmp_path / "proj" / "base").rename(tmp_path / "proj" / "moved")
    with pytest.raises(FileNotFoundError, match=r"its base model '../../base' is not there \(moved or deleted\?\); "
                                                r"give the base with `--ckpt BASE --adapter ") as e:
        adapter_base(tmp_path / "proj" / "ft" / "adapter")
    assert "\n" not in str(e.value)
