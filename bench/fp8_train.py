"""Training half of bench/fp8.py: loss curves and tokens/s of FP8 against BF16 through the package's `train_step`."""
from __future__ import annotations

import statistics
import time
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from dsv3_min.config import get_preset
from dsv3_min.data import get_batch
from dsv3_min.fp8 import convert
from dsv3_min.model import DeepSeekV3
from dsv3_min.optim import lr_at, make_optimizer
from dsv3_min.step import lm_loss, train_step, val_loss
from dsv3_min.train import autocast_for, prepare_data, train_config_for

SKIP = 10  # warm-up steps (compilation) before tokens/s is timed


def configs(quick: bool, compile: bool, steps: int, hidden: int | None = None):
    "(ModelConfig, TrainConfig): gpu-small, or with `hidden` a wider gpu-small (4 layers, multiples of 128); tiny if quick."
    if quick:
        cfg = get_preset("test-tiny", vocab_size=512, hidden_size=hidden or 64)
        return cfg, train_config_for("test-tiny", batch_size=2, seq_len=32, max_steps=steps, warmup=2, lr=3e-3,
                                     device="cpu")
    tc = train_config_for("gpu-small", compile=compile, max_steps=steps, warmup=min(200, steps // 10), device="cuda")
    if hidden is None:
        return get_preset("gpu-small"), tc
    cfg = get_preset("gpu-small", hidden_size=hidden, num_attention_heads=hidden // 128, intermediate_size=hidden * 11 // 4,
                     moe_intermediate_size=hidden * 3 // 8, q_lora_rank=hidden * 3 // 8, kv_lora_rank=512,
                     num_hidden_layers=4, num_nextn_predict_layers=0)
    return cfg, replace(tc, batch_size=8)


def torchao_rowwise(model) -> None:
    "The peer: torchao's float8 training, rowwise recipe, on every nn.Linear but the heads (experts stay BF16)."
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    convert_to_float8_training(model, config=Float8LinearConfig.from_recipe_name("rowwise"),
                               module_filter_fn=lambda m, fqn: not fqn.endswith(("lm_head", "score")))


def run(cfg, tc, fp8: bool | str, seed: int, tokens, device, until: float) -> tuple:
    "`train_step` for up to tc.max_steps steps or until `until` (time.time()): losses, median step time, tokens/s."
    torch.manual_seed(seed)
    model = DeepSeekV3(cfg).to(device)
    if fp8 == "torchao":
        torchao_rowwise(model)
    elif fp8:
        convert(model)
    opt = make_optimizer(model, tc, device)
    loss_fn = torch.compile(lm_loss) if tc.compile else lm_loss
    autocast = autocast_for(tc, device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    losses, times = [], []
    skip = SKIP if device.type == "cuda" else 1
    for i in range(tc.max_steps):
        if time.time() > until and i > skip + 2:
            break
        x, y = get_batch(tokens, i, tc.batch_size, tc.seq_len, seed=0, device=device)  # the same batches for every run
        sync()
        t0 = time.perf_counter()
        parts, _ = train_step(model, opt, [(x, y)], loss_fn, lr_at(i, tc), tc.grad_clip, autocast)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(parts[1]))
    step_s = statistics.median(times[skip:])
    out = {"loss": losses, "steps": len(losses), "step_s_median": step_s,
           "tokens_per_s": tc.batch_size * tc.seq_len / step_s, "warmup_s": sum(times[:skip])}
    if device.type == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out, model, autocast


def run_safe(cfg, tc, fp8: bool, seed: int, tokens, device, until: float) -> tuple:
    "`run`, and eagerly again if the compiled step fails (the failure recorded as `compile_error`)."
    try:
        return run(cfg, tc, fp8, seed, tokens, device, until)
    except Exception as e:  # noqa: BLE001
        if not tc.compile:
            raise
        print("compiled run failed, eager instead:", e, flush=True)
        torch._dynamo.reset()
        r, model, autocast = run(cfg, replace(tc, compile=False), fp8, seed, tokens, device, until)
        return {**r, "compile_error": f"{type(e).__name__}: {e}"[:500]}, model, autocast


def _capture(model, tokens, tc, device, autocast) -> torch.Tensor:
    "The input of the first (dense) layer's `down_proj` on one batch: real activations of the trained model."
    acts = []
    h = model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: acts.append(i[0].detach().float()))
    with torch.no_grad(), autocast():
        model(get_batch(tokens, 10**6, 2, tc.seq_len, device=device)[0])
    h.remove()
    return acts[0].flatten(0, 1)


def loss_section(a, device: torch.device, left) -> dict:
    "gpu-small (tiny if quick): BF16 and FP8 at seed 0, BF16 at seed 1, the same batches; relative loss differences."
    cfg, tc = configs(a.quick, a.compile, 8 if a.quick else a.loss_steps)
    data = prepare_data("shakespeare" if a.quick else a.corpus, cfg.vocab_size, cache_dir="/tmp/fp8_cache")
    runs, acts = {}, None
    for name, fp8, seed in (("bf16_seed0", False, 0), ("fp8_seed0", True, 0), ("bf16_seed1", False, 1)):
        budget = (left() - (10 if a.quick else 160)) / (3 - len(runs))  # keep time for the wider model
        r, model, autocast = run_safe(cfg, tc, fp8, seed, data.train, device, time.time() + budget)
        r["val_loss"] = val_loss(model, data.val, tc.batch_size, tc.seq_len, 8, device, autocast)
        if name == "bf16_seed0":
            acts = _capture(model, data.train, tc, device, autocast)
        runs[name] = r
        print(f"{name}: {r['steps']} steps, loss {r['loss'][-1]:.4f}, val {r['val_loss']:.4f}, "
              f"{r['tokens_per_s']:,.0f} tok/s", flush=True)
        del model
        torch.cuda.empty_cache() if device.type == "cuda" else None
    n = min(r["steps"] for r in runs.values())
    tail = lambda r: float(np.mean(r["loss"][n - max(1, n // 5): n]))  # noqa: E731  last 20% of the common steps
    rel = lambda k: (tail(runs[k]) - tail(runs["bf16_seed0"])) / tail(runs["bf16_seed0"])  # noqa: E731
    vrel = lambda k: (runs[k]["val_loss"] - runs["bf16_seed0"]["val_loss"]) / runs["bf16_seed0"]["val_loss"]  # noqa: E731
    small = {k: runs[k]["tokens_per_s"] for k in ("bf16_seed0", "fp8_seed0")}
    return {"loss_curves": runs, "loss_preset": "test-tiny (wider)" if a.quick else "gpu-small",
            "loss_common_steps": n, "loss_rel_diff": rel("fp8_seed0"), "seed_rel_diff": rel("bf16_seed1"),
            "val_loss_rel_diff": vrel("fp8_seed0"), "val_seed_rel_diff": vrel("bf16_seed1"),
            "loss_rel_diff_formula": "(mean FP8 loss - mean BF16 loss) / mean BF16 loss, last 20% of the common steps",
            "train_tok_s_small": {**small, "speedup": small["fp8_seed0"] / small["bf16_seed0"]}, "_acts": acts}


def throughput_section(a, device: torch.device, left) -> dict:
    "Tokens/s of BF16 and FP8 on the widest model of --wide that trains (random tokens: speed only)."
    out = {}
    for hidden in [int(h) for h in a.wide.split(",")] if not a.quick else [128]:
        cfg, tc = configs(a.quick, a.compile, 4 if a.quick else SKIP + 30, hidden)
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, 1_000_000)
        r = {}
        variants = [("bf16", False), ("fp8", True)] + ([("torchao_rowwise", "torchao")] if find_spec("torchao") else [])
        try:
            for name, fp8 in variants:
                if left() < 20:
                    break
                until = time.time() + left() / (len(variants) - len(r)) - 10
                try:
                    res, model, _ = run_safe(cfg, tc, fp8, 0, tokens, device, until)
                except Exception as e:  # noqa: BLE001  the peer failing leaves ours measured
                    if fp8 != "torchao":
                        raise
                    r[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
                    continue
                res.pop("loss")
                r[name] = res
                del model
                torch.cuda.empty_cache() if device.type == "cuda" else None
        except torch.OutOfMemoryError as e:
            out[f"hidden_{hidden}"] = {"error": f"out of memory: {e}"[:200]}
            continue
        if "bf16" in r and "fp8" in r:
            r["speedup"] = r["fp8"]["tokens_per_s"] / r["bf16"]["tokens_per_s"]
            if "tokens_per_s" in r.get("torchao_rowwise", {}):
                r["torchao_rowwise_speedup"] = r["torchao_rowwise"]["tokens_per_s"] / r["bf16"]["tokens_per_s"]
            out[f"hidden_{hidden}"] = {"config": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers",
                                       "moe_intermediate_size", "intermediate_size", "n_routed_experts")},
                                       "batch": tc.batch_size, "seq_len": tc.seq_len, **r}
            print(f"hidden {hidden}: bf16 {r['bf16']['tokens_per_s']:,.0f} fp8 {r['fp8']['tokens_per_s']:,.0f} tok/s",
                  flush=True)
            return {"train_wide": out, "train_speedup_widest": r["speedup"], "widest_hidden": hidden}
    return {"train_wide": out, "train_speedup_widest": None}


def plot(res: dict, out: Path) -> None:
    "fp8_gemm.png (TFLOP/s per shape) and fp8_loss.png (the loss curves); skipped without matplotlib."
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    g = {k: p for k, p in res.get("gemm", {}).items() if "error" not in p}
    fig, ax = plt.subplots(figsize=(10, 4))
    xs = np.arange(len(g))
    for off, key, label in ((-0.25, "bf16_tflops", "BF16"), (0, "fp8_tflops_gemm", "FP8 GEMM"),
                            (0.25, "fp8_tflops_with_quant", "FP8 + quantization")):
        ax.bar(xs + off, [p[key] for p in g.values()], 0.25, label=label)
    ax.set_xticks(xs, list(g), rotation=30, ha="right"), ax.set_ylabel("TFLOP/s"), ax.legend()
    ax.set_title(res["device"])
    fig.tight_layout(), fig.savefig(out / "fp8_gemm.png", dpi=110), plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 4))
    for name, r in res.get("loss_curves", {}).items():
        ax.plot(r["loss"], lw=0.8, label=name)
    ax.set_xlabel("step"), ax.set_ylabel("training loss"), ax.set_ylim(top=None), ax.legend()
    ax.set_title(f"{res.get('loss_preset')}: loss_rel_diff {res.get('loss_rel_diff', float('nan')):+.4f}")
    fig.tight_layout(), fig.savefig(out / "fp8_loss.png", dpi=110), plt.close(fig)
