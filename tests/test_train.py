"""Tests of dsv3_min.train: schedule, optimizer groups, FLOP formula, checkpoints, exact resume, stopping."""
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load, save

from conftest import tiny_config
from dsv3_min.__main__ import main
from dsv3_min.model import DeepSeekV3
from dsv3_min.train import (
    TrainConfig,
    evaluate,
    flatten_optimizer_state,
    flops_per_token,
    list_checkpoints,
    load_checkpoint,
    lr_at,
    make_optimizer,
    param_groups,
    read_metrics,
    rng_state,
    save_checkpoint,
    set_rng_state,
    split_overrides,
    train_config_for,
    unflatten_optimizer_state,
)

ROOT = Path(__file__).resolve().parent.parent


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


def test_split_overrides_types_and_errors():
    """--set values parse as JSON/Python literals, ints become floats for float fields, unknown names list both."""
    m, t = split_overrides(["hidden_size=32", "lr=1", "compile=true", "q_lora_rank=None", "corpus=/tmp/x",
                            'rope_scaling={"type": "yarn", "factor": 2, "original_max_position_embeddings": 64}'])
    assert m == {"hidden_size": 32, "q_lora_rank": None, "rope_scaling": {"type": "yarn", "factor": 2,
                                                                          "original_max_position_embeddings": 64}}
    assert t == {"lr": 1.0, "compile": True, "corpus": "/tmp/x"} and isinstance(t["lr"], float)
    with pytest.raises(ValueError, match="unknown field 'hiddn_size'.*hidden_size.*max_steps"):
        split_overrides(["hiddn_size=3"])
    with pytest.raises(ValueError, match="name=value"):
        split_overrides(["lr"])
    with pytest.raises(ValueError, match="unknown preset 'nope'.*cpu-tiny"):
        train_config_for("nope")
    with pytest.raises(ValueError, match="TrainConfig.batch_size"):
        TrainConfig(batch_size=0)


def test_optimizer_state_roundtrip_is_exact():
    """Flattened AdamW state (safetensors tensors + JSON) restores an optimizer whose next step is bit-identical."""
    cfg, tc = tiny_config(), TrainConfig(lr=1e-2)
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    models = [DeepSeekV3(cfg) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [make_optimizer(m, tc, torch.device("cpu")) for m in models]
    for _ in range(2):
        models[0].loss(x[:, :-1], x[:, 1:]).loss.backward()
        opts[0].step()
        opts[0].zero_grad()
    tensors, meta = flatten_optimizer_state(opts[0])
    tensors, meta = load(save(tensors)), json.loads(json.dumps(meta))  # through the real formats
    models[1].load_state_dict(models[0].state_dict())
    opts[1].load_state_dict(unflatten_optimizer_state(tensors, meta))
    for m, o in zip(models, opts):
        m.loss(x[:, :-1], x[:, 1:]).loss.backward()
        o.step()
    for (n, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert torch.equal(a, b), n


def test_rng_state_roundtrip_through_json():
    """torch, python and numpy RNG states survive JSON and reproduce the same draws."""
    torch.manual_seed(1), random.seed(1), np.random.seed(1)
    s = json.loads(json.dumps(rng_state()))
    a = (torch.rand(3), random.random(), np.random.rand())
    set_rng_state(s)
    b = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(a[0], b[0]) and a[1:] == b[1:]


def test_checkpoint_files_keep_last_and_config_mismatch(tmp_path):
    """Checkpoints are safetensors + JSON only, renamed into place (no temp left), pruned to keep_last, reload
    exactly, and refuse a model config that differs, naming the fields."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg)
    opt = make_optimizer(model, TrainConfig(), torch.device("cpu"))
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, model, opt, cfg, TrainConfig(), keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-0000002", "ckpt-0000003"]
    files = sorted(p.name for p in (tmp_path / "ckpt-0000003").iterdir())
    assert files == ["config.json", "model.safetensors", "optimizer.safetensors", "state.json"]
    other = DeepSeekV3(cfg)
    load_checkpoint(tmp_path / "ckpt-0000003", other, cfg=cfg)
    for (n, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(ValueError, match="hidden_size: checkpoint 64 vs now 32.*"):
        load_checkpoint(tmp_path / "ckpt-0000003", DeepSeekV3(tiny_config(hidden_size=32)),
                        cfg=tiny_config(hidden_size=32))


def test_evaluate_uniform_model_gives_log_vocab():
    """A model whose logits are all zero has val loss ln V exactly, and bits/byte = log2(V)·tokens/bytes."""
    cfg = tiny_config()
    model = DeepSeekV3(cfg)
    torch.nn.init.zeros_(model.lm_head.weight)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 1000).astype(np.uint16)
    vl = evaluate(model, tokens, 4, 32, None, torch.device("cpu"), contextlib.nullcontext)
    assert vl == pytest.approx(math.log(cfg.vocab_size), rel=1e-6)


# ----- end to end, through the command line, on a tiny corpus (the config is tiny: NOT a real model size) -----
TINY_SET = ["vocab_size=320", "hidden_size=32", "intermediate_size=48", "moe_intermediate_size=16",
            "num_hidden_layers=2", "num_attention_heads=2", "q_lora_rank=16", "kv_lora_rank=16", "qk_nope_head_dim=8",
            "qk_rope_head_dim=8", "v_head_dim=8", "n_routed_experts=4", "num_experts_per_tok=2", "n_group=1",
            "topk_group=1", "max_position_embeddings=64", "attn_backend=eager",
            "batch_size=2", "seq_len=16", "warmup=2", "eval_every=4", "eval_batches=2", "time_budget=0", "threads=1"]


@pytest.fixture(scope="module")
def tiny_corpus(tmp_path_factory):
    """A folder of 12 small synthetic text files (a deterministic word salad); tokenizer and packed tokens are
    cached in a private directory ($DSV3_CACHE) for the module."""
    root = tmp_path_factory.mktemp("corpus")
    words = "the king queen lord lady sword crown night day love death speak hear thou thee art my".split()
    r = random.Random(0)
    for i in range(12):
        lines = [" ".join(r.choice(words) for _ in range(r.randint(4, 10))).capitalize() + "." for _ in range(60)]
        (root / f"doc{i:02d}.txt").write_text("\n".join(lines) + "\n")
    old = os.environ.get("DSV3_CACHE")
    os.environ["DSV3_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield root
    if old is None:
        os.environ.pop("DSV3_CACHE")
    else:
        os.environ["DSV3_CACHE"] = old


def _argv(corpus, *args):
    "`train --corpus <tiny> --set <TINY_SET> *args` (a later --set of the same field wins)."
    return ["train", "--corpus", str(corpus), "--no-progress", "--set", *TINY_SET, *args]


def _losses(run):
    return [(r["step"], r["loss"]) for r in read_metrics(run)]


def _wait_for_step(run, step, alive, timeout=60):
    "Poll `run/metrics.jsonl` until `step` is logged (while `alive()` holds)."
    t0 = time.time()
    while time.time() - t0 < timeout:
        p = run / "metrics.jsonl"
        if p.exists() and any(json.loads(ln)["step"] == step for ln in p.read_text().splitlines() if ln.strip()):
            return
        assert alive(), "the training process ended before the step was logged"
        time.sleep(0.05)
    raise TimeoutError(f"step {step} never logged")


def test_resume_after_sigkill_reproduces_losses_exactly(tiny_corpus, tmp_path):
    """A 12-step run, and a run checkpointing every 3 steps whose process is SIGKILLed after step 7 and then
    resumed to 12, log bit-identical per-step losses (and the resumed log has each step once)."""
    full, cut = tmp_path / "full", tmp_path / "cut"
    assert main(_argv(tiny_corpus, "--out", str(full), "--max-steps", "12")) == 0
    env = {**os.environ, "DSV3_DEBUG_PAUSE_AFTER_STEP": "7", "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.Popen([sys.executable, "-m", "dsv3_min", *_argv(tiny_corpus, "--out", str(cut), "--max-steps",
                                                                   "12", "--ckpt-every", "3")],
                         env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _wait_for_step(cut, 7, lambda: p.poll() is None)
    p.send_signal(signal.SIGKILL)
    p.communicate(timeout=30)
    assert p.returncode == -signal.SIGKILL
    assert sorted(c.name for c in cut.glob("ckpt-*")) == ["ckpt-0000003", "ckpt-0000006"]
    assert [s for s, _ in _losses(cut)] == list(range(1, 8))
    assert main(_argv(tiny_corpus, "--out", str(cut), "--max-steps", "12", "--ckpt-every", "3", "--resume")) == 0
    a, b = _losses(full), _losses(cut)
    assert [s for s, _ in a] == list(range(1, 13))
    assert a == b  # exact float equality, step by step


def test_sigterm_saves_a_checkpoint_and_resume_errors(tiny_corpus, tmp_path, capsys):
    """SIGTERM mid-run saves a checkpoint at the current step and exits 143; --resume with no checkpoint, or with
    a different model config, and a new run into a directory that holds one, are clear errors naming the problem."""
    run = tmp_path / "run"
    t = threading.Thread(target=lambda: (_wait_for_step(run, 5, lambda: True), os.kill(os.getpid(), signal.SIGTERM)))
    os.environ["DSV3_DEBUG_PAUSE_AFTER_STEP"] = "5"
    try:
        t.start()
        assert main(_argv(tiny_corpus, "--out", str(run), "--max-steps", "12")) == 143
    finally:
        del os.environ["DSV3_DEBUG_PAUSE_AFTER_STEP"]
        t.join()
    assert (run / "ckpt-0000005" / "model.safetensors").exists() and "SIGTERM at step 5" in capsys.readouterr().out
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler was put back
    assert main(_argv(tiny_corpus, "--out", str(tmp_path / "empty"), "--resume")) == 2
    assert "no checkpoint under" in capsys.readouterr().err
    assert main(_argv(tiny_corpus, "--out", str(run))) == 2  # a new run never overwrites an old one
    assert "already holds a run (ckpt-0000005); add --resume" in capsys.readouterr().err
    assert main(_argv(tiny_corpus, "--out", str(run), "--resume", "--set", "hidden_size=48", "seed=1")) == 2
    err = capsys.readouterr().err
    assert "mismatching fields: hidden_size: checkpoint 32 vs now 48; seed: checkpoint 0 vs now 1" in err


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tiny_corpus, tmp_path, capsys):
    """With an absurd learning rate (1e30) the weights overflow; the run stops at the first non-finite loss with an
    error naming that step N, exit code 1, every logged loss finite, and checkpoint N-1 as the newest."""
    run = tmp_path / "run"
    assert main(_argv(tiny_corpus, "--out", str(run), "--max-steps", "8", "--ckpt-every", "1", "--set", "lr=1e30",
                      "warmup=0", "grad_clip=0")) == 1
    err = capsys.readouterr().err
    n = int(re.search(r"non-finite loss \(\w+\) at step (\d+)", err).group(1))
    assert 1 < n <= 8
    assert [s for s, _ in _losses(run)] == list(range(1, n)) and all(math.isfinite(v) for _, v in _losses(run))
    assert list_checkpoints(run)[-1].name == f"ckpt-{n - 1:07d}"
