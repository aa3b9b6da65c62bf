"""Training throughput, one call, one GPU: the loop users run, the package's step, and transformers.

Every number is tokens/s of optimizer steps (batch x seq_len tokens) after `--skip` warm-up steps (compilation),
timed over many steps back to back (no host read between them, as the loop runs them):

  loop_tok_s         `python -m dsv3_min train --preset P --set compile=true num_nextn_predict_layers=0` as a
                     subprocess: the loop users run with its default `log_every` (10 on CUDA: one read of the device
                     per 10 steps), its own clock from metrics.jsonl: the tokens of the records whose window starts
                     after --skip over their summed seconds;
  loop_mtp_tok_s     the same with the preset's MTP module (mtp_step_overhead = loop_tok_s / loop_mtp_tok_s - 1: the
                     step time MTP adds);
  loop_log1_tok_s    the same as loop_tok_s with `log_every=1`: a read of the device after every step, as the loop
                     ran before issue 27 (loop_tok_s / loop_log1_tok_s is what dropping the per-step read gives);
  bench_tok_s        this process timing the package's `step.train_step` on the model, optimizer, compiled loss,
                     autocast and `get_batch` batches that `train` builds (MTP off), with the device flag `healthy`
                     (no host read): the same code as loop_tok_s without the loop's logging;
  loop_chunked_ce_tok_s  loop_tok_s with `ce_impl=chunked` (notebook 16's loss without the whole logits; measured on
                     the CPU only so far): chunked_ce_over_full = loop_chunked_ce_tok_s / loop_tok_s;
  hf_compiled_tok_s  transformers' DeepseekV3ForCausalLM with the same weights (ours -> save_pretrained ->
                     from_pretrained, MTP off: transformers has none), the same batches, its own loss, and the same
                     `train_step` (clip, AdamW), under plain `torch.compile(model)`; in bf16 weights on the GPU (its
                     grouped expert GEMM casts its input to the weight dtype: fp32 master weights would run the
                     experts in fp32), where ours keeps fp32 master weights under bf16 autocast as the loop does;
  hf_eager_tok_s     the same, eager;
  titan_compiled_tok_s  torchtitan 0.2.2's DeepSeek-V3 (bench/titan_peer.py: same weights, batches, `train_step`, fp32
                     weights under bf16 autocast, SDPA, `torch.compile(model)`); needs the wheels its docstring names
                     (else `titan_error` says why, the others stand).

MFU = F * tokens/s / peak with F = `optim.flops_per_token(cfg, seq_len)` = 6 * N_matmul + 3 * L * H * S * (d_qk + d_v)
(N_matmul: the active parameters that enter a matmul, LM head and MTP included; 6 = 2 (multiply-add) x 3 (forward and
two backward matmuls); the attention term: a causal query sees S/2 keys, forward 2*H*(S/2)*(d_qk+d_v), backward twice
that), and peak = the bf16 matmul rate measured here (8192^3 `torch.matmul`) and the 989 TFLOP/s datasheet figure.
Top level: loop_tok_s, bench_tok_s, hf_compiled_tok_s, titan_compiled_tok_s (or titan_error), loop_mfu (of the
measured peak), mtp_step_overhead.

    python bench/train_throughput.py --corpus plays/ --out $OUT/tp                 # GPU, about 8 min (--deadline 480)
    python bench/train_throughput.py --preset test-tiny --device cpu --steps 6 --skip 2 --no-compile \
        --set vocab_size=512 --out /tmp/tp                                                        # CPU smoke test
"""
from __future__ import annotations

import argparse
import gc
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dsv3_min.cli import split_overrides  # noqa: E402
from dsv3_min.config import get_preset  # noqa: E402
from dsv3_min.data import get_batch  # noqa: E402
from dsv3_min.files import write_json  # noqa: E402
from dsv3_min.hf import save_pretrained  # noqa: E402
from dsv3_min.model import DeepSeekV3, LossParts  # noqa: E402
from dsv3_min.optim import flops_per_token, make_optimizer  # noqa: E402
from dsv3_min.step import lm_loss, train_step  # noqa: E402
from dsv3_min.train import autocast_for, read_metrics, resolve_device, train_config_for  # noqa: E402

DATASHEET_TFLOPS = 989.0


def matmul_peak(device: torch.device, n: int = 8192) -> float | None:
    "Measured bf16 matmul TFLOP/s (the median of 20 timed products); None off CUDA."
    if device.type != "cuda":
        return None
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    times = []
    for i in range(25):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        a @ b
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0) if i >= 5 else None
    return 2 * n**3 / statistics.median(times) / 1e12


def timed(step, n: int, skip: int, device: torch.device) -> dict:
    "Run `step(i)` for i < skip + n; the mean seconds of the last n, launched back to back (one sync), and peak memory."
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    for i in range(skip):
        step(i)
    sync()
    warmup = time.perf_counter() - t0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(skip, skip + n):
        step(i)
    sync()
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return {"step_s_mean": (time.perf_counter() - t0) / n, "timed_steps": n, "warmup_s": warmup, "peak_mem_gib": peak}


def bench_step(a, cfg, tc, device: torch.device, tokens: np.ndarray):
    "The package's `train_step` on what `train` builds (model, optimizer, compiled `lm_loss`, autocast, batches)."
    torch.manual_seed(tc.seed)
    model = DeepSeekV3(cfg).to(device)
    opt = make_optimizer(model, tc, device)
    loss_fn = torch.compile(lm_loss) if tc.compile else lm_loss
    autocast, healthy = autocast_for(tc, device), torch.ones((), dtype=torch.bool, device=device)

    def step(i):
        x, y = get_batch(tokens, i, tc.batch_size, tc.seq_len, tc.seed, device=device)
        return train_step(model, opt, [(x, y)], loss_fn, tc.lr, tc.grad_clip, autocast, healthy=healthy)
    return model, step


def hf_loss(model, x: torch.Tensor, y: torch.Tensor) -> LossParts:
    "transformers' own loss (`shift_labels` = our targets) as the step's loss parts (no MTP, no balance term)."
    loss = model(input_ids=x, labels=y, shift_labels=y.contiguous()).loss
    zero = loss.new_zeros(())
    return LossParts(loss, loss, zero, zero)


def hf_step(hf, tc, device: torch.device, tokens: np.ndarray):
    "The package's `train_step` on transformers' model (plain `torch.compile(model)` with `tc.compile`), AdamW as ours."
    opt = torch.optim.AdamW(hf.parameters(), lr=tc.lr, betas=(tc.beta1, tc.beta2), weight_decay=tc.weight_decay,
                            fused=device.type == "cuda")
    model, autocast = torch.compile(hf) if tc.compile else hf, autocast_for(tc, device)
    healthy = torch.ones((), dtype=torch.bool, device=device)

    def step(i):
        x, y = get_batch(tokens, i, tc.batch_size, tc.seq_len, tc.seed, device=device)
        return train_step(model, opt, [(x, y)], hf_loss, tc.lr, tc.grad_clip, autocast, healthy=healthy)
    return step


def titan_run(a, cfg, tc, device: torch.device, tokens: np.ndarray, path: str, res: dict, record) -> None:
    "torchtitan's DeepSeek-V3 on the checkpoint at `path`, timed as the others; a failure (no wheels) is `titan_error`."
    torch._dynamo.reset()
    try:
        from titan_peer import load_titan, titan_step
        step = titan_step(load_titan(path, cfg, tc.seq_len, device=device), tc, device, tokens)
        record("titan_compiled_tok_s" if a.compile else "titan_eager_tok_s", timed(step, a.steps, a.skip, device))
    except Exception as e:  # an import error or a failure of the peer is reported, not fatal
        res["titan_error"] = f"{type(e).__name__}: {str(e)[:500]}"
        print("titan", res["titan_error"], flush=True)


def loop_sets(a, mtp: bool) -> list[str]:
    "The `--set` list of the loop's run: compiled (unless --no-compile), no time budget, evaluation only at the end."
    sets = [f"compile={str(a.compile).lower()}", f"device={a.device}", "time_budget=0", "ckpt_every=0",
            f"eval_every={a.steps + a.skip}", "eval_batches=1", "final_eval_batches=1", *a.set]
    return sets + ([] if mtp else ["num_nextn_predict_layers=0"])


def loop_run(a, mtp: bool, out: Path, timeout: float, sets: tuple[str, ...] = ()) -> dict:
    "`python -m dsv3_min train` as users run it (MTP off unless `mtp`); tokens/s of its records after `--skip` steps."
    cmd = [sys.executable, "-m", "dsv3_min", "train", "--preset", a.preset, "--out", str(out), "--no-progress",
           "--max-steps", str(a.steps + a.skip), *(["--corpus", a.corpus] if a.corpus else []), "--set",
           *loop_sets(a, mtp), *sets]
    t0 = time.time()
    subprocess.run(cmd, check=True, cwd=ROOT, timeout=timeout, env={**os.environ, "PYTHONPATH": str(ROOT)})
    rows = [r for r in read_metrics(out) if r["step"] - r["steps_logged"] >= a.skip]  # windows after the warm-up
    steps = sum(r["steps_logged"] for r in rows)  # a record's tokens_per_s = tokens_per_step * steps_logged / seconds
    return {"tokens_per_s": steps / sum(r["steps_logged"] / r["tokens_per_s"] for r in rows), "timed_steps": steps,
            "records": len(rows), "wall_s": time.time() - t0, "command": " ".join(cmd[1:])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--preset", default="gpu-small")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--corpus", help="the loop's corpus: a name or a folder of text files (default: TrainConfig's)")
    ap.add_argument("--steps", type=int, default=100, help="timed steps per measurement")
    ap.add_argument("--skip", type=int, default=20, help="warm-up steps before timing (compilation)")
    ap.add_argument("--deadline", type=float, default=480.0, help="seconds; a measurement that cannot start is skipped")
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="eager everywhere")
    ap.add_argument("--no-hf", action="store_true", help="skip transformers")
    ap.add_argument("--no-titan", action="store_true", help="skip torchtitan")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="more --set for both models")
    a = ap.parse_args()
    t_start, device = time.time(), resolve_device(a.device)
    left = lambda: a.deadline - (time.time() - t_start)  # noqa: E731
    m, t = split_overrides(loop_sets(a, mtp=False))  # the configs the command line builds from the same --set
    cfg, tc = get_preset(a.preset, **m), train_config_for(a.preset, **t)
    if tc.threads:  # as the loop sets them
        torch.set_num_threads(tc.threads)
    tokens_per_step = tc.batch_size * tc.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 4 * tokens_per_step * (a.steps + a.skip) + 1)
    peak = matmul_peak(device)
    res = {"preset": a.preset, "batch": tc.batch_size, "seq_len": tc.seq_len, "tokens_per_step": tokens_per_step,
           "compile": a.compile, "measured_bf16_matmul_tflops": peak, "datasheet_bf16_tflops": DATASHEET_TFLOPS,
           "flops_per_token": {"mtp_off": flops_per_token(cfg, tc.seq_len),
                               "mtp_on": flops_per_token(get_preset(a.preset, **split_overrides(a.set)[0]), tc.seq_len)},
           "flop_formula": "6*N_matmul + 3*L*H*S*(d_qk+d_v)", "mfu_formula": "flops_per_token * tok_s / peak",
           "versions": {"torch": torch.__version__, "python": platform.python_version(),
                        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None},
           "variants": {}}

    def record(key, r, mtp=False):
        r["tokens_per_s"] = r.get("tokens_per_s") or tokens_per_step / r["step_s_mean"]
        f = res["flops_per_token"]["mtp_on" if mtp else "mtp_off"]
        r["mfu_measured_peak"] = f * r["tokens_per_s"] / (peak * 1e12) if peak else None
        r["mfu_datasheet"] = f * r["tokens_per_s"] / (DATASHEET_TFLOPS * 1e12)
        res["variants"][key], res[key] = r, r["tokens_per_s"]
        print(f"{key:18s} {r['tokens_per_s']:>12,.0f} tok/s  MFU {r['mfu_datasheet']:.1%} of the datasheet", flush=True)
        write_json(Path(a.out) / "train_throughput.json", res)  # after each measurement: a cut-off call keeps some

    model, step = bench_step(a, cfg, tc, device, tokens)
    record("bench_tok_s", timed(step, a.steps, a.skip, device))
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp)
        del model, step
        gc.collect()
        torch.cuda.empty_cache() if device.type == "cuda" else None
        for key, mtp, sets in (("loop_tok_s", False, ()), ("loop_mtp_tok_s", True, ()),
                               ("loop_log1_tok_s", False, ("log_every=1",))):
            if left() > 60:
                record(key, loop_run(a, mtp, Path(tmp) / key, left(), sets), mtp)
        if not a.no_hf:
            from transformers import DeepseekV3ForCausalLM
            for key, compiled in (("hf_compiled_tok_s", a.compile), ("hf_eager_tok_s", False)):
                if left() < 45 or (key == "hf_compiled_tok_s" and not a.compile):
                    continue
                torch._dynamo.reset()
                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=dtype).to(device).train()
                try:
                    record(key, timed(hf_step(hf, replace(tc, compile=compiled, dtype="fp32"), device, tokens),
                                      a.steps, a.skip, device))
                except Exception as e:  # a baseline that fails is reported, not fatal
                    res["variants"][key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                    print(key, res["variants"][key]["error"], flush=True)
                del hf
                gc.collect()
        if not a.no_titan and left() > 45:
            titan_run(a, cfg, tc, device, tokens, tmp, res, record)
        if left() > 60:  # the chunked loss (notebook 16) in the loop, MTP off: against loop_tok_s
            record("loop_chunked_ce_tok_s", loop_run(a, False, Path(tmp) / "chunked_ce", left(), ("ce_impl=chunked",)))
    if "loop_tok_s" in res and "bench_tok_s" in res:
        res["loop_over_bench"] = res["loop_tok_s"] / res["bench_tok_s"]
    if "hf_compiled_tok_s" in res and "loop_tok_s" in res:
        res["loop_over_hf_compiled"] = res["loop_tok_s"] / res["hf_compiled_tok_s"]
    if "titan_compiled_tok_s" in res and "loop_tok_s" in res:
        res["loop_over_titan_compiled"] = res["loop_tok_s"] / res["titan_compiled_tok_s"]
    if "loop_tok_s" in res:
        res["loop_mfu"] = res["variants"]["loop_tok_s"]["mfu_measured_peak"]
    if "loop_mtp_tok_s" in res and "loop_tok_s" in res:
        res["mtp_step_overhead"] = res["loop_tok_s"] / res["loop_mtp_tok_s"] - 1
    if "loop_chunked_ce_tok_s" in res and "loop_tok_s" in res:
        res["chunked_ce_over_full"] = res["loop_chunked_ce_tok_s"] / res["loop_tok_s"]
    if "loop_log1_tok_s" in res and "loop_tok_s" in res:
        res["loop_over_log1"] = res["loop_tok_s"] / res["loop_log1_tok_s"]
    res["wall_s"] = time.time() - t_start
    write_json(Path(a.out) / "train_throughput.json", res)
    print({k: round(v, 3) for k, v in res.items() if k.startswith(("loop_over", "loop_mfu", "mtp_step", "chunked_ce", "wall")) and v is not None})


if __name__ == "__main__":
    main()
