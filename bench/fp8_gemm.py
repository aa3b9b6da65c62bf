"""GEMM half of bench/fp8.py: FP8 blockwise against BF16 TFLOP/s, the kernel against the emulation, scaling errors.

TFLOP/s = 2*M*N*K / t, t the median of CUDA-synchronized repeats. `fp8_tflops_with_quant` times quantizing both
operands (X in 1x128 tiles, W in 128x128 blocks) and the GEMM, as a training forward does; `fp8_tflops_gemm` the
GEMM alone on operands quantized beforehand; `fp8_tflops_with_compiled_quant` quantizes with `torch.compile(quantize)`
(one fused kernel per operand, what `TrainConfig.compile=true` gets). `linear_fwd_bwd_speedup`: the whole layer
(`Float8Linear` against `nn.Linear` under bf16 autocast, fp32 master weights, forward + both backward GEMMs).
"""
from __future__ import annotations

import math
import statistics
import time

import torch
from torch import nn

from dsv3_min.fp8 import BLOCK, Float8Linear, dequantize, emulated_mm, fp8_mm, quantize, scaled_mm_ok, scaling_errors


def shapes(quick: bool) -> dict[str, tuple[int, int, int]]:
    "(M, K, N) per GEMM: gpu-small's (16K tokens; an expert sees 16K*4/16 rows) and DeepSeek-V3's at M = 4096."
    if quick:
        return {"small_o_proj": (256, 256, 256), "dsv3_expert_up": (256, 384, 256), "dsv3_dense_up": (256, 256, 512)}
    return {"gs_o_proj": (16384, 1024, 1024), "gs_mlp_up": (16384, 1024, 2816), "gs_mlp_down": (16384, 2816, 1024),
            "gs_expert_gate_up": (4096, 1024, 1024), "gs_expert_down": (4096, 512, 1024),
            "dsv3_expert_up": (4096, 7168, 2048), "dsv3_expert_down": (4096, 2048, 7168),
            "dsv3_dense_up": (4096, 7168, 18432), "dsv3_dense_down": (4096, 18432, 7168)}


def bench(fn, device: torch.device, reps: int, warmup: int = 3) -> float:
    "Median seconds of `fn()` over `reps` synchronized runs after `warmup`."
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times = []
    for i in range(warmup + reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def gemm_point(M: int, K: int, N: int, device: torch.device, reps: int, cquant) -> dict:
    "BF16 `x @ wᵀ` against the FP8 blockwise GEMM (with and without quantization), and the layer forward+backward."
    x = torch.randn(M, K, device=device, dtype=torch.bfloat16)
    w = torch.randn(N, K, device=device, dtype=torch.bfloat16) * K**-0.5
    xq, wq = quantize(x), quantize(w, rows=BLOCK)
    flops = 2 * M * N * K
    t = {"bf16": bench(lambda: x @ w.t(), device, reps),
         "fp8_gemm": bench(lambda: fp8_mm(xq, wq, torch.bfloat16), device, reps),
         "fp8_with_quant": bench(lambda: fp8_mm(quantize(x), quantize(w, rows=BLOCK), torch.bfloat16), device, reps)}
    try:
        if cquant is not None:
            t["fp8_with_compiled_quant"] = bench(lambda: fp8_mm(cquant(x), cquant(w, rows=BLOCK), torch.bfloat16),
                                                 device, reps)
    except Exception as e:  # noqa: BLE001  torch.compile failing is a result too; eager quantization stands
        print("compiled quantize failed:", e, flush=True)
    out = {"M": M, "K": K, "N": N, "seconds": t, "bf16_tflops": flops / t["bf16"] / 1e12,
           "fp8_tflops_gemm": flops / t["fp8_gemm"] / 1e12, "fp8_tflops_with_quant": flops / t["fp8_with_quant"] / 1e12,
           "speedup_gemm": t["bf16"] / t["fp8_gemm"], "speedup_with_quant": t["bf16"] / t["fp8_with_quant"]}
    if "fp8_with_compiled_quant" in t:
        out["fp8_tflops_with_compiled_quant"] = flops / t["fp8_with_compiled_quant"] / 1e12
        out["speedup_with_compiled_quant"] = t["bf16"] / t["fp8_with_compiled_quant"]
    out["linear_fwd_bwd_speedup"] = layer_speedup(M, K, N, device, reps)
    return out


def layer_speedup(M: int, K: int, N: int, device: torch.device, reps: int) -> float:
    "Time of `nn.Linear` forward+backward under bf16 autocast over that of its `Float8Linear` (same weights)."
    lin = nn.Linear(K, N, bias=False, device=device)
    f8 = Float8Linear(lin)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # autocast's dtype; fp32 on CPU
    x = torch.randn(M, K, device=device, dtype=dtype, requires_grad=True)

    def step(layer):
        with torch.autocast(device.type, dtype=dtype, enabled=device.type == "cuda"):
            y = layer(x)
        y.backward(torch.ones_like(y))
        lin.weight.grad = x.grad = None
    return bench(lambda: step(lin), device, reps) / bench(lambda: step(f8), device, reps)


def gemm_section(quick: bool, device: torch.device, left) -> dict:
    "Every shape's point (skipped past the deadline) and the geometric mean speedup at DeepSeek-V3's shapes."
    cquant = torch.compile(quantize) if device.type == "cuda" else None
    res, reps = {}, 5 if quick else 20
    for name, (M, K, N) in shapes(quick).items():
        if left() < 30:
            break
        try:
            res[name] = gemm_point(M, K, N, device, reps, cquant)
        except RuntimeError as e:  # recorded, and the next shape tried
            res[name] = {"error": f"{e}"[:1000]}
            print(name, "error:", e, flush=True)
            continue
        print(f"{name:18s} bf16 {res[name]['bf16_tflops']:7.1f}  fp8 {res[name]['fp8_tflops_gemm']:7.1f} "
              f"(with quant {res[name]['fp8_tflops_with_quant']:7.1f}) TFLOP/s", flush=True)
    # the headline: quantization compiled (what TrainConfig.compile=true runs) where that worked, else eager
    ds = [p.get("speedup_with_compiled_quant", p["speedup_with_quant"]) for n, p in res.items()
          if n.startswith("dsv3") and "error" not in p]
    geo = math.exp(sum(map(math.log, ds)) / len(ds)) if ds else None
    return {"gemm": res, "gemm_speedup_dsv3_shapes": geo,
            "gemm_speedup_formula": "geometric mean over dsv3_* of bf16 time / (quantize X and W + FP8 GEMM) time"}


def kernel_error(quick: bool, device: torch.device) -> dict:
    "The kernel against the emulation and both against float64 (dequantized inputs; the unquantized product)."
    M, K, N = (256, 384, 256) if quick else (1024, 7168, 2048)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = (torch.randn(M, K, generator=g) * torch.rand(1, K, generator=g).pow(4) * 10).to(device)  # uneven channels
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(device)
    xq, wq = quantize(x), quantize(w, rows=BLOCK)
    ref = (dequantize(xq).double() @ dequantize(wq).double().t())
    exact = x.double() @ w.double().t()
    emu = emulated_mm(xq, wq, torch.float32).double()
    kern = fp8_mm(xq, wq, torch.float32).double()
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    return {"shape": [M, K, N], "path": "torch._scaled_mm (cuBLAS blockwise)" if scaled_mm_ok(xq, wq) else "emulation",
            "kernel_vs_emulation_rel": rel(kern, emu),
            "kernel_vs_emulation_max_abs_over_max": ((kern - emu).abs().max() / emu.abs().max()).item(),
            "emulation_vs_fp64_dequantized_rel": rel(emu, ref), "kernel_vs_fp64_dequantized_rel": rel(kern, ref),
            "fp8_vs_unquantized_rel": rel(kern, exact)}


def outlier_errors(quick: bool, device: torch.device, real: torch.Tensor | None) -> dict:
    "Per-tensor against 1x128-tile scaling: synthetic activations with 8 outlier channels x100, and real ones."
    g = torch.Generator(device="cpu").manual_seed(0)
    T, C = (512, 512) if quick else (4096, 7168)
    x = torch.randn(T, C, generator=g)
    x[:, torch.randperm(C, generator=g)[:8]] *= 100.0
    out = {"synthetic_outliers": {"shape": [T, C], "outlier_channels": 8, "factor": 100.0,
                                  **scaling_errors(x.to(device))}}
    if real is not None:
        out["trained_model_down_proj_input"] = {"shape": list(real.shape), **scaling_errors(real)}
    return out
