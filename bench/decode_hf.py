"""transformers' `generate` on our weights, for bench/decode.py: eager (dynamic cache) and its static cache."""
from __future__ import annotations

import gc
import traceback
from pathlib import Path

import torch
from decode_timing import measure, peak_gib, record, timed


def load_hf(path: Path, dtype, device):
    "transformers' DeepseekV3ForCausalLM from our saved checkpoint (sdpa attention)."
    from transformers import DeepseekV3ForCausalLM
    hf = DeepseekV3ForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa").to(device).eval()
    hf.generation_config.pad_token_id = 0
    return hf


def hf_run(hf, ids, static: bool):
    "`run(n)`: transformers' greedy generate of exactly `n` new tokens after `ids`; `static`: its static cache."
    kw = dict(cache_implementation="static") if static else {}
    if static and hf.device.type == "cpu":  # generate compiles its forward on accelerators only, unless told
        from transformers import CompileConfig
        cc = CompileConfig()
        cc._compile_all_devices = True  # a class-level switch in transformers 5, not an __init__ argument
        kw["compile_config"] = cc
    return lambda n: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, **kw)


def measure_full_call(run, batch: int, new: int, reps: int) -> dict:
    "tok/s of whole `run(new)` calls (best of `reps` after a warm-up that compiles), no ttft, and peak memory."
    run(new)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    wall = min(timed(lambda: run(new)) for _ in range(reps))
    return dict(tok_s=batch * new / wall, wall_s=wall, ttft_s=None, peak_mem_gib=peak_gib())


def bench_hf(hf, prompts: dict, new: int, batches: list[int], static: bool, out: dict, left, need_s: float,
             reps: int = 1) -> None:
    "transformers' generate, greedy, exactly `new` tokens; `static`: its static cache (and its own compile)."
    name = "hf_static" if static else "hf_eager"
    for b in batches:
        if left() < need_s:
            out.setdefault(name, {})[str(b)] = dict(skipped="time")
            continue
        run = hf_run(hf, prompts[b], static)
        try:
            with torch.no_grad():
                if static:  # its ttft would compile a second cache size: time the full call only
                    r = measure_full_call(run, b, new, reps)
                else:
                    r = measure(run, b, new, reps=reps)
        except Exception as e:
            traceback.print_exc()
            r = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
        record(out, name, b, r)
        gc.collect()
