"""The held-out shapes of issue 28, for bench/decode.py (GPU): a 2,000-token prompt at batch 1 and a 900-token
prompt at batch 4, our `generate` with its default settings against transformers' static cache (compiled by its
generate), same weights, greedy, `new` tokens. Entries `shapes_ours` / `shapes_hf_static` keyed "PROMPTxBATCH", and
`shapes_ours_over_hf_static` (tok/s ratio per shape)."""
from __future__ import annotations

import traceback

import torch
from decode_hf import hf_run, measure_full_call
from decode_timing import free, measure_ours, record

from dsv3_min.infer import generate

SHAPES = ((2000, 1), (900, 4))  # (prompt tokens, batch)


def shape_prompts(vocab: int, device, seed: int = 1) -> dict:
    "Random prompts per shape label, e.g. {'2000x1': LongTensor (1, 2000)}."
    g = torch.Generator().manual_seed(seed)
    return {f"{S}x{B}": torch.randint(0, vocab, (B, S), generator=g).to(device) for S, B in SHAPES}


def _guarded(out: dict, name: str, label: str, left, need_s: float, fn) -> None:
    "Run `fn()` -> result dict into out[name][label], or record why not (time, an error)."
    if left() < need_s:
        out.setdefault(name, {})[label] = dict(skipped="time")
        return
    try:
        r = fn()
    except Exception as e:
        traceback.print_exc()
        r = dict(error=f"{type(e).__name__}: {str(e)[:500]}")
    record(out, name, label, r)


def bench_shapes_ours(model, prompts: dict, new: int, reps: int, out: dict, left) -> None:
    "Our generate (defaults) on each held-out shape."
    for label, p in prompts.items():
        free(model)
        run = lambda n, st, p=p: generate(model, p, n, temperature=0, stats=st)
        _guarded(out, "shapes_ours", label, left, 60, lambda run=run, p=p: measure_ours(run, p.shape[0], new, reps))
    free(model)


def bench_shapes_hf(hf, prompts: dict, new: int, out: dict, left, need_s: float) -> None:
    "transformers' static cache on each held-out shape, then the ratios."
    for label, p in prompts.items():
        _guarded(out, "shapes_hf_static", label, left, need_s,
                 lambda p=p: measure_full_call(hf_run(hf, p, True), p.shape[0], new, 1))
    ours, theirs = out.get("shapes_ours", {}), out.get("shapes_hf_static", {})
    out["shapes_ours_over_hf_static"] = {k: ours[k]["tok_s"] / theirs[k]["tok_s"] for k in ours
                                         if "tok_s" in ours[k] and "tok_s" in theirs.get(k, {})}
