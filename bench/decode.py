"""Decode speed of `dsv3_min.infer.generate` against transformers' `generate`, same weights (issue 15).

    python bench/decode.py --out results/            # one H200: gpu-small, bf16; writes decode.json + decode.png
    python bench/decode.py --cpu --out results/      # CPU: cpu-tiny, fp32, 1 thread recommended (OMP_NUM_THREADS=1)
    python bench/decode.py --quick --out /tmp/q      # CPU smoke of the whole script in seconds (tests call it)

On one GPU the rows take three calls (copy each call's decode.json to results/ before the next):
    python3 bench/decode.py --out $OUT/decode --deadline 520 --skip mtp,plain,hf_eager,naive,nocompile,nokernel
    python3 bench/decode.py --out $OUT/decode --deadline 520 --skip mtp,absorb,shapes,hf_eager,hf_static --merge results/decode.json
    python3 bench/decode.py --out $OUT/decode --deadline 560 --skip ours,shapes,plain,hf_eager,hf_static --merge results/decode.json --train-seconds 200

What runs (greedy, prompt 128 random tokens, 256 new tokens, batch 1, 8, 32, 128; random weights, seed 0):
  ours        dsv3_min.infer.generate with its default settings (on CUDA: static caches, the step compiled and
              captured in a CUDA graph): ours_absorb (MLA 'absorb') at every batch, ours_naive at b1 and b32; and
              ours_absorb_nocompile (compile=False: the graph alone, the old default) and ours_absorb_nokernel (the
              same weights with attn_backend='eager': the absorbed attention in PyTorch instead of notebook 14's
              Triton kernel) at b1 and b32. compile_s = the
              engine's first step (compile + capture + one step), once per engine
  dsv3_plain  the 'before': dsv3_min.model.reference_generate (notebook 16: dynamic cache, eager), b1 and b32
  hf_eager    transformers DeepseekV3ForCausalLM.generate, sdpa, dynamic cache
  hf_static   the same with cache_implementation="static" (transformers compiles the forward itself); an error is
              recorded, not raised. The weights travel ours -> dsv3_min.hf.save_pretrained -> from_pretrained.
  shapes      bench/decode_shapes.py: a 2,000-token prompt at batch 1, a 900-token one at batch 4, ours vs hf_static
  mtp         bench/decode_mtp.py: gpu-small trained here with MTP, then self-speculative decoding (its docstring).
On the CPU (cpu-tiny, fp32, prompt 64, 128 new tokens, batch 1 and 8): ours with the defaults (eager there) and
compiled (inductor's C++ code; no graph), transformers eager and with its static cache compiled (asked for with
a CompileConfig whose _compile_all_devices is set, since generate compiles on accelerators only by default).
tok/s = batch * new tokens / wall time of the whole generate call (prefill included); ttft_s = prompt to first new
token (ours: from generate's stats, same engine; transformers: a call with max_new_tokens=1); decode_tok_s =
B (new - 1) / (wall - ttft); peak_mem_gib = torch.cuda.max_memory_allocated (weights included).

Memory-bandwidth use (notebook 28), for every ours_* entry (top level: mbu_b1 and compile_s_b1 of the b1 winner):
    mbu = bytes_per_step / step_s / copy_bw,   step_s = B / decode_tok_s,
    bytes_per_step = w (N_dense + N_moe_layers * E_touched(B) * 3 d I) + B L T c w   (`infer.decode_step_bytes`)
with w the bytes per number (bf16 2, fp32 4), N_dense every weight a step reads once whatever the batch (attention,
dense FFN, shared experts, norms, LM head; the fp32 router at 4 bytes), E_touched(B) = E (1 - (1 - k/E)^B) the
expected distinct routed experts (k of E, d x I each, gate + up + down) that B tokens routed uniformly hit per MoE
layer, and the cache read: B sequences of the mean context T = prompt + new/2 tokens, L layers, c numbers per token
(absorbed MLA: kv_lora_rank + qk_rope_head_dim; naive: heads x (d_qk + d_v)). copy_bw is measured in the same call:
2 x bytes / time of a large device-to-device copy (2 GiB on the GPU). Top-level `mbu_b1` is the mbu of the entry
that gives `ours_b1_tok_s`.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch
from decode_hf import bench_hf, load_hf  # bench/, the script's folder, is first on sys.path
from decode_shapes import bench_shapes_hf, bench_shapes_ours, shape_prompts
from decode_timing import copy_bandwidth, free, measure, measure_ours, record

from dsv3_min.config import get_preset
from dsv3_min.files import read_json, write_json
from dsv3_min.hf import save_pretrained
from dsv3_min.infer import decode_step_bytes, generate
from dsv3_min.model import DeepSeekV3, reference_generate


def bench_ours(model, prompts: dict, new: int, reps: int, variants: list[dict], out: dict, left) -> None:
    "Our generate for each variant (mla_impl, compile) and batch size."
    for v in variants:
        name = "ours_" + v["mla_impl"] + {None: "", True: "_compiled", False: "_nocompile"}[v.get("compile")]
        name += v.get("suffix", "")
        for b in v["batches"]:
            if left() < v.get("need_s", 5):
                out.setdefault(name, {})[str(b)] = dict(skipped="time")
                continue
            free(model)
            try:
                run = lambda n, st, b=b, v=v: generate(model, prompts[b], n, temperature=0, mla_impl=v["mla_impl"],
                                                       compile=v.get("compile"), stats=st)
                r = measure_ours(run, b, new, reps)
            except Exception as e:
                traceback.print_exc()
                r = dict(error=f"{type(e).__name__}: {e}")
            record(out, name, b, r)
        free(model)


def bench_plain(model, prompts: dict, new: int, batches: list[int], out: dict, left) -> None:
    "The 'before': notebook 16's `dsv3_min.model.reference_generate` (dynamic cache, eager, one host sync per token)."
    for b in batches:
        if left() < 30:
            out.setdefault("dsv3_plain", {})[str(b)] = dict(skipped="time")
            continue
        record(out, "dsv3_plain", b,
               measure(lambda n, b=b: reference_generate(model, prompts[b], n, temperature=0), b, new, reps=1))


def mbu_table(cfg, out: dict, context: float, copy_bw: float, w: int) -> None:
    "bytes_per_step, step_s and mbu (the docstring's formula) for every measured ours_* entry."
    for name, per_batch in out.items():
        if not name.startswith("ours_"):
            continue
        for b, r in per_batch.items():
            if "decode_tok_s" not in r or "mbu" in r:  # merged entries keep their own call's bandwidth
                continue
            nbytes = decode_step_bytes(cfg, int(b), context, "absorb" if "absorb" in name else "naive", w).total
            r.update(bytes_per_step=nbytes, step_s=int(b) / r["decode_tok_s"])
            r["mbu"] = nbytes / r["step_s"] / copy_bw


def plot(out: dict, path: Path) -> None:
    "tok/s against batch size for every variant; MTP acceptance by position when present."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    has_mtp = "by_position" in out.get("mtp", {})
    fig, axes = plt.subplots(1, 2 if has_mtp else 1, figsize=(12 if has_mtp else 6, 4), squeeze=False)
    ax = axes[0, 0]
    for name, per_batch in out.items():
        if name.startswith(("ours_", "hf_", "dsv3_plain")) and isinstance(per_batch, dict):
            pts = sorted((int(b), r["tok_s"]) for b, r in per_batch.items() if "tok_s" in r)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=name)
    ax.set(xscale="log", yscale="log", xlabel="batch", ylabel="tokens/s", title=f"{out['preset']}, {out['dtype']}")
    ax.legend(fontsize=7)
    if has_mtp:
        bp = out["mtp"]["by_position"]
        axes[0, 1].bar(list(bp), [v["acceptance"] for v in bp.values()])
        axes[0, 1].set(ylim=(0, 1), xlabel="generated position", ylabel="MTP draft acceptance",
                       title=f"trained {out['mtp_train']['budget_s']:.0f}s; mean {out['mtp']['acceptance']:.2f}")
        axes[0, 1].tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def summary(out: dict) -> None:
    "The top-level numbers the README quotes."
    best = lambda prefix, b: max([r[str(b)]["tok_s"] for k, r in out.items() if k.startswith(prefix)
                                  and isinstance(r, dict) and "tok_s" in r.get(str(b), {})], default=None)
    out["ours_b1_tok_s"], out["ours_b32_tok_s"] = best("ours_", 1), best("ours_", 32)
    b1 = next((r["1"] for k, r in out.items() if k.startswith("ours_") and isinstance(r, dict)
               and r.get("1", {}).get("tok_s") == out["ours_b1_tok_s"]), {})
    out["mbu_b1"], out["compile_s_b1"] = b1.get("mbu"), b1.get("compile_s")  # that engine's first step
    out["hf_best_b1_tok_s"], out["hf_best_b32_tok_s"] = best("hf_", 1), best("hf_", 32)
    out["mtp_acceptance"] = out.get("mtp", {}).get("acceptance")
    out["mtp_speedup_b1"] = out.get("mtp", {}).get("speedup_b1")
    eager = out.get("hf_eager", {}).get("1", {}).get("tok_s")
    for key, ours, theirs in (("ours_over_hf_best_b1", "ours_b1_tok_s", out["hf_best_b1_tok_s"]),
                              ("ours_over_hf_eager_b1", "ours_b1_tok_s", eager),
                              ("ours_over_hf_best_b32", "ours_b32_tok_s", out["hf_best_b32_tok_s"])):
        if out[ours] and theirs:
            out[key] = out[ours] / theirs


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for decode.json and decode.png")
    ap.add_argument("--cpu", action="store_true", help="cpu-tiny in fp32 on the CPU: ours vs transformers eager")
    ap.add_argument("--quick", action="store_true", help="CPU smoke in seconds: --cpu, prompt 8, 4 new tokens, "
                    "batches 1,8, one rep, no compiling")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,8,32,128; CPU 1,8)")
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 128; CPU 64)")
    ap.add_argument("--new", type=int, default=None, help="new tokens (default 256; CPU 128)")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds: start nothing that would end later")
    ap.add_argument("--train-seconds", type=float, default=150.0, help="MTP model training budget (GPU)")
    ap.add_argument("--corpus", default="python-stdlib", help="corpus for the MTP model")
    ap.add_argument("--train-vocab", type=int, default=8192)
    ap.add_argument("--tokenizer-chunks", type=int, default=3000, help="4 KB chunks the MTP tokenizer learns from")
    ap.add_argument("--cache", default=None, help="packed-data cache directory")
    ap.add_argument("--merge", type=Path, help="an earlier decode.json whose sections this run skips (two calls)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per variant, the fastest kept (ours always; "
                    "transformers too on the CPU, whose timings are noisy)")
    ap.add_argument("--mtp-prompts", type=int, default=8)
    ap.add_argument("--mtp-eval-s", type=float, default=60.0, help="time kept for the MTP evaluation")
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: ours (all of ours), absorb, naive, "
                    "nocompile, nokernel, shapes, compile (CPU), plain, hf_eager, hf_static, mtp")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    t0 = time.time()
    left = lambda: args.deadline - (time.time() - t0)
    if args.quick:
        args.cpu, args.prompt, args.new, args.reps = True, args.prompt or 8, args.new or 4, 1
        args.skip = ",".join(filter(None, [args.skip, "compile", "hf_static"]))
    cpu = args.cpu or not torch.cuda.is_available()
    device = torch.device("cpu" if cpu else "cuda")
    args.preset, args.dtype = ("cpu-tiny", torch.float32) if cpu else ("gpu-small", torch.bfloat16)
    batches = [int(b) for b in (args.batches or ("1,8" if cpu else "1,8,32,128")).split(",")]
    args.prompt, args.new = args.prompt or (64 if cpu else 128), args.new or (128 if cpu else 256)
    skip = set(filter(None, args.skip.split(",")))
    args.out.mkdir(parents=True, exist_ok=True)
    out = dict(preset=args.preset, dtype=str(args.dtype).removeprefix("torch."), device=torch.cuda.get_device_name()
               if not cpu else platform.processor() or "cpu", threads=torch.get_num_threads(), prompt=args.prompt,
               new_tokens=args.new, batches=batches, greedy=True, torch=torch.__version__)
    torch.manual_seed(0)
    cfg = get_preset(args.preset)
    model = DeepSeekV3(cfg).to(device, args.dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, cfg.vocab_size, (b, args.prompt), generator=g).to(device) for b in batches}
    out["copy_bandwidth"] = copy_bandwidth(device, 0.25 if args.quick else 2.0)  # bytes/s, for mbu
    path = args.out / "decode.json"
    if args.merge:  # keep the earlier call's sections (e.g. call 1: --skip mtp; call 2: --skip ours,hf_eager,...)
        out.update({k: v for k, v in read_json(args.merge).items() if isinstance(v, dict)})
    long = shape_prompts(cfg.vocab_size, device) if not cpu and "shapes" not in skip else {}
    if "ours" not in skip:
        b1_32 = [b for b in (1, 32) if b in batches] or batches[:1]
        variants = [dict(mla_impl="absorb", batches=batches, need_s=5 if cpu else 60),
                    dict(mla_impl="naive", batches=batches if cpu else b1_32, need_s=5 if cpu else 60)]
        variants = [v for v in variants if v["mla_impl"] not in skip]  # --skip absorb / naive: the defaults' rows
        if not cpu and "nocompile" not in skip:
            variants.append(dict(mla_impl="absorb", compile=False, batches=b1_32))
        if cpu and "compile" not in skip:  # inductor's C++ code; a step with few rows compiles as one graph
            variants += [dict(mla_impl=m, compile=True, batches=batches, need_s=60) for m in ("naive", "absorb")]
        bench_ours(model, prompts, args.new, args.reps, variants, out, left)
        bench_shapes_ours(model, long, args.new, args.reps, out, left)
        if not cpu and "nokernel" not in skip:  # the Triton decode attention's before/after, same weights
            twin = DeepSeekV3(get_preset(args.preset, attn_backend="eager")).to(device, args.dtype).eval()
            twin.load_state_dict(model.state_dict())
            bench_ours(twin, prompts, args.new, args.reps, [dict(mla_impl="absorb", batches=b1_32, need_s=60,
                                                                 suffix="_nokernel")], out, left)
            del twin
        write_json(path, out)
    if "plain" not in skip:
        bench_plain(model, prompts, args.new, [b for b in (1, 32) if b in batches] or batches[:1], out, left)
        write_json(path, out)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        free(model)
        hf = load_hf(Path(d), args.dtype, device)
        if "hf_eager" not in skip:
            bench_hf(hf, prompts, args.new, batches, False, out, left, need_s=30, reps=args.reps if cpu else 1)
            write_json(path, out)
        if cpu and "hf_static" not in skip:  # its static cache, compiled by generate itself (asked for on the CPU)
            bench_hf(hf, prompts, args.new, batches, True, out, left, need_s=60, reps=args.reps)
            write_json(path, out)
        if not cpu and "hf_static" not in skip:
            first = [b for b in (1, 32) if b in batches]
            bench_hf(hf, prompts, args.new, first + [b for b in batches if b not in first], True, out, left,
                     need_s=args.train_seconds + args.mtp_eval_s + 60 if "mtp" not in skip else 60)
            bench_shapes_hf(hf, long, args.new, out, left, need_s=60)
            write_json(path, out)
        del hf
    free()
    if not cpu and "mtp" not in skip and left() < 90 + args.mtp_eval_s:
        out["mtp"] = dict(skipped=f"time: {left():.0f}s left")
    elif not cpu and "mtp" not in skip:
        from decode_mtp import bench_mtp
        del model
        free()
        try:
            bench_mtp(args, device, out, left)
        except Exception as e:
            traceback.print_exc()
            out["mtp"] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
    mbu_table(cfg, out, args.prompt + args.new / 2, out["copy_bandwidth"], args.dtype.itemsize)
    summary(out)
    out["wall_s"] = time.time() - t0
    write_json(path, out)
    plot(out, args.out / "decode.png")
    print({k: v for k, v in out.items() if not isinstance(v, dict)})


if __name__ == "__main__":
    main()
