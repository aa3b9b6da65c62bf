"""Training throughput of dsv3_min against transformers' DeepseekV3ForCausalLM, gpu-small preset, one GPU.

Both models hold the same weights (ours -> save_pretrained -> transformers.from_pretrained), in bf16, and train with
the same batch (16 x 1024 tokens), the same loss (next-token cross-entropy; ours adds the tiny balance loss and the
router bias update, which are part of V3's algorithm) and the same optimizer (torch AdamW, fused, betas 0.9/0.95).
MTP is off in both (transformers has no MTP module): `num_nextn_predict_layers=0`.

FLOPs per token, forward + backward (the MFU numerator, `dsv3_min.optim.flops_per_token`, here with MTP off):
    F = 6 * N_matmul + 3 * L * H * S * (d_qk + d_v)
  N_matmul = active parameters that enter a matmul for one token: attention projections, dense FFN, router,
             the shared expert, num_experts_per_tok routed experts, and the LM head (the embedding lookup is not a
             matmul; norms are not matmuls). 6 = 2 (multiply-add) x 3 (forward, two backward matmuls).
  Attention: a causal query sees S/2 keys on average; per layer and token the forward costs 2*H*(S/2)*(d_qk + d_v)
             (scores and weighted values), the backward twice that: 3 * H * S * (d_qk + d_v) in all.
MFU = F * tokens/s / peak, with peak = the bf16 matmul rate measured in this run (8192^3 torch.matmul), and also
against the 989 TFLOP/s datasheet figure.

Timing: `triton.testing.do_bench` (CUDA events around each call, the L2 cache flushed between calls, its median).
A variant first runs `--warmup` untimed steps (compilation, CUDA-graph capture), then do_bench times its steps for
`--rep-ms` milliseconds; the peak memory is that of one steady-state step (the last warm-up step), so do_bench's own
256 MB L2-flush buffer does not count.

    python bench/train_throughput.py --out results/            # on a GPU; writes train_throughput.json
"""
from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dsv3_min.config import count_params, get_preset
from dsv3_min.files import atomic_write
from dsv3_min.hf import from_pretrained, save_pretrained
from dsv3_min.model import DeepSeekV3
from dsv3_min.optim import flops_per_token
from dsv3_min.report import preset_diff

DATASHEET_TFLOPS = 989.0


def do_bench(fn, **kw):
    "`triton.testing.do_bench(fn, **kw)`: milliseconds per call of `fn` (CUDA events, L2 flushed between calls)."
    from triton.testing import do_bench as bench  # optional dependency (CUDA builds of torch ship it): GPU runs only
    return bench(fn, **kw)


def matmul_peak(n: int = 8192) -> float:
    "Measured bf16 matmul TFLOP/s on random data (do_bench's median time of one product)."
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    return 2 * n**3 / (do_bench(lambda: a @ b, return_mode="median") / 1e3) / 1e12


def time_steps(step, batches, warmup: int, rep_ms: float) -> dict:
    "Median and mean time of `step(x, y)` over `rep_ms` of timed steps (do_bench) after `warmup` untimed steps."
    nxt = itertools.cycle(batches)
    for _ in range(warmup - 1):
        step(*next(nxt))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step(*next(nxt))                  # the last warm-up step: the peak memory of one steady-state step
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    losses = []
    times = do_bench(lambda: losses.append(step(*next(nxt))), warmup=0, rep=rep_ms, return_mode="all")
    st = sorted(times)
    return {"step_s_median": st[len(st) // 2] / 1e3, "step_s_mean": sum(times) / len(times) / 1e3,
            "timed_steps": len(times), "peak_mem_gib": peak / 2**30, "last_loss": float(losses[-1])}


def ours_step_fn(model, compiled: bool, mode: str | None = None):
    "One AdamW training step of dsv3_min: loss (main + balance), backward, step, router bias update."
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    loss_fn = (lambda x, y: model.loss(x, y).loss)
    if compiled:
        loss_fn = torch.compile(loss_fn, mode=mode)

    def step(x, y):
        if mode == "reduce-overhead":  # CUDA graphs: a new step may overwrite the last one's graph outputs
            torch.compiler.cudagraph_mark_step_begin()
        loss = loss_fn(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_router_biases()
        return loss.detach()
    return step


def hf_step_fn(model):
    "One AdamW training step of transformers' model: next-token cross-entropy, backward, step."
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)

    def step(x, y):
        logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()
    return step


def profile_steps(step, batches, n: int = 3, top: int = 25) -> dict:
    """Where the device time of `n` steps goes (torch.profiler): the `top` kernels and the sum over all kernels per
    step, to set against the timed step (the rest is the GPU waiting on the host). The profiled steps' own wall time
    is recorded too, but the profiler's overhead inflates it."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        for i in range(n):
            step(*batches[i % len(batches)])
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / n
    rows = []
    for ev in prof.key_averages():
        dev = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if dev > 0 and ev.device_type == torch.autograd.DeviceType.CUDA:
            rows.append({"name": ev.key[:120], "device_ms_per_step": dev / 1e3 / n, "calls_per_step": ev.count / n})
    rows.sort(key=lambda r: -r["device_ms_per_step"])
    busy = sum(r["device_ms_per_step"] for r in rows)
    return {"kernel_ms_per_step": busy, "kernels_per_step": sum(r["calls_per_step"] for r in rows),
            "wall_ms_per_step_profiled": wall * 1e3, "top": rows[:top]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps per variant before timing (>= 1)")
    ap.add_argument("--rep-ms", type=float, default=600.0, help="milliseconds of timed steps per variant (do_bench)")
    ap.add_argument("--backend", default="sdpa", help="our attn_backend")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--no-hf", action="store_true")
    ap.add_argument("--no-cudagraphs", action="store_true", help="skip the compiled + CUDA graphs variant")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense (GQA + SwiGLU) comparison model")
    a = ap.parse_args()
    if a.warmup < 1:
        ap.error(f"--warmup must be at least 1, got {a.warmup}")
    if not torch.cuda.is_available():
        ap.error("this benchmark needs a CUDA GPU")
    import transformers  # optional dependency: the comparison model
    torch.manual_seed(0)
    cfg = get_preset("gpu-small", num_nextn_predict_layers=0, attn_backend=a.backend)
    tokens = a.batch * a.seq
    batches = []
    for _ in range(4):
        ids = torch.randint(0, cfg.vocab_size, (a.batch, a.seq + 1), device="cuda")
        batches.append((ids[:, :-1].contiguous(), ids[:, 1:].contiguous()))
    peak = matmul_peak()
    fl = {"total": flops_per_token(cfg, a.seq)}  # the training loop's MFU numerator (formula in the docstring)
    res = {"config": cfg.to_dict(), "batch": a.batch, "seq_len": a.seq, "tokens_per_step": tokens,
           "measured_bf16_matmul_tflops": peak, "datasheet_bf16_tflops": DATASHEET_TFLOPS,
           "flops_per_token": fl, "flop_formula": "6*N_matmul + 3*L*H*S*(d_qk+d_v)",
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "gpu": torch.cuda.get_device_name()},
           "variants": {}}

    def record(name, r):
        r["tokens_per_s"] = tokens / r["step_s_median"]
        r["mfu_measured_peak"] = fl["total"] * r["tokens_per_s"] / (peak * 1e12)
        r["mfu_datasheet"] = fl["total"] * r["tokens_per_s"] / (DATASHEET_TFLOPS * 1e12)
        res["variants"][name] = r
        print(f"{name:28s} {r['step_s_median'] * 1e3:8.1f} ms/step {r['tokens_per_s']:>10,.0f} tok/s "
              f"MFU {r['mfu_measured_peak']:.1%} (datasheet {r['mfu_datasheet']:.1%}) peak {r['peak_mem_gib']:.1f} GiB",
              flush=True)

    model = DeepSeekV3(cfg).cuda()
    with tempfile.TemporaryDirectory() as tmp:
        save_pretrained(model, tmp, dtype=torch.bfloat16)
        model = from_pretrained(tmp, dtype=torch.bfloat16, device="cuda", attn_backend=a.backend)
        if not a.no_hf:
            from transformers import DeepseekV3ForCausalLM
            hf = DeepseekV3ForCausalLM.from_pretrained(tmp, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
            hf.train()
            res["hf_experts_implementation"] = str(getattr(hf.config, "_experts_implementation", None))
            record("transformers (sdpa)", time_steps(hf_step_fn(hf), batches, a.warmup, a.rep_ms))
            del hf
            gc.collect()
            torch.cuda.empty_cache()
    model.train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    best = f"dsv3_min eager ({a.backend})"
    steps = {best: ours_step_fn(model, False)}
    record(best, time_steps(steps[best], batches, a.warmup, a.rep_ms))
    modes = [] if a.no_compile else [None] + ([] if a.no_cudagraphs else ["reduce-overhead"])
    for mode in modes:
        name = f"dsv3_min compiled ({a.backend})" + (" + CUDA graphs" if mode else "")
        model.load_state_dict(state)
        torch._dynamo.reset()
        t0 = time.time()
        try:
            steps[name] = ours_step_fn(model, True, mode)
            r = time_steps(steps[name], batches, a.warmup, a.rep_ms)
        except Exception as e:  # a variant that does not work is reported, not fatal
            res["variants"][name] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            print(f"{name}: {res['variants'][name]['error']}", flush=True)
            continue
        r["compile_and_warmup_s"] = time.time() - t0
        record(name, r)
        if r["tokens_per_s"] > res["variants"][best]["tokens_per_s"]:
            best = name
    res["best_variant"] = best
    res["dsv3_min_tokens_per_s"] = res["variants"][best]["tokens_per_s"]
    res["mfu"] = res["variants"][best]["mfu_measured_peak"]
    if not a.no_hf:
        res["hf_tokens_per_s"] = res["variants"]["transformers (sdpa)"]["tokens_per_s"]
        res["speedup_vs_hf"] = res["dsv3_min_tokens_per_s"] / res["hf_tokens_per_s"]
    prof = profile_steps(steps[best], batches)
    res["profile_best"] = {k: v for k, v in prof.items() if k != "top"}
    res["profile_top_kernels_best"] = prof["top"]
    del model, steps
    gc.collect()
    torch.cuda.empty_cache()
    if not a.no_dense and not a.no_compile:  # ablation (a)'s dense model, compiled the same way: its tok/s and MFU
        torch._dynamo.reset()
        torch.manual_seed(0)
        dcfg = get_preset("gpu-small-dense", num_nextn_predict_layers=0, attn_backend=a.backend)
        dense = DeepSeekV3(dcfg).cuda().to(torch.bfloat16).train()
        dfl = flops_per_token(dcfg, a.seq)
        t0 = time.time()
        r = time_steps(ours_step_fn(dense, True), batches, a.warmup, a.rep_ms)
        r["compile_and_warmup_s"] = time.time() - t0
        r["tokens_per_s"] = tokens / r["step_s_median"]
        r["flops_per_token"] = dfl
        r["mfu_measured_peak"] = dfl * r["tokens_per_s"] / (peak * 1e12)
        r["active_params"], r["moe_active_params"] = count_params(dcfg).active, count_params(cfg).active
        res["dense_compiled"] = {"preset": "gpu-small-dense", "config": preset_diff("gpu-small-dense", "gpu-small"), **r}
        print(f"dense (GQA + SwiGLU) compiled {r['step_s_median'] * 1e3:8.1f} ms/step {r['tokens_per_s']:>10,.0f} tok/s "
              f"MFU {r['mfu_measured_peak']:.1%}", flush=True)
    atomic_write(Path(a.out) / "train_throughput.json", json.dumps(res, indent=2))
    print(f"peak bf16 matmul {peak:.0f} TFLOP/s; F/token {fl['total'] / 1e9:.3f} GFLOP")
    if "speedup_vs_hf" in res:
        print(f"best {best}: {res['dsv3_min_tokens_per_s']:,.0f} tok/s = {res['speedup_vs_hf']:.2f}x transformers, "
              f"MFU {res['mfu']:.1%}")
    print(f"profile of the best: {prof['kernel_ms_per_step']:.1f} ms of kernels per "
          f"{res['variants'][best]['step_s_median'] * 1e3:.1f} ms step ({prof['kernels_per_step']:.0f} kernels)")
    for row in res["profile_top_kernels_best"][:12]:
        print(f"  {row['device_ms_per_step']:7.2f} ms  {row['calls_per_step']:6.0f}x  {row['name'][:90]}")


if __name__ == "__main__":
    main()
