"""Hugging Face interop: checkpoints load and save both ways with the same fp32 logits as transformers."""
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from conftest import tiny_config
from dsv3_min.checkpoint import write_manifest
from dsv3_min.files import FileFormatError
from dsv3_min.hf import CheckpointError, from_pretrained, load_weights, save_pretrained
from dsv3_min.model import DeepSeekV3
from dsv3_min.train import TrainConfig, make_optimizer, save_checkpoint

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
    """save_pretrained writes a directory transformers loads, with the same fp32 logits."""
    cfg = tiny_config(**CONFIGS[name])
    torch.manual_seed(1)
    ours = DeepSeekV3(cfg).eval()
    with torch.no_grad():
        for m in ours.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.1)
    save_pretrained(ours, tmp_path)
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
    _assert_same_tensors(a.state_dict(), b.state_dict())


def _assert_same_tensors(a: dict, b: dict) -> None:
    """The two state dicts have the same keys, in the same order, and equal tensors."""
    assert list(a) == list(b), f"keys differ: only in a {sorted(set(a) - set(b))}, only in b {sorted(set(b) - set(a))}"
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_state_dict_comparison_catches_a_missing_key():
    """_assert_same_tensors fails when one side lacks a key (a zip over both would silently stop early)."""
    sd = DeepSeekV3(tiny_config()).state_dict()
    fewer = dict(list(sd.items())[:-1])
    with pytest.raises(AssertionError, match="keys differ"):
        _assert_same_tensors(sd, fewer)
    with pytest.raises(AssertionError, match="keys differ"):
        _assert_same_tensors(fewer, sd)


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


@pytest.mark.parametrize("kind", ["hf", "hf-sharded", "ours"])
def test_truncated_file_gives_clear_error(kind, tmp_path):
    """A truncated safetensors file (one file, one shard of many, or our checkpoint's weights) is refused with a
    one-line CheckpointError naming the file (ours: the checkpoint and the file, whose size the manifest contradicts)."""
    model = DeepSeekV3(tiny_config())
    if kind == "ours":
        f = save_checkpoint(tmp_path, 1, model, None, model.config) / "model.safetensors"
    else:
        save_pretrained(model, tmp_path, **({"max_shard_bytes": 20_000} if kind == "hf-sharded" else {}))
        f = sorted(tmp_path.glob("model*.safetensors"))[-1]
    f.write_bytes(f.read_bytes()[:-100])
    name = f"{f.parent} is broken: model.safetensors has" if kind == "ours" else str(f)
    with pytest.raises(CheckpointError, match=re.escape(name)) as e:
        from_pretrained(f.parent)
    msg = str(e.value)
    assert "\n" not in msg and ("truncated" if kind != "ours" else "the manifest says") in msg.replace(str(f), "")


def test_bad_index_gives_one_line_error(tmp_path):
    """A sharded checkpoint whose index is not JSON, or has no weight_map, is refused in one line naming the index."""
    save_pretrained(DeepSeekV3(tiny_config()), tmp_path, max_shard_bytes=20_000)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"weight_map": {"a"')
    with pytest.raises(FileFormatError, match=re.escape(str(index))):
        from_pretrained(tmp_path)
    index.write_text('{"metadata": {}}')
    with pytest.raises(FileFormatError, match=re.escape(str(index)) + ": missing key 'weight_map'") as e:
        from_pretrained(tmp_path)
    assert "\n" not in str(e.value)


def test_sharded_then_unsharded_save_leaves_no_stale_files(tmp_path):
    """Saving unsharded over a sharded checkpoint replaces the whole set: no stale index or shard remains, the new
    weights load (not the old ones), and a non-checkpoint file in the directory is kept."""
    old, new = DeepSeekV3(tiny_config()), DeepSeekV3(tiny_config())
    save_pretrained(old, tmp_path, max_shard_bytes=20_000)
    assert (tmp_path / "model.safetensors.index.json").exists()
    (tmp_path / "tokenizer.json").write_text("{}")
    save_pretrained(new, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    _assert_same_tensors(from_pretrained(tmp_path).state_dict(), new.state_dict())
    save_pretrained(old, tmp_path, max_shard_bytes=20_000)  # and back: no stale model.safetensors either
    assert not (tmp_path / "model.safetensors").exists()
    _assert_same_tensors(from_pretrained(tmp_path).state_dict(), old.state_dict())
    assert not [p for p in tmp_path.parent.iterdir() if p.name.startswith(f".{tmp_path.name}.")]  # no temp left


def _trained_checkpoint(run, step, cfg, seed):
    """A model of `cfg` after one AdamW step, saved as our training checkpoint `run/ckpt-<step>` (with optimizer)."""
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg)
    tc = TrainConfig(max_steps=10, batch_size=2, seq_len=8)
    opt = make_optimizer(model, tc, torch.device("cpu"))
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    model.loss(x[:, :-1], x[:, 1:]).loss.backward()
    opt.step()
    return model, save_checkpoint(run, step, model, opt, cfg, tc)


@pytest.mark.parametrize("tied", [False, True])
def test_from_pretrained_reads_our_training_checkpoints(tied, tmp_path, monkeypatch):
    """from_pretrained loads one of our ckpt-* directories (MTP included, no 'no MTP weights' warning) from its
    state.json config and model.safetensors only (the optimizer file is never read), and a run directory loads its
    newest checkpoint."""
    import dsv3_min.hf as hf

    cfg = tiny_config(tie_word_embeddings=tied)
    older, _ = _trained_checkpoint(tmp_path, 100, cfg, seed=0)
    newer, ckpt = _trained_checkpoint(tmp_path, 200, cfg, seed=1)
    assert (ckpt / "optimizer.safetensors").exists()
    read, real = [], hf.read_safetensors
    monkeypatch.setattr(hf, "read_safetensors", lambda files: read.extend(f.name for f in files) or real(files))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path, want in ((ckpt, newer), (tmp_path / "ckpt-0000100", older), (tmp_path, newer)):
            got = from_pretrained(path)
            assert got.config == cfg and len(got.mtp) == 1
            _assert_same_tensors(got.state_dict(), want.state_dict())
    assert not [w for w in caught if "MTP" in str(w.message)]
    assert read == ["model.safetensors"] * 3


def test_from_pretrained_finds_checkpoints_as_load_trained_does(tmp_path):
    """from_pretrained goes through the one manifest-checked finder (latest_checkpoint): in a run whose newest
    checkpoint is damaged (its optimizer file no longer matches the manifest) it loads the previous intact one with a
    CheckpointWarning naming the damaged one, and the damaged checkpoint itself is refused by name, as load_trained
    and --resume do. (The old finder took the newest ckpt-* with a state.json, damaged or not.)"""
    from dsv3_min.hf import CheckpointWarning

    cfg = tiny_config()
    older, _ = _trained_checkpoint(tmp_path, 100, cfg, seed=0)
    _, ckpt = _trained_checkpoint(tmp_path, 200, cfg, seed=1)
    f = ckpt / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:-8] + bytes(8))
    with pytest.warns(CheckpointWarning, match="ckpt-0000200"):
        _assert_same_tensors(from_pretrained(tmp_path).state_dict(), older.state_dict())
    with pytest.raises(CheckpointError, match="ckpt-0000200 is broken: optimizer.safetensors does not match"):
        from_pretrained(ckpt)


def test_bad_state_json_gives_one_line_error(tmp_path):
    """Our checkpoint with an unparsable state.json, or one without model_config, is refused in one line naming it:
    by the manifest check, and without a manifest (written before manifests) by the JSON check or the reader."""
    _, ckpt = _trained_checkpoint(tmp_path, 1, tiny_config(), seed=0)
    (ckpt / "state.json").write_text('{"step": 1, "model_config": {"vocab')
    with pytest.raises(CheckpointError, match="is broken: state.json has 35 bytes, the manifest says"):
        from_pretrained(ckpt)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=re.escape(str(ckpt)) + ".*state.json") as e:
        from_pretrained(ckpt)
    assert "\n" not in str(e.value)
    (ckpt / "state.json").write_text('{"step": 1}')
    with pytest.raises(CheckpointError, match="state.json has no model_config"):
        from_pretrained(ckpt)


def test_wrong_shape_in_our_checkpoint_lists_every_key(tmp_path):
    """A mis-shaped and a missing tensor in our own checkpoint give the same CheckpointError as a Hugging Face
    directory (every bad key, our names), and load_weights leaves the model untouched when it refuses."""
    cfg = tiny_config()
    model, ckpt = _trained_checkpoint(tmp_path, 1, cfg, seed=0)
    sd = load_file(str(ckpt / "model.safetensors"))
    sd["layers.0.self_attn.o_proj.weight"] = torch.zeros(3, 3)
    sd.pop("norm.weight")
    save_file(sd, str(ckpt / "model.safetensors"))
    write_manifest(ckpt)  # intact files (the manifest agrees) whose tensors do not fit the model
    with pytest.raises(CheckpointError) as e:
        from_pretrained(ckpt)
    msg = str(e.value)
    assert msg.splitlines()[0] == ("checkpoint does not match the model (1 missing, 0 unexpected, 1 mis-shaped, 0 mis-typed); "
                                   "nothing was loaded")
    assert "missing: norm.weight" in msg and "mis-shaped: layers.0.self_attn.o_proj.weight: checkpoint (3, 3)" in msg
    target = DeepSeekV3(cfg)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckpointError, match="1 missing, 0 unexpected, 1 mis-shaped"):
        load_weights(target, sd)
    _assert_same_tensors(target.state_dict(), before)
    load_weights(target, model.state_dict())  # a full state dict (tied or not) loads
    _assert_same_tensors(target.state_dict(), model.state_dict())


def test_mtp_copies_of_shared_tensors_are_shape_checked(tmp_path):
    """DeepSeek's per-MTP-layer copies of embed_tokens and shared_head.head load (and are ignored) when their shape is
    (vocab, hidden); a wrong shape is listed as mis-shaped like any other tensor."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg)
    save_pretrained(model, tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    L = cfg.num_hidden_layers
    sd[f"model.layers.{L}.embed_tokens.weight"] = model.embed_tokens.weight.detach().clone()
    sd[f"model.layers.{L}.shared_head.head.weight"] = model.lm_head.weight.detach().clone()
    save_file(sd, str(tmp_path / "model.safetensors"))
    _assert_same_tensors(from_pretrained(tmp_path).state_dict(), model.state_dict())
    sd[f"model.layers.{L}.shared_head.head.weight"] = torch.zeros(cfg.vocab_size, 3)
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"mis-shaped: mtp\.0\.shared_head\.head\.weight: checkpoint \(97, 3\)"):
        from_pretrained(tmp_path)


def test_missing_config_and_fp8_are_refused(tmp_path):
    """A directory without config.json, or an FP8 checkpoint with weight_scale_inv tensors, is refused clearly."""
    with pytest.raises(FileNotFoundError, match="config.json"):
        from_pretrained(tmp_path)
    cfg = tiny_config()
    save_pretrained(DeepSeekV3(cfg), tmp_path)
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


def _forge_dtype(f: Path, key: str, dtype: str) -> None:
    """Rewrite the header of safetensors file `f` so that tensor `key` claims `dtype` (same byte size: the bytes stay)."""
    b = f.read_bytes()
    n = int.from_bytes(b[:8], "little")
    header = json.loads(b[8:8 + n])
    header[key]["dtype"] = dtype
    text = json.dumps(header, separators=(",", ":")).encode().ljust(n)
    assert len(text) == n
    f.write_bytes(b[:8] + text + b[8 + n:])


@pytest.mark.parametrize("entry", ["../outside.safetensors", "/etc/passwd", "link.safetensors"])
def test_index_entries_outside_the_directory_are_refused_unread(tmp_path, entry):
    """Every file `model.safetensors.index.json` names must resolve inside the model directory: `../x` (a valid
    shard that would otherwise load), an absolute path and a symlink pointing out are refused in one line, before
    the file is opened, and no byte of the named file appears in the error."""
    model = DeepSeekV3(tiny_config())
    save_pretrained(model, tmp_path / "m", max_shard_bytes=20_000)
    index = tmp_path / "m" / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    first = sorted(set(d["weight_map"].values()))[0]
    (tmp_path / "m" / first).rename(tmp_path / "outside.safetensors")   # the shard's tensors, outside the directory
    (tmp_path / "m" / "link.safetensors").symlink_to(tmp_path / "outside.safetensors")
    d["weight_map"] = {k: (entry if v == first else v) for k, v in d["weight_map"].items()}
    index.write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"weight_map entry names a file outside .* every shard must be inside") as e:
        from_pretrained(tmp_path / "m")
    assert "\n" not in str(e.value) and "root:" not in str(e.value) and "header length" not in str(e.value)


def test_stored_dtype_converts_by_value_or_is_refused(tmp_path):
    """A float tensor stored in another float dtype (fp16 into an fp32 model) is converted by value; a tensor whose
    header claims another kind of dtype (F32 became I32: the same bytes, reinterpreted) or that holds NaN is refused
    in a CheckpointError naming it, for Hugging Face directories and for our checkpoints alike."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg)
    save_pretrained(model, tmp_path / "half", dtype=torch.float16)
    loaded = from_pretrained(tmp_path / "half")
    assert loaded.embed_tokens.weight.dtype == torch.float32
    torch.testing.assert_close(loaded.embed_tokens.weight, model.embed_tokens.weight.half().float(), rtol=0, atol=0)
    save_pretrained(model, tmp_path / "int")
    _forge_dtype(tmp_path / "int" / "model.safetensors", "model.embed_tokens.weight", "I32")
    with pytest.raises(CheckpointError, match=r"0 mis-shaped, 1 mis-typed\).*\n  mis-typed: embed_tokens.weight: "
                                              r"checkpoint int32, model float32"):
        from_pretrained(tmp_path / "int")
    sd = load_file(str(tmp_path / "half" / "model.safetensors"))
    sd["model.norm.weight"] = torch.full_like(sd["model.norm.weight"], float("nan"))
    save_file(sd, str(tmp_path / "half" / "model.safetensors"))
    with pytest.raises(CheckpointError, match="mis-typed: norm.weight: holds NaN or infinite values"):
        from_pretrained(tmp_path / "half")
    _, ckpt = _trained_checkpoint(tmp_path / "run", 1, cfg, seed=0)
    _forge_dtype(ckpt / "model.safetensors", "norm.weight", "I32")
    write_manifest(ckpt)
    with pytest.raises(CheckpointError, match="mis-typed: norm.weight: checkpoint int32, model float32"):
        from_pretrained(ckpt)
