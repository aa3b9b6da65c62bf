"""The `mtp` section of bench/decode.py (GPU): MTP self-speculation on a model trained in the same call.

gpu-small is trained for `--train-seconds` on `--corpus` (MTP on, `dsv3_min.train.train`, the loop the command line
runs), then greedy decoding of `--mtp-prompts` held-out validation windows runs with and without draft="mtp":
acceptance, by generated position and by token kind, tokens per forward and the speed-up at batch 1; then with
draft_depth=2 (the MTP module chained to draft two tokens, greedy): `mtp.depth2`, acceptance per draft, tokens per
forward, speed-up at batch 1 and whether the tokens are the plain greedy ones; then `mtp.sampled`: temperature
0.7, depth 1 and 2 against plain sampling (acceptance per draft, speed-up at batch 1).
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
from decode_timing import timed

from dsv3_min.checkpoint import load_trained
from dsv3_min.config import get_preset
from dsv3_min.data import load_corpus, pack
from dsv3_min.infer import generate
from dsv3_min.tokenizer import train_tokenizer
from dsv3_min.train import TrainData, train, train_config_for


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


def train_mtp_model(args, device, out: dict, left):
    "gpu-small with MTP trained for `--train-seconds` (less if the deadline says so); (model, tok, data)."
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
    out["mtp_train"] = dict(corpus=args.corpus, vocab=args.train_vocab, tokenizer_chunks=args.tokenizer_chunks,
                            data_s=data_s, budget_s=budget, steps=r.step,
                            train_s=r.seconds, val_loss=r.val_loss, val_bpb=r.val_bpb, wall_s=time.time() - t0)
    print(out["mtp_train"], flush=True)
    return model.to(args.dtype).eval(), tok, data


def by_bucket(d: dict) -> dict:
    "Mean acceptance and count per key, position buckets in numeric order."
    order = lambda kv: int(kv[0].split("-")[0]) if kv[0][0].isdigit() else kv[0]
    return {k: dict(acceptance=sum(v) / len(v), n=len(v)) for k, v in sorted(d.items(), key=order)}


def bench_sampled(model, prompts: list, new: int, temperature: float = 0.7) -> dict:
    "Speculative sampling (seeded) with draft depth 1 and 2 against plain sampling: acceptance, speed-up at b1."
    run = lambda p, **kw: generate(model, p, new, temperature=temperature, seed=0, **kw)
    for kw in ({}, dict(draft="mtp"), dict(draft="mtp", draft_depth=2)):
        run(prompts[0], **kw)  # warm-up
    plain = sum(timed(lambda p=p: run(p)) for p in prompts)
    res = dict(temperature=temperature, plain_tok_s=len(prompts) * new / plain)
    for depth in (1, 2):
        spec, acc = 0.0, 0.0
        for p in prompts:
            st = {}
            spec += timed(lambda p=p, st=st, d=depth: run(p, draft="mtp", draft_depth=d, stats=st))
            acc += st["acceptance"] / len(prompts)
        res[f"depth{depth}"] = dict(acceptance=acc, spec_tok_s=len(prompts) * new / spec, speedup_b1=plain / spec)
    return res


def bench_mtp(args, device, out: dict, left) -> None:
    "Train gpu-small with MTP, then self-speculative vs plain greedy decoding on held-out text."
    model, tok, data = train_mtp_model(args, device, out, left)
    val = torch.as_tensor(data.val[: len(data.val)].astype("int64"))
    n = args.mtp_prompts
    starts = torch.linspace(0, len(val) - args.prompt - 1, n).long()
    prompts = [val[s: s + args.prompt] for s in starts.tolist()]
    # warm-up of both paths (graph capture), then timing
    generate(model, prompts[0].to(device), args.new, temperature=0)
    generate(model, prompts[0].to(device), args.new, temperature=0, draft="mtp")
    generate(model, prompts[0].to(device), args.new, temperature=0, draft="mtp", draft_depth=2)
    plain_s, spec_s, same, rows = 0.0, 0.0, 0, []
    deep = dict(s=0.0, same=0, accepted=0.0, tokens_per_forward=0.0)  # draft_depth=2: the MTP module chained
    for p in prompts:
        p = p.to(device)
        plain_s += timed(lambda p=p: generate(model, p, args.new, temperature=0))
        ref = generate(model, p, args.new, temperature=0)
        st = {}
        spec_s += timed(lambda p=p: generate(model, p, args.new, temperature=0, draft="mtp"))
        got = generate(model, p, args.new, temperature=0, draft="mtp", stats=st)
        same += int(torch.equal(got.cpu(), ref.cpu()))
        st2 = {}
        deep["s"] += timed(lambda p=p: generate(model, p, args.new, temperature=0, draft="mtp", draft_depth=2))
        got2 = generate(model, p, args.new, temperature=0, draft="mtp", draft_depth=2, stats=st2)
        deep["same"] += int(torch.equal(got2.cpu(), ref.cpu()))
        deep["accepted"] += st2["acceptance"] / n
        deep["tokens_per_forward"] += st2["tokens_per_forward"] / n
        for ok, idx in zip(st["accept"][:, 0].tolist(), st["draft_index"].tolist()):
            if idx < got.shape[-1]:
                rows.append((idx - args.prompt, ok, token_kind(tok.decode([int(got[idx])]))))
    acc = sum(ok for _, ok, _ in rows) / max(len(rows), 1)
    by_pos, by_kind = {}, {}
    for pos, ok, kind in rows:
        by_pos.setdefault(f"{(pos // 32) * 32}-{(pos // 32) * 32 + 31}", []).append(ok)
        by_kind.setdefault(kind, []).append(ok)
    out["mtp"] = dict(acceptance=acc, tokens_per_forward=1 + acc, plain_tok_s=n * args.new / plain_s,
                      spec_tok_s=n * args.new / spec_s, speedup_b1=plain_s / spec_s, prompts=n,
                      identical_to_plain_greedy=f"{same}/{n}", by_position=by_bucket(by_pos), by_kind=by_bucket(by_kind),
                      depth2=dict(acceptance=deep["accepted"], tokens_per_forward=deep["tokens_per_forward"],
                                  spec_tok_s=n * args.new / deep["s"], speedup_b1=plain_s / deep["s"],
                                  identical_to_plain_greedy=f"{deep['same']}/{n}"),
                      reference="DeepSeek-V3 report: 85-90% acceptance of the second token, 1.8x tokens/s")
    if left() > 60:  # the same at temperature 0.7 (the speculative iteration runs eagerly when sampling)
        out["mtp"]["sampled"] = bench_sampled(model, [p.to(device) for p in prompts], args.new)
    print(out["mtp"], flush=True)
