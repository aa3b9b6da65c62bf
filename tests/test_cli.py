"""Tests of the command line (dsv3_min.__main__): parsing, errors, info, sampling from ours and HF checkpoints."""
import dataclasses
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import tiny_config
from dsv3_min.__main__ import build_parser, main
from dsv3_min.checkpoint import save_checkpoint
from dsv3_min.config import PRESETS, ModelConfig, count_params, get_preset
from dsv3_min.model import DeepSeekV3
from dsv3_min.train import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


def test_flags_and_set_reach_both_configs():
    """Dedicated flags and --set land in the right config; a later --set of the same name wins."""
    from dsv3_min.__main__ import _configs
    a = build_parser().parse_args(["train", "--preset", "cpu-tiny", "--max-steps", "7", "--set", "hidden_size=64",
                                   "lr=0.01", "--set", "lr=0.02"])
    cfg, tc = _configs(a.preset, a.overrides, max_steps=a.max_steps, corpus=a.corpus)
    assert cfg.hidden_size == 64 and tc.lr == 0.02 and tc.max_steps == 7 and tc.corpus == "shakespeare"
    assert cfg.num_hidden_layers == get_preset("cpu-tiny").num_hidden_layers


def _one_line_error(capsys) -> str:
    "The captured stderr, asserted to be exactly one `dsv3: error:` line."
    err = capsys.readouterr().err
    assert err.startswith("dsv3: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("argv, expected", [
    (["train", "--preset", "gpt5"], "unknown preset 'gpt5'; available: ['cpu-tiny', 'deepseek-v3', 'gpu-small', "
                                    "'gpu-small-dense', 'test-tiny']"),
    (["train", "--set", "hiden_size=3"], "unknown field 'hiden_size' in --set; did you mean 'hidden_size'? ModelConfig"),
    (["info", "--set", "num_hidden_layers=0"], "ModelConfig.num_hidden_layers=0: must be a positive integer"),
    (["train", "--set", "batch_size=-1"], "TrainConfig.batch_size=-1: must be a positive integer"),
    (["info", "--set", "rms_norm_eps=abc"], "ModelConfig.rms_norm_eps='abc': must be"),
    (["info", "--set", "lr=abc"], "TrainConfig.lr='abc': must be a float > 0"),
    (["info", "--set", "routed_scaling_factor=abc"], "ModelConfig.routed_scaling_factor='abc'"),
    (["info", "--set", "eos_token_id=abc"], "ModelConfig.eos_token_id='abc'"),
    (["info", "--set", "attention=gqa", "num_key_value_heads=abc"], "ModelConfig.num_key_value_heads='abc'"),
    (["info", "--set", "gated_attention=abc"], "ModelConfig.gated_attention='abc': must be true or false"),
    (["info", "--set", "tie_word_embeddings=maybe"], "ModelConfig.tie_word_embeddings='maybe': must be true or false"),
    (["info", "--set", "compile=yes"], "TrainConfig.compile='yes': must be true or false"),
    (["info", "--set", "rope_scaling=abc"], "ModelConfig.rope_scaling='abc'"),
    (["info", "--set", "device=banana"], "TrainConfig.device='banana': must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'"),
    (["info", "--set", "lr"], "--set expects name=value, got 'lr'"),
    (["train", "--max-steps", "ten"], "argument --max-steps: 'ten' is not an integer"),
    (["train", "--time-budget", "nan"], "argument --time-budget: 'nan' is not a finite number"),
    (["sample", "--ckpt", ".", "--temperature", "nan"], "argument --temperature: 'nan' is not a finite number"),
    (["sample", "--ckpt", ".", "--temperature", "-1"], "argument --temperature: '-1' is not a finite number in [0, inf)"),
    (["sample", "--ckpt", ".", "--temperature", "inf"], "argument --temperature: 'inf' is not a finite number"),
    (["sample", "--ckpt", ".", "--top-p", "0"], "argument --top-p: '0' is not a finite number in (0, 1]"),
    (["sample", "--ckpt", ".", "--device", "banana"], "device 'banana': must be 'auto', 'cpu'"),
    (["sample", "--ckpt", "/nonexistent/run"], "/nonexistent/run: no such directory"),
    (["sample"], "the following arguments are required: --ckpt"),
    (["tokenizer", "--vocab-size", "1000000000"], "argument --vocab-size: '1000000000' is not a finite number in [1, "
                                                  "4194304]"),   # found by the property test: trained for 36 s, exit 0
    (["frobnicate"], "argument command: invalid choice: 'frobnicate'"),
])
def test_bad_input_is_a_one_line_error(argv, expected, capsys):
    """Each bad input of issue 14's table (wrongly typed --set values of both configs, bools given as strings, a bad
    device, nan/inf/negative temperatures, unknown presets, fields, flags and commands) exits with code 2 and ONE
    stderr line naming the problem, never a traceback."""
    assert main(argv) == 2
    assert expected in _one_line_error(capsys)


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
    err = _one_line_error(capsys)
    assert "max_position_embeddings is 48" in err and "the prompt is" in err
    assert main(["sample", "--ckpt", str(run), "--prompt", "To be", "--max-new-tokens", "100"]) == 2
    assert "ask for at most" in _one_line_error(capsys)


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
    assert "not a checkpoint" in _one_line_error(capsys)


def test_python_dash_m_runs():
    """`python -m dsv3_min --help` works from a fresh interpreter and lists the subcommands."""
    r = subprocess.run([sys.executable, "-m", "dsv3_min", "--help"], capture_output=True, text=True, cwd=ROOT,
                       timeout=60)
    assert r.returncode == 0 and all(c in r.stdout for c in ("train", "sample", "info", "tokenizer", "eval", "finetune",
                                                                  "distill"))


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


def test_sample_falls_back_past_a_broken_checkpoint(tiny_ckpt, tmp_path, capsys):
    """`sample` of a run whose newest checkpoint has a truncated weights file (or invalid state.json) prints the same
    text as from the intact one, after ONE warning line naming the broken checkpoint; asked for the broken checkpoint
    itself, it is a one-line error naming it."""
    run, _, _ = tiny_ckpt
    broken = tmp_path / "run"
    shutil.copytree(run, broken)
    shutil.copytree(broken / "ckpt-0000003", broken / "ckpt-0000004")
    args = ["--prompt", "To be", "--max-new-tokens", "8", "--seed", "1"]
    assert main(["sample", "--ckpt", str(run), *args]) == 0
    good = capsys.readouterr().out
    for damage in ("truncate", "json"):
        w = broken / "ckpt-0000004" / ("model.safetensors" if damage == "truncate" else "state.json")
        w.write_bytes(w.read_bytes()[:-50])
        assert main(["sample", "--ckpt", str(broken), *args]) == 0
        out, err = capsys.readouterr()
        assert out == good and err.count("\n") == 1
        assert err.startswith("dsv3: warning: skipping broken checkpoint") and "ckpt-0000004" in err
    assert main(["sample", "--ckpt", str(broken / "ckpt-0000004"), *args]) == 2
    assert "ckpt-0000004 is broken" in _one_line_error(capsys)


@pytest.mark.parametrize("edit, expected", [
    (lambda c: c.update(num_hiden_layers=c.pop("num_hidden_layers")), "'num_hiden_layers' (did you mean"),
    (lambda c: c.update(rms_norm_eps="1e-6"), "rms_norm_eps='1e-6'"),
])
def test_bad_hf_config_json_is_one_line(tiny_ckpt, tmp_path, capsys, edit, expected):
    """A Hugging Face directory whose config.json has a typo in a key, or a string where a float belongs, makes
    `sample` exit 2 with one line naming the key, instead of a long traceback."""
    from dsv3_min.hf import save_pretrained
    _, model, tok = tiny_ckpt
    save_pretrained(model, tmp_path / "hf")
    tok.save(tmp_path / "hf" / "tokenizer")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    edit(cfg)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    assert main(["sample", "--ckpt", str(tmp_path / "hf")]) == 2
    assert expected in _one_line_error(capsys)


FIELDS = sorted(f.name for cls in (ModelConfig, TrainConfig) for f in dataclasses.fields(cls))
BAD_VALUES = ["abc", "yes", "maybe", "True", "None", "null", "nan", "NaN", "Infinity", "-Infinity", "1e400", "-1",
              "0", "2.5", "-0.5", "1", "true", "false", "\"\"", "[]", "[1, 2]", "{}", '{"type": "yarn"}',
              '{"factor": "x"}', "cuda:x", "banana", "", "-99999", "0x10", "1,2", "{", "[", "=", "a=b"]


@settings(max_examples=80, deadline=None, derandomize=True,  # the same examples in CI every time
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(FIELDS + ["hiden_size", "lrr"]),
                          st.one_of(st.sampled_from(BAD_VALUES), st.text(max_size=8))), min_size=1, max_size=3))
def test_set_property_valid_or_one_line_error(capsys, pairs):
    """Any --set of field names (ModelConfig and TrainConfig, plus typos) with wrongly typed values either gives a
    valid `info` (exit 0) or exit code 2 with ONE stderr line `dsv3: error: ...`; never an exception or traceback."""
    code = main(["info", "--set", *(f"{name}={value}" for name, value in pairs)])
    out, err = capsys.readouterr()
    if code == 0:
        assert err == "" and "parameters: total" in out
    else:
        assert code == 2 and err.startswith("dsv3: error: ") and err.count("\n") == 1, (pairs, err)


def test_subprocess_error_is_one_line_with_exit_code_2():
    """The real `python -m dsv3_min` process: a bad --set value prints exactly one stderr line and exits with 2."""
    r = subprocess.run([sys.executable, "-m", "dsv3_min", "info", "--set", "compile=yes"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 2 and r.stderr == "dsv3: error: TrainConfig.compile='yes': must be true or false\n"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_preset_has_training_defaults(preset):
    """`train --preset P` builds both configs for every model preset, from P's own entry in TRAIN_PRESETS."""
    from dsv3_min.__main__ import _configs
    from dsv3_min.train import TRAIN_PRESETS
    assert preset in TRAIN_PRESETS
    a = build_parser().parse_args(["train", "--preset", preset])
    cfg, tc = _configs(a.preset, a.overrides)
    assert cfg == get_preset(preset) and all(getattr(tc, k) == v for k, v in TRAIN_PRESETS[preset].items())


def test_dense_ablation_trains_like_gpu_small():
    """gpu-small-dense has gpu-small's training defaults (the ablation changes the model only)."""
    from dsv3_min.train import TRAIN_PRESETS
    assert TRAIN_PRESETS["gpu-small-dense"] == TRAIN_PRESETS["gpu-small"]


@pytest.mark.parametrize("command", ["eval", "finetune", "distill", "sample"])
def test_new_subcommands_have_help(command, capsys):
    """`eval`, `finetune`, `distill` are subcommands with their notebooks' flags; `sample` has `--draft`."""
    flag = {"eval": "--tasks", "finetune": "--method", "distill": "--student-preset", "sample": "--draft"}[command]
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([command, "--help"])
    assert e.value.code == 0 and flag in capsys.readouterr().out


@pytest.mark.parametrize("argv, expected", [
    (["eval", "--ckpt", "{tmp}/nope"], "no such directory"),
    (["eval", "--ckpt", "{tmp}", "--limit", "0"], "--limit must be >= 1, got 0"),
    (["eval", "--ckpt", "{tmp}/nope", "--limit-task", "mmlu=0"], "TASK=N with N >= 1, got 'mmlu=0'"),
    (["eval", "--ckpt", "{tmp}/nope", "--limit-task", "mmlu"], "TASK=N with N >= 1"),
    (["eval", "--ckpt", "{tmp}/nope", "--limit-task", "=5"], "TASK=N with N >= 1, got '=5'"),
    (["eval", "--ckpt", "{tmp}/nope", "--limit-task", "hellaswg=3"], "unknown task 'hellaswg'"),
    (["eval", "--ckpt", "{tmp}/nope", "--tasks", "hellaswag", "--limit-task", "mmlu=3"],
     "--limit-task 'mmlu=3': 'mmlu' is not among --tasks 'hellaswag'"),
    (["eval", "--ckpt", "{tmp}/nope", "--tasks", ",,,"], "no task named in ',,,'"),
    (["eval", "--ckpt", "{tmp}/nope", "--data", "boolq"], "--data expects TASK=SOURCE, got 'boolq'"),
    (["eval", "--ckpt", "{tmp}/nope", "--tasks", "hellaswag", "--data", "arc_easy={tmp}"],
     "--data arc_easy=...: 'arc_easy' is not among the tasks of --tasks 'hellaswag'"),
    (["eval", "--ckpt", "{tmp}/nope", "--tasks", "hellaswag", "--lim", "5"], "unrecognized arguments: --lim 5"),
    (["eval", "--ckpt", "{tmp}/nope", "--tasks", "hellaswag", "--out", "{tmp}"], "is a folder: give the results file"),
    (["eval", "--ckpt", "{tmp}/nope", "--tasks", "hellaswag", "--out", "{tmp}/notes.txt"],
     "exists and is not a results JSON of `eval`"),
    (["finetune", "--ckpt", "{tmp}/nope", "--corpus", "shakespeare", "--out", "{tmp}/out"], "no such directory"),
    (["finetune", "--ckpt", "{tmp}", "--corpus", "x", "--out", "{tmp}/o", "--method", "bogus"], "invalid choice"),
    (["distill", "--teacher", "{tmp}/nope", "--out", "{tmp}/out"], "config.json not found"),
    (["sample", "--ckpt", "{tmp}", "--draft", "eagle"], "argument --draft: invalid choice: 'eagle'"),
])
def test_new_subcommands_bad_input_is_one_line(argv, expected, tmp_path, capsys):
    """A wrong path or value for eval / finetune / distill / sample --draft is one `dsv3: error:` line, exit 2; every
    flag of `eval` (a task list naming nothing, a limit or a source for a task not asked for, an abbreviated flag, an
    --out that is a folder or another file) is checked before the checkpoint is read (`{tmp}/nope` does not exist)."""
    (tmp_path / "notes.txt").write_text('{"mine": 1}')
    assert main([x.format(tmp=tmp_path) for x in argv]) == 2
    assert expected in _one_line_error(capsys)
    assert not (tmp_path / "out").exists()


def test_sample_with_mtp_drafts_matches_plain_greedy(tiny_ckpt, capsys, monkeypatch):
    """`sample` decodes through the fast engine (infer.generate), `--draft mtp` with draft='mtp', and, greedy, both
    give the same text; with `--draft mtp` the acceptance rate is reported on stderr (and only there)."""
    import dsv3_min.infer as infer
    seen = []
    real = infer.generate
    monkeypatch.setattr(infer, "generate", lambda *a, **k: seen.append(k.get("draft")) or real(*a, **k))
    run, _, _ = tiny_ckpt
    args = ["sample", "--ckpt", str(run), "--prompt", "To be", "--max-new-tokens", "12", "--temperature", "0"]
    assert main(args) == 0
    plain, err = capsys.readouterr()
    assert "mtp drafts" not in err
    assert main([*args, "--draft", "mtp"]) == 0
    out, err = capsys.readouterr()
    assert seen == [None, "mtp"] and out == plain and plain.startswith("To be")
    assert re.fullmatch(r"mtp drafts: \d+\.\d% accepted, [12]\.\d\d tokens per forward over \d+ forwards\n", err), err


def test_train_eval_tasks_hook_logs_benchmark_numbers(tmp_path, monkeypatch, capsys):
    """`train --set eval_tasks=T` calls quick_eval(model, tokenizer, T, eval_limit) at each evaluation and logs it."""
    import dsv3_min.__main__ as cli
    monkeypatch.setenv("DSV3_CACHE", str(tmp_path / "cache"))
    (tmp_path / "corpus").mkdir()
    for i in range(6):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(f"Act {i}. To be, or not to be: that is the question.\n" * 40)
    calls = []
    monkeypatch.setattr(cli, "quick_eval", lambda m, tok, tasks, limit: calls.append((tasks, limit, tok.vocab_size))
                        or {"hellaswag/acc": 0.25})
    argv = ["train", "--preset", "test-tiny", "--corpus", str(tmp_path / "corpus"), "--out", str(tmp_path / "run"),
            "--max-steps", "4", "--no-progress", "--set", "vocab_size=300", "eval_every=2", "eval_tasks=hellaswag",
            "eval_limit=3"]
    assert main(argv) == 0, capsys.readouterr().err
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert calls == [("hellaswag", 3, 300)] * 2
    assert [r["step"] for r in rows if "hellaswag/acc" in r] == [2, 4]
    assert main([*argv[:-3], "eval_every=2", "--out", str(tmp_path / "run2")]) == 0 and len(calls) == 2  # no tasks: off


def test_train_with_an_unknown_eval_task_fails_before_training(tmp_path, capsys):
    """`train --set eval_tasks=<typo>` is one line and exit code 2 before any data, model or run folder exists (it
    used to train until the first evaluation and fail there, leaving a run without a checkpoint)."""
    out = tmp_path / "run"
    argv = ["train", "--preset", "test-tiny", "--out", str(out), "--max-steps", "2", "--no-progress",
            "--set", "eval_tasks=hellaswg"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown task 'hellaswg'" in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_eval_checks_the_task_data_and_the_device_before_the_checkpoint(tmp_path, monkeypatch, capsys):
    """Missing task data and `--device cuda` on a machine without a GPU are one line (exit 2) before the checkpoint is
    read (`{tmp}/nope` does not exist), not a traceback from torch."""
    monkeypatch.setenv("DSV3_EVAL_DATA", str(tmp_path))   # an empty data folder
    assert main(["eval", "--ckpt", str(tmp_path / "nope"), "--tasks", "hellaswag"]) == 2
    assert "no data for task 'hellaswag'" in _one_line_error(capsys)
    (tmp_path / "mine").mkdir()    # --data for the task: its own folder is checked, not the missing default
    assert main(["eval", "--ckpt", str(tmp_path / "nope"), "--tasks", "hellaswag", "--data", f"hellaswag={tmp_path / 'mine'}"]) == 2
    assert "nope: no such directory" in _one_line_error(capsys)
    if not torch.cuda.is_available():
        (tmp_path / "hellaswag" / "none").mkdir(parents=True)   # its data folder is there now
        assert main(["eval", "--ckpt", str(tmp_path / "nope"), "--tasks", "hellaswag", "--device", "cuda"]) == 2
        assert "no such CUDA device here" in _one_line_error(capsys)


def test_a_lora_run_loads_as_base_plus_adapter(tiny_ckpt, tmp_path):
    """`eval` and `sample` read a LoRA fine-tuning run (its `adapter/`) or an adapter folder as the base model named in
    the adapter with the adapter on top (they used to load it as a checkpoint: "15 missing, 45 unexpected" keys)."""
    from dsv3_min.__main__ import load_for_sample
    from dsv3_min.lora import apply_lora, lora_layers, save_adapter
    run, model, _ = tiny_ckpt
    tuned = DeepSeekV3(model.config)
    tuned.load_state_dict(model.state_dict())
    apply_lora(tuned, r=2, alpha=4.0)
    torch.manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(tuned).values():
            for p in layer.parameters():
                if p.requires_grad:
                    p.normal_(0, 0.2)
    save_adapter(tuned, tmp_path / "ft" / "adapter", base_model_name_or_path=str(run))
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        want = tuned.eval()(ids)
        for ckpt in (tmp_path / "ft", tmp_path / "ft" / "adapter"):
            got, _ = load_for_sample(str(ckpt), None, torch.device("cpu"))
            torch.testing.assert_close(got.eval()(ids), want)
        assert not torch.allclose(model.eval()(ids), want)


def test_exit_codes_user_environment_and_bugs():
    """The package's own checks (a ValueError or missing file raised in dsv3_min) exit 2; the environment (disk full,
    permissions, safetensors' own full-disk error) exits 1; the same error types raised inside a library, and every
    other exception, are bugs (None: main re-raises them with their traceback)."""
    import errno

    from dsv3_min.cli import exit_code
    from dsv3_min.files import read_json

    def raised(f):
        try:
            f()
        except Exception as e:
            return e
    ours = raised(lambda: read_json("/nonexistent/x.json"))   # FileNotFoundError from a dsv3_min frame
    assert isinstance(ours, FileNotFoundError) and exit_code(ours) == 2
    assert exit_code(raised(lambda: get_preset("gpt5"))) == 2
    assert exit_code(raised(lambda: json.loads("{"))) is None          # a library's ValueError: a bug here
    assert exit_code(raised(lambda: {}["x"])) is None and exit_code(ZeroDivisionError()) is None
    assert exit_code(OSError(errno.ENOSPC, "No space left on device")) == 1
    assert exit_code(PermissionError(errno.EACCES, "denied")) == 1
    from safetensors import SafetensorError
    assert exit_code(SafetensorError("Error while serializing: IoError(No space left on device (os error 28))")) == 1


def test_a_bug_keeps_its_traceback(monkeypatch, capsys):
    """An exception that is not one of the package's checks propagates out of `main` (its traceback is the report),
    and Ctrl-C outside the training loop is one line with exit code 130."""
    import dsv3_min.__main__ as cli
    monkeypatch.setitem(cli.COMMANDS, "info", lambda a: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        main(["info"])
    monkeypatch.setitem(cli.COMMANDS, "info", lambda a: (_ for _ in ()).throw(KeyboardInterrupt()))
    assert main(["info"]) == 130 and _one_line_error(capsys) == "dsv3: error: interrupted\n"


_EVAL_FLAGS = ["--tasks", "--limit", "--limit-task", "--batch-size", "--out", "--device", "--dtype", "--data"]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(_EVAL_FLAGS),
                          st.one_of(st.sampled_from(["", ",", ",,,", "=5", "mmlu=0", "hellaswag", "mmlu=x", "nan",
                                                     "-1", "0", "cuda:7", "bfloat16", "a=b", "hellaswag=/nope",
                                                     "/", "--limit"]),
                                    st.text(max_size=12))), max_size=4))
def test_eval_options_property_one_line_never_a_traceback(tmp_path, capsys, flags):
    """Random values for every option of `eval` (with a checkpoint that does not exist): the outcome is exit 2 with one
    `dsv3: error:` line, never a traceback, and nothing is written."""
    argv = ["eval", "--ckpt", str(tmp_path / "nope")] + [x for pair in flags for x in pair]
    assert main(argv) == 2
    _one_line_error(capsys)
    assert not [p for p in tmp_path.rglob("*")]


# ---- property tests: random bad values for every option of finetune and distill ----------------------------------

from _tiny_run import TINY_SET, tiny_corpus_fixture, train_argv  # noqa: E402, F401 (fixture)
from test_damage import CASE_SECONDS, _hashes, time_limit  # noqa: E402

RUN_OUTCOMES: dict = {}   # (command, exit code) -> cases, printed at the end of the module (pytest -s)


@pytest.fixture(scope="module")
def user_files(tiny_corpus, tmp_path_factory):
    """A user's folder: a tiny trained run (NOT a real model size) on the word-salad corpus, a second corpus, a
    non-empty folder of notes, a plain file; and a place for new outputs."""
    root = tmp_path_factory.mktemp("user")
    assert main(train_argv(tiny_corpus, "--out", str(root / "run"), "--max-steps", "2")) == 0
    (root / "domain").mkdir()
    (root / "domain" / "a.txt").write_text("def f(x):\n    return x + 1\n" * 80)
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("keep me")
    (root / "file.txt").write_text("a plain file")
    yield root, tiny_corpus
    print("\nfinetune/distill option outcomes:", dict(sorted(RUN_OUTCOMES.items())))


_SMALL = ["batch_size=2", "seq_len=16", "eval_every=2", "eval_batches=1", "final_eval_batches=1", "threads=1",
          "device=cpu", "max_steps=2", "warmup=1"]
_PATHS = ["{root}/run", "{root}/nope", "{root}/file.txt", "{root}/notes", "{corpus}", "{root}/domain", "", "{new}"]
_SETS = ["lora_r=0", "lora_r=-1", "lora_r=[1]", "lora_alpha=nan", "lora_dropout=2", "lora_targets=foo",
         "lora_targets=", "quant_block_size=1000000000", "quant_block_size=3", "base_dtype=int8", "lr=-1", "lr=1e9",
         "seq_len=100000", "batch_size=0", "hidden_size=8", "max_steps=0", "base_corpus={root}/nope", "x", "=",
         "threads=-1", "eval_every=0", "device=cuda:9", "kd_topk=-1", "kd_topk=100000", "kd_temperature=0",
         "kd_alpha=2", "kd_alpha=0.5", "num_hidden_layers=0", "vocab_size=3", "time_budget=-1", "grad_accum=0",
         "seed=-1", "corpus={root}/nope", "compile=maybe", "lora_r=2", "kd_topk=4"]
_OPTIONS = {
    "finetune": {"--ckpt": _PATHS, "--corpus": _PATHS, "--method": ["lora", "qlora", "full", "x", ""],
                 "--out": _PATHS, "--set": _SETS, "--max-steps": ["0", "-3", "x", "", "nan", "2"],
                 "--time-budget": ["-1", "nan", "inf", "x", "0"], "--resume": None, "--no-progress": None},
    "distill": {"--teacher": _PATHS, "--student-preset": ["auto", "x", "test-tiny", ""], "--corpus": _PATHS,
                "--out": _PATHS, "--cache": _PATHS, "--init": ["random", "truncate", "x"], "--set": _SETS,
                "--max-steps": ["0", "-3", "x", "", "nan", "2"], "--resume": None, "--no-progress": None},
}


def _option_argv(command: str, picks, root: Path, corpus: Path, new: Path) -> list[str]:
    "The base command line (a tiny valid run) followed by the random options (a later value wins)."
    fill = lambda s: s.format(root=root, corpus=corpus, new=new)   # noqa: E731
    base = {"finetune": ["--ckpt", f"{root}/run", "--corpus", f"{root}/domain", "--method", "lora"],
            "distill": ["--teacher", f"{root}/run", "--corpus", str(corpus), "--student-preset", "auto"]}[command]
    argv = [command, *base, "--out", str(new), "--no-progress", "--set", *_SMALL]
    for flag, i in picks:
        values = _OPTIONS[command][flag]
        argv += [flag] if values is None else [flag, fill(values[i % len(values)])]
    return argv


def _run_user_case(argv: list[str], root: Path, corpus: Path, command: str, capsys) -> int:
    """Run `main(argv)` under the case time limit: exit 0, or 2 with exactly one `dsv3: error:` line; never a
    traceback; no file of the user's (under `root` and `corpus`) changed. Counts the outcome; returns the exit code."""
    before = _hashes(root, corpus)
    capsys.readouterr()
    with time_limit(CASE_SECONDS):
        code = main(argv)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("dsv3: error: ")]
    assert "Traceback" not in err and code in (0, 2), (argv, code, err)
    assert (code == 2) == (len(errors) == 1) and len(errors) <= 1, (argv, err)
    after = _hashes(root, corpus)
    assert {f: after.get(f) for f in before} == before, f"a user file changed: {argv}"
    RUN_OUTCOMES[command, code] = RUN_OUTCOMES.get((command, code), 0) + 1
    return code


@settings(max_examples=24, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=st.sampled_from(sorted(_OPTIONS)),
       picks=st.lists(st.tuples(st.sampled_from(sorted({f for o in _OPTIONS.values() for f in o})),
                                st.integers(0, 99)), min_size=1, max_size=3))
def test_finetune_and_distill_options_property_one_line_or_a_run(user_files, tmp_path_factory, capsys, command,
                                                                 picks):
    """Random values for every option of `finetune` and `distill` (paths that do not exist, are files, are the
    corpus or a folder of the user's; bad `--set` values of every config; bad numbers) on top of a tiny valid run:
    exit 0 (a run that then holds its results) or one `dsv3: error:` line with exit 2, never a traceback or a hang,
    and no file of the user's changed or removed."""
    root, corpus = user_files
    picks = [(f, i) for f, i in picks if f in _OPTIONS[command]]
    new = tmp_path_factory.mktemp("out") / "run"
    argv = _option_argv(command, picks, root, corpus, new)
    top = set(root.iterdir())
    code = _run_user_case(argv, root, corpus, command, capsys)
    for entry in set(root.iterdir()) - top:   # a run this case made in the user's folder (--out nope): gone for the next
        shutil.rmtree(entry)
    if code == 0:
        assert (new / "summary.json").exists(), argv


_SAMPLE_INFO_TOKENIZER = {
    "sample": {"--ckpt": _PATHS, "--prompt": ["", "To be", "\x00", "é" * 300, "<|end▁of▁sentence|>"],
               "--max-new-tokens": ["0", "-1", "x", "5", "100000"], "--temperature": ["0", "-1", "nan", "inf", "1"],
               "--top-p": ["0", "1.5", "0.5", "nan"], "--top-k": ["0", "-2", "3", "1000000"],
               "--seed": ["-1", "x", "7"], "--device": ["cpu", "cuda", "cuda:7", "tpu", ""], "--draft": ["mtp", "x"],
               "--adapter": _PATHS},
    "info": {"--preset": ["cpu-tiny", "x", "", "deepseek-v3"], "--set": _SETS},
    "tokenizer": {"--corpus": _PATHS, "--vocab-size": ["0", "-1", "x", "3", "1000000000", "300"]},
}


@settings(max_examples=30, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(command=st.sampled_from(sorted(_SAMPLE_INFO_TOKENIZER)),
       picks=st.lists(st.tuples(st.sampled_from(sorted({f for o in _SAMPLE_INFO_TOKENIZER.values() for f in o})),
                                st.integers(0, 99)), min_size=1, max_size=3))
def test_sample_info_tokenizer_options_property_one_line_or_a_result(user_files, tmp_path_factory, capsys, command,
                                                                     picks):
    """Random values for every option of `sample`, `info` and `tokenizer` (on the tiny run and corpus): exit 0 or one
    `dsv3: error:` line with exit 2; never a traceback or a hang; no file of the user's changed."""
    root, corpus = user_files
    fill = lambda s: s.format(root=root, corpus=corpus, new=tmp_path_factory.mktemp("new") / "x")   # noqa: E731
    base = {"sample": ["--ckpt", f"{root}/run", "--max-new-tokens", "4"], "info": [],
            "tokenizer": ["--corpus", str(corpus), "--vocab-size", "300"]}[command]
    argv = [command, *base]
    for flag, i in picks:
        if flag in _SAMPLE_INFO_TOKENIZER[command]:
            values = _SAMPLE_INFO_TOKENIZER[command][flag]
            argv += [flag, fill(values[i % len(values)])]
    _run_user_case(argv, root, corpus, command, capsys)
