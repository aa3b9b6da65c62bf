"""Tests of the command line (dsv3_min.__main__): parsing, errors, info, sampling from ours and HF checkpoints."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from dsv3_min.__main__ import build_parser, main
from dsv3_min.config import count_params, get_preset
from dsv3_min.model import DeepSeekV3
from dsv3_min.train import TrainConfig, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent


def test_flags_and_set_reach_both_configs():
    """Dedicated flags and --set land in the right config; a later --set of the same name wins."""
    from dsv3_min.__main__ import _configs
    a = build_parser().parse_args(["train", "--preset", "cpu-tiny", "--max-steps", "7", "--set", "hidden_size=64",
                                   "lr=0.01", "--set", "lr=0.02"])
    cfg, tc = _configs(a.preset, a.overrides, max_steps=a.max_steps, corpus=a.corpus)
    assert cfg.hidden_size == 64 and tc.lr == 0.02 and tc.max_steps == 7 and tc.corpus == "shakespeare"
    assert cfg.num_hidden_layers == get_preset("cpu-tiny").num_hidden_layers


@pytest.mark.parametrize("argv, expected", [
    (["train", "--preset", "gpt5"], "unknown preset 'gpt5'; available: ['cpu-tiny', 'deepseek-v3', 'gpu-small']"),
    (["train", "--set", "hiden_size=3"], "unknown field 'hiden_size' in --set; ModelConfig fields: ["),
    (["info", "--set", "num_hidden_layers=0"], "ModelConfig.num_hidden_layers=0: must be a positive integer"),
    (["train", "--set", "batch_size=-1"], "TrainConfig.batch_size=-1: must be a positive integer"),
])
def test_bad_input_is_a_one_line_error(argv, expected, capsys):
    """Unknown presets and fields, and impossible values, exit with code 2 and an error listing what is valid."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    if "hiden_size" in argv[-1]:
        assert "hidden_size" in err and "max_steps" in err  # both lists of valid names are shown


def test_info_prints_config_and_counts(capsys):
    """`info` prints the preset's config as JSON and the parameter counts of `count_params`."""
    assert main(["info", "--preset", "cpu-tiny", "--set", "num_hidden_layers=2"]) == 0
    out = capsys.readouterr().out
    cfg = get_preset("cpu-tiny", num_hidden_layers=2)
    pc = count_params(cfg)
    assert json.loads(out[: out.index("\nparameters")])["num_hidden_layers"] == 2
    assert f"total {pc.total:,}  active {pc.active:,}  mtp {pc.mtp:,}" in out


def _tokenizer(tmp_path):
    from dsv3_min.tokenizer import train_tokenizer
    text = ["To be, or not to be, that is the question. Whether 'tis nobler in the mind to suffer."] * 30
    return train_tokenizer(text, vocab_size=300)


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    """A checkpoint of a random tiny model (NOT a real model size) with its tokenizer."""
    tmp = tmp_path_factory.mktemp("ckpt")
    tok = _tokenizer(tmp)
    cfg = tiny_config(vocab_size=tok.vocab_size, max_position_embeddings=48)
    torch.manual_seed(0)
    model = DeepSeekV3(cfg)
    save_checkpoint(tmp / "run", 3, model, None, cfg, TrainConfig(), tok)
    return tmp / "run", model, tok


def test_sample_from_our_checkpoint_is_seeded(tiny_ckpt, capsys):
    """`sample` loads a run directory, continues the prompt, and the same seed gives the same text."""
    run, _, _ = tiny_ckpt
    outs = []
    for seed in (1, 1, 2):
        assert main(["sample", "--ckpt", str(run), "--prompt", "To be", "--max-new-tokens", "12", "--seed",
                     str(seed), "--top-k", "20"]) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0].startswith("To be") and outs[0] == outs[1] and outs[0] != outs[2]


def test_sample_rejects_a_too_long_prompt(tiny_ckpt, capsys):
    """A prompt longer than max_position_embeddings (48 here) is an error that states both lengths."""
    run, _, _ = tiny_ckpt
    assert main(["sample", "--ckpt", str(run), "--prompt", "question " * 60]) == 2
    err = capsys.readouterr().err
    assert "max_position_embeddings is 48" in err and "the prompt is" in err
    assert main(["sample", "--ckpt", str(run), "--prompt", "To be", "--max-new-tokens", "100"]) == 2
    assert "ask for at most" in capsys.readouterr().err


def test_sample_from_a_hugging_face_directory_matches(tiny_ckpt, tmp_path, capsys):
    """A Hugging Face directory written by `hf.save_pretrained` samples the same text as our checkpoint."""
    from dsv3_min.hf import save_pretrained
    run, model, tok = tiny_ckpt
    save_pretrained(model, tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer")
    args = ["--prompt", "To be", "--max-new-tokens", "10", "--seed", "3"]
    assert main(["sample", "--ckpt", str(tmp_path / "hf"), *args]) == 0
    hf_out = capsys.readouterr().out
    assert main(["sample", "--ckpt", str(run), *args]) == 0
    assert hf_out == capsys.readouterr().out


def test_sample_without_checkpoint_is_an_error(tmp_path, capsys):
    """`sample --ckpt` on a directory with neither our checkpoint nor a config.json says what it looked for."""
    assert main(["sample", "--ckpt", str(tmp_path)]) == 2
    assert "not a checkpoint" in capsys.readouterr().err


def test_python_dash_m_runs():
    """`python -m dsv3_min --help` works from a fresh interpreter and lists the subcommands."""
    r = subprocess.run([sys.executable, "-m", "dsv3_min", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "sample", "info", "tokenizer"))


def test_tokenizer_subcommand_prints_stats(tmp_path, monkeypatch, capsys):
    """`tokenizer` trains (and caches) a tokenizer of the asked size on a corpus folder and prints its statistics."""
    monkeypatch.setenv("DSV3_CACHE", str(tmp_path / "cache"))
    for i in range(6):
        (tmp_path / "corpus").mkdir(exist_ok=True)
        (tmp_path / "corpus" / f"d{i}.txt").write_text(f"Act {i}. To be, or not to be: that is the question.\n" * 40)
    assert main(["tokenizer", "--corpus", str(tmp_path / "corpus"), "--vocab-size", "300"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["vocab_size"] == 300 and stats["train_bytes_per_token"] > 1
    assert list((tmp_path / "cache" / "tokenizers").iterdir())  # cached for the next call
