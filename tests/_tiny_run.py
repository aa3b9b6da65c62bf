"""Shared helpers of the end-to-end training tests (test_train, test_faults, test_cli): a tiny corpus, the --set list
of a tiny model (NOT a real model size), and running `main` in a forked child process that a test can SIGKILL."""
import json
import os
import random
import signal
import time

import pytest
import torch

from dsv3_min.__main__ import main
from dsv3_min.train import read_metrics

TINY_SET = ["vocab_size=320", "hidden_size=32", "intermediate_size=48", "moe_intermediate_size=16",
            "num_hidden_layers=2", "num_attention_heads=2", "q_lora_rank=16", "kv_lora_rank=16", "qk_nope_head_dim=8",
            "qk_rope_head_dim=8", "v_head_dim=8", "n_routed_experts=4", "num_experts_per_tok=2", "n_group=1",
            "topk_group=1", "max_position_embeddings=64", "attn_backend=eager",
            "batch_size=2", "seq_len=16", "warmup=2", "eval_every=4", "eval_batches=2", "time_budget=0", "threads=1"]


@pytest.fixture(scope="module", name="tiny_corpus")
def tiny_corpus_fixture(tmp_path_factory):
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


def train_argv(corpus, *args):
    "`train --corpus <tiny> --set <TINY_SET> *args` (a later --set of the same field wins)."
    return ["train", "--corpus", str(corpus), "--no-progress", "--set", *TINY_SET, *args]


def losses(run):
    "[(step, loss)] of a run's metrics.jsonl."
    return [(r["step"], r["loss"]) for r in read_metrics(run)]


def logged_steps(run) -> list[int]:
    "Steps whose metrics line is complete so far (a line being written is skipped)."
    p = run / "metrics.jsonl"
    out = []
    for ln in (p.read_text().splitlines() if p.exists() else []):
        try:
            out.append(json.loads(ln)["step"])
        except ValueError:
            pass
    return out


def wait_for_step(run, step, alive, timeout=60):
    "Poll `run/metrics.jsonl` until `step` is logged (while `alive()` holds)."
    t0 = time.time()
    while time.time() - t0 < timeout:
        if step in logged_steps(run):
            return
        assert alive(), "the training process ended before the step was logged"
        time.sleep(0.02)
    raise TimeoutError(f"step {step} never logged")


class Child:
    """`main(argv, **hooks)` in a forked child process (torch already imported: it starts in milliseconds, unlike a
    fresh interpreter), after `setup()` if given. The child exits with main's return code (99 if it raised)."""

    def __init__(self, argv, setup=None, **hooks):
        self.status = None
        self.pid = os.fork()
        if self.pid == 0:  # the child
            code = 99
            try:
                torch.set_num_threads(1)
                if setup is not None:  # e.g. patch the checkpoint writer, in the child only
                    setup()
                code = main(argv, **hooks)
            finally:
                os._exit(code)

    def returncode(self):
        "The exit code (negative: killed by that signal), or None while it runs."
        if self.status is None:
            pid, st = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = st
        return None if self.status is None else os.waitstatus_to_exitcode(self.status)

    def alive(self) -> bool:
        return self.returncode() is None

    def kill(self) -> int:
        "SIGKILL it (if it still runs) and return its exit code."
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
            _, self.status = os.waitpid(self.pid, 0)
        return self.returncode()

    def wait(self, timeout=120) -> int:
        "Wait for it to end by itself; its exit code."
        t0 = time.time()
        while self.alive():
            if time.time() - t0 > timeout:
                self.kill()
                raise TimeoutError("the child did not finish")
            time.sleep(0.01)
        return self.returncode()


def freeze_at(step):
    "An on_step callback that blocks forever after `step` (so a test can kill the process at a known step)."
    def on_step(s, rec):
        while s == step:
            time.sleep(1)
    return on_step
