"""The fine-tuning driver (dsv3_min.finetune) on a tiny base run (NOT a real model size): methods, evals, resume."""
import argparse
import random

import pytest
import torch
from _tiny_run import tiny_corpus_fixture, train_argv  # noqa: F401 (fixture)
from safetensors.torch import load_file

from dsv3_min.__main__ import add_finetune_arguments, cmd_finetune, finetune_configs, main
from dsv3_min.checkpoint import load_trained
from dsv3_min.finetune import FinetuneConfig, build_docstring_qa, finetune, sft_tokens
from dsv3_min.hf import latest_checkpoint
from dsv3_min.lora import load_adapter
from dsv3_min.train import TrainConfig


@pytest.fixture(scope="module")
def base_and_domain(tiny_corpus, tmp_path_factory):
    """A tiny base run trained 8 steps on the word-salad corpus, and a second corpus of code-like lines."""
    base = tmp_path_factory.mktemp("base") / "run"
    assert main(train_argv(tiny_corpus, "--out", str(base), "--set", "max_steps=8")) == 0
    dom = tmp_path_factory.mktemp("domain")
    words = "def return self import class for in if else None True x y len range print".split()
    r = random.Random(1)
    for i in range(10):
        lines = [" ".join(r.choice(words) for _ in range(r.randint(3, 8))) + ":" for _ in range(60)]
        (dom / f"mod{i:02d}.py").write_text("\n".join(lines) + "\n")
    return base, dom, tiny_corpus


def _tc(**kw):
    return TrainConfig(**{**dict(max_steps=8, batch_size=2, seq_len=16, warmup=2, eval_every=4, eval_batches=2,
                                 final_eval_batches=2, ckpt_every=4, threads=1, device="cpu", lr=1e-2), **kw})


def _run(base_and_domain, out, method="lora", **kw):
    base, dom, base_corpus = base_and_domain
    fc = FinetuneConfig(method=method, lora_r=4, lora_alpha=8, lora_targets="all")
    return finetune(base, str(dom), out, fc, _tc(**kw), base_corpus=str(base_corpus), progress=False, log=lambda *_: None)


def test_lora_keeps_the_base_and_logs_gain_and_forgetting(base_and_domain, tmp_path):
    """LoRA: the checkpointed base weights and router biases are bit-identical to the base run's, eval.jsonl has domain
    and base bits/byte at step 0, 4 and 8, and the saved adapter on a fresh base reproduces the fine-tuned logits."""
    r = _run(base_and_domain, tmp_path / "ft")
    assert [e["step"] for e in r["evals"]] == [0, 4, 8]
    assert all({"domain_val_bpb", "base_val_bpb"} <= e.keys() for e in r["evals"])
    assert r["after"]["domain_val_bpb"] < r["before"]["domain_val_bpb"]
    base_sd = load_file(str(latest_checkpoint(base_and_domain[0]) / "model.safetensors"))
    ft_sd = load_file(str(latest_checkpoint(tmp_path / "ft") / "model.safetensors"))
    plain = {k.replace(".base_layer", ""): v for k, v in ft_sd.items() if "lora_" not in k}
    assert plain.keys() == base_sd.keys() and all(torch.equal(plain[k], base_sd[k]) for k in base_sd)
    model, _ = load_trained(base_and_domain[0])
    load_adapter(model, tmp_path / "ft" / "adapter")
    tuned, _ = load_trained(base_and_domain[0])
    from dsv3_min.finetune import prepare_model
    prepare_model(tuned, FinetuneConfig(method="lora", lora_r=4, lora_alpha=8, lora_targets="all"))
    tuned.load_state_dict({k: v for k, v in ft_sd.items()}, strict=False)
    ids = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids), tuned.eval()(ids))


def test_resume_after_stop_equals_the_unbroken_run(base_and_domain, tmp_path):
    """A LoRA fine-tune stopped after step 4 and resumed ends with exactly the adapter and evals of an unbroken run."""
    _run(base_and_domain, tmp_path / "a")
    _run(base_and_domain, tmp_path / "b", stop_at=4)
    base, dom, base_corpus = base_and_domain
    fc = FinetuneConfig(method="lora", lora_r=4, lora_alpha=8, lora_targets="all")
    r = finetune(base, str(dom), tmp_path / "b", fc, _tc(), resume=True, base_corpus=str(base_corpus),
                 progress=False, log=lambda *_: None)
    a = load_file(str(tmp_path / "a" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "b" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [e["step"] for e in r["evals"]] == [0, 4, 8]
    with pytest.raises(ValueError, match="different settings"):
        finetune(base, str(dom), tmp_path / "b", FinetuneConfig(method="lora", lora_r=8), _tc(), resume=True,
                 base_corpus=str(base_corpus), progress=False, log=lambda *_: None)


def test_qlora_and_full(base_and_domain, tmp_path):
    """QLoRA trains only adapters on a base with far fewer weight bytes than LoRA's; full trains every parameter."""
    q = _run(base_and_domain, tmp_path / "q", "qlora")
    lo = _run(base_and_domain, tmp_path / "l", "lora", max_steps=2, eval_every=2)
    f = _run(base_and_domain, tmp_path / "f", "full", max_steps=2, eval_every=2)
    assert q["trainable_params"] == lo["trainable_params"] and q["weight_bytes"] < 0.6 * lo["weight_bytes"]
    assert q["after"]["domain_val_bpb"] < q["before"]["domain_val_bpb"]
    assert f["trainable_params"] == f["total_params"] and f["adapter_layers"] == 0


def test_cli_arguments():
    """--set splits into FinetuneConfig and TrainConfig fields; model fields, bad values and unknown names raise."""
    p = add_finetune_arguments(argparse.ArgumentParser())
    args = p.parse_args(["--ckpt", "b", "--corpus", "c", "--out", "o", "--method", "qlora", "--time-budget", "30",
                         "--set", "lora_r=8", "lora_alpha=16", "lr=1e-3", "lora_targets=attention,mlp"])
    fc, tc = finetune_configs(args)
    assert (fc.method, fc.lora_r, fc.lora_alpha, fc.lora_targets) == ("qlora", 8, 16.0, "attention,mlp")
    assert (tc.lr, tc.time_budget) == (1e-3, 30.0)
    for bad, msg in [("hidden_size=8", "shape comes from --ckpt"), ("lora_r=0", "lora_r"),
                     ("lora_targets=router", "unknown module name"), ("lr=fast", "lr")]:
        with pytest.raises(ValueError, match=msg):
            finetune_configs(p.parse_args(["--ckpt", "b", "--corpus", "c", "--out", "o", "--set", bad]))


def test_docstring_qa_is_held_out_by_module_and_masks_the_answer(base_and_domain):
    """The SFT builder's train and val conversations come from disjoint modules; only assistant tokens are targets."""
    train, val = build_docstring_qa(["json", "textwrap", "shlex", "fnmatch", "glob", "base64"], val_modules=["shlex"])
    assert train and val and {m for m, _ in train}.isdisjoint({m for m, _ in val})
    _, tok = load_trained(base_and_domain[0])
    ids, mask = sft_tokens(tok, [c for _, c in val[:3]])
    assert ids.shape == mask.shape and 0 < mask.sum() < mask.size
    answer = val[0][1][-1]["content"]
    first = tok.encode(answer)
    assert [int(i) for i in ids[mask][: len(first)]] == first  # the first masked-in tokens are the answer


def test_finetune_command(base_and_domain, tmp_path, capsys):
    """cmd_finetune (the CLI subcommand's body) fine-tunes from parsed args, prints one summary line, writes
    finetune.json and a peft adapter; a second run into the same --out without --resume is refused."""
    base, dom, base_corpus = base_and_domain
    argv = ["--ckpt", str(base), "--corpus", str(dom), "--out", str(tmp_path / "cli"), "--method", "qlora",
            "--no-progress", "--set", "lora_r=2", f"base_corpus={base_corpus}", "max_steps=2", "batch_size=2",
            "seq_len=16", "eval_every=2", "eval_batches=1", "final_eval_batches=1", "threads=1", "device=cpu"]
    args = add_finetune_arguments(argparse.ArgumentParser()).parse_args(argv)
    assert cmd_finetune(args) == 0
    assert "qlora:" in capsys.readouterr().out.splitlines()[-1]
    assert (tmp_path / "cli" / "finetune.json").exists()
    assert (tmp_path / "cli" / "adapter" / "adapter_config.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        cmd_finetune(args)


def test_sample_reads_a_lora_run_and_an_explicit_adapter(base_and_domain, tmp_path, capsys):
    """`sample --ckpt <lora run>` finds the run's adapter and its base by itself, `sample --ckpt BASE --adapter DIR`
    does the same explicitly: both give the adapted model (logits of base + adapter, not of the base alone), and say
    on stderr which adapter they loaded (stdout holds only the text)."""
    from dsv3_min.__main__ import load_for_sample

    base = base_and_domain[0]
    _run(base_and_domain, tmp_path / "ft")
    x = torch.randint(0, 64, (1, 12))
    plain, _ = load_trained(base, "cpu")
    manual = load_adapter(load_trained(base, "cpu")[0], tmp_path / "ft" / "adapter")
    for ckpt, adapter in ((tmp_path / "ft", None), (base, tmp_path / "ft" / "adapter")):
        model, _ = load_for_sample(str(ckpt), adapter, "cpu")
        with torch.no_grad():
            torch.testing.assert_close(model(x), manual(x), rtol=0, atol=0)
            assert not torch.allclose(model(x), plain(x))  # the adapter changed the model
        args = ["sample", "--ckpt", str(ckpt), "--prompt", "the", "--max-new-tokens", "5", "--temperature", "0"]
        assert main(args + (["--adapter", str(adapter)] if adapter else [])) == 0
        out, err = capsys.readouterr()
        assert out.startswith("the") and "adapter" not in out
        assert f"loaded LoRA adapter {tmp_path / 'ft' / 'adapter'} (r=4, alpha=8, " in err, err


def _argv(base_and_domain, out, *more):
    base, dom, base_corpus = base_and_domain
    return ["finetune", "--ckpt", str(base), "--corpus", str(dom), "--out", str(out), "--no-progress", "--set",
            "lora_r=2", f"base_corpus={base_corpus}", "batch_size=2", "seq_len=16", "eval_every=2", "eval_batches=1",
            "final_eval_batches=1", "threads=1", "device=cpu", *more]


def test_set_accumulates_and_max_steps_is_a_checked_flag():
    """Every `--set` of `finetune` counts (a second does not drop the first); `--max-steps` sets max_steps like
    `train`'s, `--set max_steps=` still works, and a bad `--set max_steps=` is refused even with the flag."""
    p = add_finetune_arguments(argparse.ArgumentParser())
    base = ["--ckpt", "b", "--corpus", "c", "--out", "o"]
    fc, tc = finetune_configs(p.parse_args(base + ["--set", "lora_r=8", "--set", "lora_alpha=4", "--max-steps", "5"]))
    assert (fc.lora_r, fc.lora_alpha, tc.max_steps) == (8, 4.0, 5)
    assert finetune_configs(p.parse_args(base + ["--set", "max_steps=7"]))[1].max_steps == 7
    with pytest.raises(ValueError, match="max_steps=0"):
        finetune_configs(p.parse_args(base + ["--max-steps", "3", "--set", "max_steps=0"]))


def test_lora_options_with_method_full_are_refused():
    """`--method full` with LoRA (or QLoRA) options is one ValueError naming them, not options silently recorded."""
    p = add_finetune_arguments(argparse.ArgumentParser())
    a = p.parse_args(["--ckpt", "b", "--corpus", "c", "--out", "o", "--method", "full", "--set", "lora_r=4",
                      "quant_block_size=32"])
    with pytest.raises(ValueError, match="--method full has no use for lora_r, quant_block_size"):
        finetune_configs(a)


def test_sigterm_saves_exits_143_and_writes_no_final_report(base_and_domain, tmp_path, monkeypatch, capsys):
    """A fine-tuning run stopped by SIGTERM at step 2 saves that step, exits 143 like `train` and writes no
    finetune.json (no report of a finished run with step-0 numbers); --resume then finishes it."""
    import os
    import signal

    import dsv3_min.__main__ as cli
    stop = lambda step, rec: step == 2 and os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    monkeypatch.setattr(cli, "finetune", lambda *a, **k: finetune(*a, **k, on_step=stop))
    out = tmp_path / "ft"
    assert main(_argv(base_and_domain, out, "--max-steps", "4")) == 143
    assert "SIGTERM at step 2" in capsys.readouterr().out
    assert latest_checkpoint(out).name.endswith("0000002") and not (out / "finetune.json").exists()
    monkeypatch.undo()
    assert main(_argv(base_and_domain, out, "--max-steps", "4", "--resume")) == 0
    assert __import__("json").loads((out / "finetune.json").read_text())["steps"] == 4


def test_out_that_is_not_a_run_is_refused_before_the_base_loads(base_and_domain, tmp_path, capsys):
    """`finetune --out` into a non-empty folder that holds no run is one line (with --resume suggested) before the
    base model loads: the folder's files stay as they were and no adapter/ appears."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text("{}")
    argv = _argv(base_and_domain, mine, "--max-steps", "2")
    argv[argv.index("--ckpt") + 1] = str(tmp_path / "no-such-base")  # refused before this is looked at
    assert main(argv) == 2
    assert "holds no run" in (err := capsys.readouterr().err) and "--resume" in err
    assert [p.name for p in mine.iterdir()] == ["summary.json"] and (mine / "summary.json").read_text() == "{}"


def test_a_too_small_validation_split_says_so_and_what_to_set(base_and_domain, tmp_path):
    """A corpus whose validation split is shorter than one window names that split and the seq_len to set."""
    with pytest.raises(ValueError, match=r"domain corpus's validation split has \d+ tokens.*--set seq_len="):
        _run(base_and_domain, tmp_path / "small", seq_len=4000, max_steps=1)


def _race(targets: dict, barrier_at, writers, monkeypatch) -> dict:
    """Run each `targets[name]()` in its own thread, all held at `barrier_at` (a module attribute wrapped to wait for
    the others: every run has passed its checks by then); record which thread calls each writer in `writers`
    ((module, name) pairs). Returns {name: exception or None} and the set of thread names that wrote."""
    import threading
    module, attr = barrier_at
    barrier, original = threading.Barrier(len(targets)), getattr(module, attr)

    def held(*a, **k):
        barrier.wait(timeout=60)
        return original(*a, **k)
    monkeypatch.setattr(module, attr, held)
    wrote = set()
    for mod, name in writers:
        def spy(*a, _f=getattr(mod, name), **k):
            wrote.add(threading.current_thread().name)
            return _f(*a, **k)
        monkeypatch.setattr(mod, name, spy)
    outcome = {}

    def run(name):
        try:
            targets[name]()
            outcome[name] = None
        except Exception as e:   # noqa: BLE001 (the loser's error is the result)
            outcome[name] = e
    threads = [threading.Thread(target=run, args=(n,), name=n) for n in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return outcome, wrote


def test_two_finetunes_started_at_once_one_writes_the_other_is_refused_before_writing(base_and_domain, tmp_path,
                                                                                      monkeypatch):
    """Two `finetune` runs into the same new --out, held until both have passed their checks and loaded the base: the
    one that takes the run lock writes; the other is refused (`being written by another process`, one line) without
    having written a single file into the folder."""
    import dsv3_min.finetune as ft
    import dsv3_min.train as tr
    from dsv3_min.cli import exit_code
    outcome, wrote = _race({n: (lambda: _run(base_and_domain, tmp_path / "ft", max_steps=4)) for n in ("a", "b")},
                           (ft, "load_trained"), [(ft, "write_json"), (ft, "write_jsonl"), (ft, "append_jsonl"),
                                                  (tr, "write_json"), (tr, "append_jsonl")], monkeypatch)
    errors = {n: e for n, e in outcome.items() if e is not None}
    assert len(errors) == 1, outcome
    (loser, e), = errors.items()
    assert isinstance(e, FileExistsError) and "being written by another process" in str(e) and exit_code(e) == 2
    assert wrote == set(outcome) - {loser}, wrote
    assert (tmp_path / "ft" / "finetune.json").exists() and not (tmp_path / "ft" / "dsv3.lock").exists()
