"""Decode speed of `dsv3_min.infer.generate` against transformers' `generate`, same weights (issue 15).

    python bench/decode.py --out results/            # one H200: gpu-small, bf16; writes decode.json + decode.png
    python bench/decode.py --cpu --out results/      # CPU: cpu-tiny, fp32, 1 thread recommended (OMP_NUM_THREADS=1)

What runs (greedy, prompt 128 random tokens, 256 new tokens, batch 1, 8, 32, 128; random weights, seed 0):
  ours        dsv3_min.infer.generate: static caches, the decode step in a CUDA graph, MLA 'naive' and 'absorb',
              with and without torch.compile of the step (b1 and b32 only, if time allows)
  dsv3_plain  the 'before': dsv3_min.model.reference_generate (notebook 11: dynamic cache, eager), b1 and b32
  hf_eager    transformers DeepseekV3ForCausalLM.generate, sdpa, dynamic cache
  hf_static   the same with cache_implementation="static" (transformers compiles the forward itself); an error is
              recorded, not raised. The weights travel ours -> dsv3_min.hf.save_pretrained -> from_pretrained.
  mtp         gpu-small trained here for --train-seconds on the python-stdlib corpus (MTP on), then greedy decoding of
              held-out validation windows with and without draft="mtp": acceptance, by position and token kind,
              tokens per forward and the speed-up at batch 1.
On the CPU (cpu-tiny, fp32, prompt 64, 128 new tokens, batch 1 and 8): ours eager and compiled (inductor's C++
code; no graph), transformers eager and with its static cache compiled (asked for with
a CompileConfig whose _compile_all_devices is set, since generate compiles on accelerators only by default).
tok/s = batch * new tokens / wall time of the whole generate call (prefill included); ttft_s = a generate call with
max_new_tokens=1; peak_mem_gib = torch.cuda.max_memory_allocated (weights included).

Memory-bandwidth limit. A decode step at batch B reads every active weight once and every sequence's cache:
  bytes(B) = w * [attention + dense FFN + shared experts + norms + LM head + n_moe * E_touched(B) * expert]
             + 4 * router + B * L * T * c * w
  E_touched(B) = E * (1 - (1 - k/E)^B)   experts hit by B tokens routed uniformly (k of E per token)
  c = kv_lora_rank + qk_rope_head_dim (absorb: the latent cache) or h * (qk_head_dim + v_head_dim) (naive),
  T = prompt + new/2 (mean context), w = 2 bytes (bf16); the router stays fp32.
limit_tok_s = B * bandwidth / bytes(B); fraction = measured decode tok/s / limit_tok_s, against the H200 datasheet
(4.8 TB/s) and the copy bandwidth measured in this run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import torch

from dsv3_min.checkpoint import load_trained
from dsv3_min.config import count_params, get_preset
from dsv3_min.data import load_corpus, pack
from dsv3_min.hf import save_pretrained
from dsv3_min.infer import generate
from dsv3_min.model import DeepSeekV3, reference_generate
from dsv3_min.tokenizer import train_tokenizer
from dsv3_min.train import TrainData, train, train_config_for

DATASHEET_BW = 4.8e12  # H200 HBM3e, bytes/s


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    "Wall seconds of `fn()` with the device synchronized around it."
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def copy_bandwidth(gib: float = 2.0) -> float:
    "Measured device copy bandwidth, bytes/s (read + write of a `gib` GiB buffer, best of 10)."
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    y.copy_(x)
    return 2 * x.numel() / min(timed(lambda: y.copy_(x)) for _ in range(10))


def step_bytes(cfg, batch: int, context: float, impl: str, w: int = 2) -> float:
    "Bytes a decode step must read at this batch (the formula in the module docstring)."
    b = count_params(cfg).breakdown
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    n_moe = max(0, cfg.num_hidden_layers - cfg.first_k_dense_replace)
    expert = 3 * cfg.hidden_size * cfg.moe_intermediate_size
    touched = E * (1 - (1 - k / E) ** batch)
    head = b["head"] if b["head"] else b["embedding"]
    weights = w * (b["attention"] + b["dense FFN"] + b["shared experts"] + b["norms"] + head
                   + n_moe * touched * expert) + 4 * b["router"]
    if cfg.attention != "mla":
        per_tok = 2 * cfg.kv_heads * cfg.head_dim
    elif impl == "absorb":
        per_tok = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    else:
        per_tok = cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim)
    return weights + batch * cfg.num_hidden_layers * context * per_tok * w


def measure(run, batch: int, new: int, reps: int) -> dict:
    "tok/s (best of `reps` after one warm-up), ttft and peak memory of `run(max_new_tokens)`."
    run(new)  # warm-up: CUDA graphs captured, kernels compiled
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wall = min(timed(lambda: run(new)) for _ in range(reps))
    peak = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    # ttft last: a 1-token call builds a second engine (another cache length), and a second compiled engine of the
    # same step makes dynamo check two guard sets per call, which slowed the timed engine on the CPU
    ttft = min(timed(lambda: run(1)) for _ in range(2))
    return dict(tok_s=batch * new / wall, decode_tok_s=batch * (new - 1) / max(wall - ttft, 1e-9), wall_s=wall,
                ttft_s=ttft, peak_mem_gib=peak)


def free(model=None):
    "Drop cached decoders (and their graphs) and collect, so that the next peak-memory reading starts clean."
    if model is not None:
        model.__dict__.pop("_decoders", None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def bench_ours(model, prompts: dict, new: int, reps: int, variants: list[dict], out: dict, left) -> None:
    "Our generate for each variant (mla_impl, compile) and batch size."
    for v in variants:
        name = "ours_" + v["mla_impl"] + ("_compiled" if v.get("compile") else "")
        for b in v["batches"]:
            if left() < v.get("need_s", 5):
                out.setdefault(name, {})[str(b)] = dict(skipped="time")
                continue
            free(model)
            try:
                run = lambda n, b=b, v=v: generate(model, prompts[b], n, temperature=0, mla_impl=v["mla_impl"],
                                                   compile=v.get("compile", False))
                r = measure(run, b, new, reps)
            except Exception as e:
                traceback.print_exc()
                r = dict(error=f"{type(e).__name__}: {e}")
            out.setdefault(name, {})[str(b)] = r
            print(name, b, r, flush=True)
        free(model)


def bench_plain(model, prompts: dict, new: int, batches: list[int], out: dict, left) -> None:
    "The 'before': notebook 11's `dsv3_min.model.reference_generate` (dynamic cache, eager, one host sync per token)."
    for b in batches:
        if left() < 30:
            out.setdefault("dsv3_plain", {})[str(b)] = dict(skipped="time")
            continue
        r = measure(lambda n, b=b: reference_generate(model, prompts[b], n, temperature=0), b, new, reps=1)
        out.setdefault("dsv3_plain", {})[str(b)] = r
        print("dsv3_plain", b, r, flush=True)


def load_hf(path: Path, dtype, device):
    "transformers' DeepseekV3ForCausalLM from our saved checkpoint (sdpa attention)."
    from transformers import DeepseekV3ForCausalLM
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    hf.generation_config.pad_token_id = 0
    return hf


def bench_hf(hf, prompts: dict, new: int, batches: list[int], static: bool, out: dict, left, need_s: float,
             reps: int = 1) -> None:
    "transformers' generate, greedy, exactly `new` tokens; `static`: its static cache (and its own compile)."
    name = "hf_static" if static else "hf_eager"
    kw = dict(cache_implementation="static") if static else {}
    if static and hf.device.type == "cpu":  # generate compiles its forward on accelerators only, unless told
        from transformers import CompileConfig
        cc = CompileConfig()
        cc._compile_all_devices = True  # a class-level switch in transformers 5, not an __init__ argument
        kw["compile_config"] = cc
    for b in batches:
        if left() < need_s:
            out.setdefault(name, {})[str(b)] = dict(skipped="time")
            continue
        ids = prompts[b]
        run = lambda n, ids=ids: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                                             min_new_tokens=n, do_sample=False, **kw)
        try:
            with torch.no_grad():
                if static:  # its ttft would compile a second cache size: time the full call only
                    run(new)
                    if torch.cuda.is_available():
                        torch.cuda.reset_peak_memory_stats()
                    wall = min(timed(lambda run=run: run(new)) for _ in range(reps))
                    r = dict(tok_s=b * new / wall, wall_s=wall, ttft_s=None,
                             peak_mem_gib=torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None)
                else:
                    r = measure(run, b, new, reps=reps)
        except Exception as e:
            traceback.print_exc()
            r = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
        out.setdefault(name, {})[str(b)] = r
        print(name, b, r, flush=True)
        gc.collect()


def token_kind(text: str) -> str:
    "A coarse class of a token's text: whitespace, word (letters, digits, _), or punctuation/symbols."
    if not text.strip():
        return "whitespace"
    core = text.strip()
    return "word" if core.replace("_", "a").isalnum() else ("punctuation" if not any(c.isalnum() for c in core)
                                                            else "mixed")


def mtp_data(corpus: str, vocab: int, max_chunks: int, cache: str | None) -> TrainData:
    "Corpus, a tokenizer trained on `max_chunks` evenly spaced 4 KB chunks of its train split (quick), packed splits."
    c = load_corpus(corpus)
    tok = train_tokenizer(c, vocab, max_chunks=max_chunks)
    packed = pack(c, tok, cache_dir=cache)
    return TrainData(tok, packed.train, packed.val, 1 / packed.bytes_per_token("val"))


def bench_mtp(args, device, out: dict, left) -> None:
    "Train gpu-small with MTP for `--train-seconds`, then self-speculative vs plain greedy decoding on held-out text."
    t0 = time.time()
    data = mtp_data(args.corpus, args.train_vocab, args.tokenizer_chunks, args.cache)
    data_s = time.time() - t0
    print(f"data ready in {data_s:.0f}s: {len(data.train):,} train tokens", flush=True)
    cfg = get_preset(args.preset, vocab_size=args.train_vocab)
    budget = min(args.train_seconds, max(30.0, left() - args.mtp_eval_s - (time.time() - t0)))
    tc = train_config_for(args.preset, corpus=args.corpus, time_budget=budget, compile=device.type == "cuda",
                          eval_every=10**6, ckpt_every=0, eval_batches=8, final_eval_batches=8)
    run_dir = Path(tempfile.mkdtemp(prefix="mtp_run_"))
    r = train(cfg, tc, run_dir, data=data, progress=False)
    model, tok = load_trained(run_dir, device)
    model = model.to(args.dtype).eval()
    out["mtp_train"] = dict(corpus=args.corpus, vocab=args.train_vocab, tokenizer_chunks=args.tokenizer_chunks,
                            data_s=data_s, budget_s=budget, steps=r.step,
                            train_s=r.seconds, val_loss=r.val_loss, val_bpb=r.val_bpb, wall_s=time.time() - t0)
    print(out["mtp_train"], flush=True)
    val = torch.as_tensor(data.val[: len(data.val)].astype("int64"))
    n = args.mtp_prompts
    starts = torch.linspace(0, len(val) - args.prompt - 1, n).long()
    prompts = [val[s: s + args.prompt] for s in starts.tolist()]
    # warm-up of both paths (graph capture), then timing
    generate(model, prompts[0].to(device), args.new, temperature=0)
    generate(model, prompts[0].to(device), args.new, temperature=0, draft="mtp")
    plain_s, spec_s, same, rows = 0.0, 0.0, 0, []
    for p in prompts:
        p = p.to(device)
        plain_s += timed(lambda p=p: generate(model, p, args.new, temperature=0))
        ref = generate(model, p, args.new, temperature=0)
        st = {}
        spec_s += timed(lambda p=p: generate(model, p, args.new, temperature=0, draft="mtp"))
        got = generate(model, p, args.new, temperature=0, draft="mtp", stats=st)
        same += int(torch.equal(got.cpu(), ref.cpu()))
        for ok, idx in zip(st["accept"][:, 0].tolist(), st["draft_index"].tolist()):
            if idx < got.shape[-1]:
                target = int(got[idx])
                rows.append((idx - args.prompt, ok, token_kind(tok.decode([target]))))
    acc = sum(ok for _, ok, _ in rows) / max(len(rows), 1)
    by_pos, by_kind = {}, {}
    for pos, ok, kind in rows:
        by_pos.setdefault(f"{(pos // 32) * 32}-{(pos // 32) * 32 + 31}", []).append(ok)
        by_kind.setdefault(kind, []).append(ok)
    mean = lambda d: {k: dict(acceptance=sum(v) / len(v), n=len(v)) for k, v in sorted(d.items(), key=lambda kv:
                      int(kv[0].split("-")[0]) if kv[0][0].isdigit() else kv[0])}
    out["mtp"] = dict(acceptance=acc, tokens_per_forward=1 + acc, plain_tok_s=n * args.new / plain_s,
                      spec_tok_s=n * args.new / spec_s, speedup_b1=plain_s / spec_s, prompts=n,
                      identical_to_plain_greedy=f"{same}/{n}", by_position=mean(by_pos), by_kind=mean(by_kind),
                      reference="DeepSeek-V3 report: 85-90% acceptance of the second token, 1.8x tokens/s")
    print(out["mtp"], flush=True)


def bandwidth_table(cfg, out: dict, args, bandwidths: dict) -> None:
    "Bytes per step and the fraction of the bandwidth limit for every measured ours_* entry."
    context = args.prompt + args.new / 2
    for name, per_batch in out.items():
        if not name.startswith("ours_"):
            continue
        impl = "absorb" if "absorb" in name else "naive"
        for b, r in per_batch.items():
            if "decode_tok_s" not in r:
                continue
            nbytes = step_bytes(cfg, int(b), context, impl)
            r["bytes_per_step"] = nbytes
            for label, bw in bandwidths.items():
                r[f"fraction_of_{label}"] = r["decode_tok_s"] / (int(b) * bw / nbytes)


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
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def write_json(out: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(out, indent=1, default=float))
    os.replace(tmp, path)


def summary(out: dict) -> None:
    "The top-level numbers the README quotes."
    best = lambda prefix, b: max([r[str(b)]["tok_s"] for k, r in out.items() if k.startswith(prefix)
                                  and isinstance(r, dict) and "tok_s" in r.get(str(b), {})], default=None)
    out["ours_b1_tok_s"], out["ours_b32_tok_s"] = best("ours_", 1), best("ours_", 32)
    out["hf_best_b1_tok_s"], out["hf_best_b32_tok_s"] = best("hf_", 1), best("hf_", 32)
    out["mtp_acceptance"] = out.get("mtp", {}).get("acceptance")
    out["mtp_speedup_b1"] = out.get("mtp", {}).get("speedup_b1")
    if out["ours_b1_tok_s"] and out["hf_best_b1_tok_s"]:
        out["ours_over_hf_best_b1"] = out["ours_b1_tok_s"] / out["hf_best_b1_tok_s"]
    eager = out.get("hf_eager", {}).get("1", {}).get("tok_s")
    if out["ours_b1_tok_s"] and eager:
        out["ours_over_hf_eager_b1"] = out["ours_b1_tok_s"] / eager
    if out["ours_b32_tok_s"] and out["hf_best_b32_tok_s"]:
        out["ours_over_hf_best_b32"] = out["ours_b32_tok_s"] / out["hf_best_b32_tok_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="directory for decode.json and decode.png")
    ap.add_argument("--cpu", action="store_true", help="cpu-tiny in fp32 on the CPU: ours vs transformers eager")
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
    ap.add_argument("--skip", default="", help="comma-separated sections to skip: ours,plain,hf_eager,hf_static,mtp,compile")
    args = ap.parse_args()
    t0 = time.time()
    left = lambda: args.deadline - (time.time() - t0)
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
    if not cpu:
        out["bandwidth"] = dict(datasheet=DATASHEET_BW, measured_copy=copy_bandwidth())
    path = args.out / "decode.json"
    if args.merge:  # keep the earlier call's sections (e.g. call 1: --skip mtp; call 2: --skip ours,hf_eager,...)
        out.update({k: v for k, v in json.loads(args.merge.read_text()).items() if isinstance(v, dict)})
    if "ours" not in skip:
        variants = [dict(mla_impl="absorb", batches=batches), dict(mla_impl="naive", batches=batches)]
        if not cpu and "compile" not in skip:
            variants.append(dict(mla_impl="absorb", compile=True, batches=[b for b in (1, 32) if b in batches],
                                 need_s=60))
        if cpu and "compile" not in skip:  # inductor's C++ code; a step with few rows compiles as one graph
            variants += [dict(mla_impl=m, compile=True, batches=batches, need_s=60) for m in ("naive", "absorb")]
        bench_ours(model, prompts, args.new, args.reps, variants, out, left)
        write_json(out, path)
    if "plain" not in skip:
        bench_plain(model, prompts, args.new, [b for b in (1, 32) if b in batches] or batches[:1], out, left)
        write_json(out, path)
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(model, d)
        free(model)
        hf = load_hf(Path(d), args.dtype, device)
        if "hf_eager" not in skip:
            bench_hf(hf, prompts, args.new, batches, False, out, left, need_s=30, reps=args.reps if cpu else 1)
            write_json(out, path)
        if cpu and "hf_static" not in skip:  # its static cache, compiled by generate itself (asked for on the CPU)
            bench_hf(hf, prompts, args.new, batches, True, out, left, need_s=60, reps=args.reps)
            write_json(out, path)
        if not cpu and "hf_static" not in skip:
            first = [b for b in (1, 32) if b in batches]
            bench_hf(hf, prompts, args.new, first + [b for b in batches if b not in first], True, out, left,
                     need_s=args.train_seconds + args.mtp_eval_s + 60 if "mtp" not in skip else 60)
            write_json(out, path)
        del hf
    free()
    if not cpu and "mtp" not in skip and left() < 90 + args.mtp_eval_s:
        out["mtp"] = dict(skipped=f"time: {left():.0f}s left")
    elif not cpu and "mtp" not in skip:
        del model
        free()
        try:
            bench_mtp(args, device, out, left)
        except Exception as e:
            traceback.print_exc()
            out["mtp"] = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
    if "bandwidth" in out:
        bandwidth_table(cfg, out, args, {"datasheet": out["bandwidth"]["datasheet"],
                                         "measured": out["bandwidth"]["measured_copy"]})
    summary(out)
    out["wall_s"] = time.time() - t0
    write_json(out, path)
    plot(out, args.out / "decode.png")
    print(json.dumps({k: v for k, v in out.items() if not isinstance(v, dict)}, indent=1, default=str))


if __name__ == "__main__":
    main()
