"""Distillation at gpu-small scale (issue 20, notebook 31): a MoE teacher trained in the same call, three dense
students on the same batches, seed noise, equal wall-clock, decode speed. One H200, one call of ~9 minutes:

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; mkdir -p $OUT/distill
    timeout -k 5 590 python3 bench/distill_gpu.py --out $OUT/distill --deadline 570 > $OUT/distill/log.txt 2>&1
    tail -40 $OUT/distill/log.txt

CPU smoke test (a TINY teacher on Shakespeare, a minute or two): `python bench/distill_gpu.py --quick --out /tmp/d`.

Order (each stage appends to `--out/distill.json`, so a cut-off call still leaves what it measured):
  data      python-stdlib (the interpreter's standard library, on the GPU machine), a quick 8,192-id tokenizer
            (3,000 chunks of 4 KB), packed; val bits/byte counts the UTF-8 bytes of the val split
  teacher   gpu-small (MoE + MLA + MTP) with the 8,192-id vocabulary, torch.compile, bf16 autocast,
            `--teacher-seconds` of training (its cold compile counts), saved and read back with `from_pretrained`
  students  dense GQA+SwiGLU `student_config(teacher)` (4 layers x 512), eager, bf16 autocast, `--student-steps`
            steps of 16 x 1024 tokens, the same batches (seed 0) and the same initial weights:
              scratch     plain CE
              online      KD (T=1, alpha=1) against the teacher run in the same step (full vocabulary, no_grad, bf16)
              offline     KD against top-K=64 log-probs from a cache written before (its writing time is reported)
              scratch_s1  plain CE with seed 1 (other init, other batch order): seed noise = |scratch - scratch_s1|
              equal_time  plain CE for as many seconds as the online student took (teacher forwards included)
  decode    greedy 256 tokens after a 32-token prompt at batch 1, bf16 weights, `dsv3_min.infer.generate` (static
            caches, CUDA graph); tok/s and peak memory

Top-level keys of distill.json: scratch_bpb, distilled_bpb (online, full KL), distilled_topk_bpb, teacher_bpb,
seed_noise_bpb, gap_closed_pct, student_params, teacher_params, decode_speedup_b1, equal_time_scratch_bpb, targets.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from dataclasses import asdict
from pathlib import Path

import torch
from distill_report import decode_speed, plot  # noqa: E402 (bench/, next to this script)

from dsv3_min.config import count_params, get_preset
from dsv3_min.data import load_corpus, pack
from dsv3_min.distill import DistillConfig, distill, student_config, write_teacher_cache
from dsv3_min.files import write_json
from dsv3_min.hf import from_pretrained
from dsv3_min.tokenizer import train_tokenizer
from dsv3_min.train import TrainConfig, TrainData, read_metrics, train

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def left() -> float:
    return ARGS.deadline - (time.time() - T0)


def prepare(corpus: str, vocab: int, chunks: int, cache: Path) -> TrainData:
    "The corpus, a quick tokenizer, packed splits."
    c = load_corpus(corpus)
    tok = train_tokenizer(c, vocab, max_chunks=chunks)
    packed = pack(c, tok, cache_dir=cache)
    log(f"data {corpus}: {len(packed.train):,} train / {len(packed.val):,} val tokens, vocab {tok.vocab_size}")
    return TrainData(tok, packed.train, packed.val, 1 / packed.bytes_per_token("val"))


def curve(run_dir: Path) -> list[list[float]]:
    "[step, elapsed_s, val bits/byte] of every evaluation of a run."
    return [[r["step"], round(r["elapsed_s"], 2), r["val_bits_per_byte"]] for r in read_metrics(run_dir)
            if "val_bits_per_byte" in r]


def summary(r) -> dict:
    return dict(val_bpb=r.val_bpb, val_loss=r.val_loss, steps=r.step, seconds=round(r.seconds, 2),
                stopped=r.stopped, curve=curve(r.run_dir))


def main(a) -> None:
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("teacher", "scratch", "online", "cache", "offline", "scratch_s1", "equal_time"):
        shutil.rmtree(work / sub, ignore_errors=True)  # a fresh run each call (the data cache is kept)
    dev = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    res: dict = dict(command=vars(a), device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                     torch=torch.__version__, students={})
    save = lambda: write_json(out / "distill.json", res)  # noqa: E731
    if a.quick:
        corpus, vocab, chunks, B, S = "shakespeare", 512, 200, 2, 32
        tcfg = get_preset("test-tiny", vocab_size=vocab, max_position_embeddings=256)
        t_tc = TrainConfig(max_steps=a.teacher_steps or 20, batch_size=B, seq_len=S, lr=3e-3, warmup=5,
                           eval_every=1000, final_eval_batches=4, device=dev, threads=1)
    else:
        corpus, vocab, chunks, B, S = "python-stdlib", 8192, 3000, 16, 1024
        if a.mix:  # the GPU notebook's packed mix (gpu_runs.py prepare): its tokenizer fixes the vocabulary
            vocab = json.loads((Path(a.mix) / "meta.json").read_text())["vocab_size"]
        tcfg = get_preset("gpu-small", vocab_size=vocab)
        t_tc = TrainConfig(max_steps=100_000, batch_size=B, seq_len=S, lr=1.5e-3, warmup=100, eval_every=100_000,
                           final_eval_batches=a.eval_batches, time_budget=a.teacher_seconds, compile=True,
                           device=dev, keep_last=1)
    if a.mix and not a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_runs import load_data  # bench-only loader of the carried mix

        data, meta = load_data(Path(a.mix))
        corpus = meta["corpus"]
        log(f"data {corpus}: {len(data.train):,} train / {len(data.val):,} val tokens, vocab {vocab}")
    else:
        data = prepare(corpus, vocab, chunks, work / "data_cache")
    res["data"] = dict(corpus=corpus, vocab=vocab, train_tokens=len(data.train), val_tokens=len(data.val))

    # the teacher, trained here and read back from its checkpoint
    r = train(tcfg, t_tc, work / "teacher", data=data, progress=False, log=log)
    teacher = from_pretrained(work / "teacher", device=dev)
    res.update(teacher_bpb=r.val_bpb, teacher=dict(summary(r), config=tcfg.to_dict()))
    scfg = student_config(tcfg)
    res.update(teacher_params=count_params(tcfg).total, teacher_active_params=count_params(tcfg).active,
               student_params=count_params(scfg).total, student_config=scfg.to_dict())
    log(f"teacher {res['teacher_params'] / 1e6:.1f}M: {r.step} steps in {r.seconds:.0f}s, val {r.val_bpb:.4f} bpb; "
        f"student {res['student_params'] / 1e6:.1f}M")
    save()

    steps = a.student_steps or (8 if a.quick else 600)
    s_tc = TrainConfig(max_steps=steps, batch_size=B, seq_len=S, lr=3e-3, warmup=max(1, steps // 16),
                       eval_every=max(1, steps // 8), eval_batches=2 if a.quick else 8,
                       final_eval_batches=4 if a.quick else a.eval_batches, device=dev, keep_last=1,
                       threads=1 if a.quick else 0)
    dc = DistillConfig(kd_temperature=a.kd_temperature, kd_alpha=a.kd_alpha)
    dk = DistillConfig(kd_temperature=a.kd_temperature, kd_alpha=a.kd_alpha, kd_topk=a.topk)
    res["distill_config"], res["student_train_config"] = dict(full=asdict(dc), topk=asdict(dk)), asdict(s_tc)
    quiet = lambda *x: None  # noqa: E731

    def stage(name, fn):
        if left() < 20:
            log(f"skip {name}: {left():.0f}s left")
            return None
        try:
            rr = fn()
            res["students"][name] = summary(rr)
            log(f"{name}: val {rr.val_bpb:.4f} bpb in {rr.seconds:.1f}s ({rr.step} steps)")
            save()
            return rr
        except Exception as e:  # record and go on with the next stage
            res["students"][name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            log(f"{name} FAILED: {e}")
            save()
            return None

    stage("scratch", lambda: train(scfg, s_tc, work / "scratch", data=data, progress=False, log=quiet))
    online = stage("online", lambda: distill(teacher, scfg, s_tc, dc, work / "online", data=data, progress=False,
                                             log=quiet))
    stage("scratch_s1", lambda: train(scfg, TrainConfig(**{**asdict(s_tc), "seed": 1}), work / "scratch_s1",
                                      data=data, progress=False, log=quiet))
    t = time.perf_counter()
    try:
        write_teacher_cache(teacher, data.train, work / "cache", steps, B, S, s_tc.seed, a.topk, a.kd_temperature,
                            name="teacher", progress=False)
        res["cache"] = dict(seconds=round(time.perf_counter() - t, 2),
                            bytes=sum(f.stat().st_size for f in (work / "cache").iterdir()), k=a.topk)
        log(f"cache: {res['cache']['bytes'] / 1e9:.2f} GB in {res['cache']['seconds']:.1f}s")
    except Exception as e:
        res["cache"] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
        log(f"cache FAILED: {e}")
    stage("offline_topk", lambda: distill(teacher, scfg, s_tc, dk, work / "offline", data=data, cache=work / "cache",
                                          progress=False, log=quiet))

    st = res["students"]
    bpb = {k: v.get("val_bpb") for k, v in st.items()}
    res.update(scratch_bpb=bpb.get("scratch"), distilled_bpb=bpb.get("online"),
               distilled_topk_bpb=bpb.get("offline_topk"))
    if bpb.get("scratch") is not None and bpb.get("scratch_s1") is not None:
        res["seed_noise_bpb"] = abs(bpb["scratch"] - bpb["scratch_s1"])
    gap = (res["scratch_bpb"] - res["teacher_bpb"]) if res["scratch_bpb"] is not None else None
    res["gap_closed"] = {k: (100 * (res["scratch_bpb"] - bpb[k]) / gap if gap and bpb.get(k) is not None else None)
                         for k in ("online", "offline_topk")}
    res["gap_closed_pct"] = res["gap_closed"]["online"]
    save()

    # decode speed at batch 1, bf16 weights
    if left() > 15:
        from dsv3_min.hf import latest_checkpoint
        ck = latest_checkpoint(work / "online") or latest_checkpoint(work / "scratch")
        student = from_pretrained(ck, device=dev)
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        prompt = torch.as_tensor(data.val[:32].astype("int64"), device=dev)[None]
        new = 16 if a.quick else 256
        dec = {}
        for name, m in (("teacher", teacher), ("student", student)):
            m = m.to(dtype).eval()
            if dev == "cuda":
                torch.cuda.empty_cache()
            dec[name] = decode_speed(m, prompt, new)
            log(f"decode {name}: {dec[name]}")
        res["decode_b1"] = dec
        res["decode_speedup_b1"] = dec["student"]["tok_s"] / dec["teacher"]["tok_s"]
    if online is not None:  # plain training for the online student's wall clock (its teacher forwards included)
        if left() > online.seconds + 40:
            res["equal_time_budget_s"] = round(online.seconds, 1)
            stage("equal_time", lambda: train(scfg, TrainConfig(**{**asdict(s_tc), "max_steps": 100 * steps,
                                                                  "time_budget": online.seconds}),
                                              work / "equal_time", data=data, progress=False, log=quiet))
        else:
            log(f"skip equal_time: {left():.0f}s left, it needs {online.seconds + 40:.0f}s")
    eq = res["students"].get("equal_time", {}).get("val_bpb")
    res["equal_time_scratch_bpb"] = eq
    if eq is not None and res.get("gap_closed") is not None and gap:
        res["gap_closed"]["equal_time"] = 100 * (res["scratch_bpb"] - eq) / gap
    res["targets"] = dict(
        beats_scratch_by_5x_noise=(res["scratch_bpb"] - res["distilled_bpb"] > 5 * res["seed_noise_bpb"])
        if None not in (res.get("scratch_bpb"), res.get("distilled_bpb"), res.get("seed_noise_bpb")) else None,
        decode_2x=res["decode_speedup_b1"] >= 2 if "decode_speedup_b1" in res else None,
        quarter_params=res["student_params"] <= res["teacher_params"] / 4)
    res["total_seconds"] = round(time.time() - T0, 1)
    save()
    plot(res, out / "distill.png")
    log("done:", json.dumps({k: res.get(k) for k in ("scratch_bpb", "distilled_bpb", "distilled_topk_bpb",
                                                       "teacher_bpb", "seed_noise_bpb", "gap_closed_pct",
                                                       "equal_time_scratch_bpb", "decode_speedup_b1", "targets")}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for distill.json, distill.png, the runs and the cache")
    p.add_argument("--work", default="/tmp/distill_work", help="runs, checkpoints, data and the teacher cache (GBs)")
    p.add_argument("--mix", default="", help="train on the GPU notebook's packed mix in this folder (gpu_runs.py "
                   "prepare; carry .device_carry/gpu_mix) instead of python-stdlib")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: TINY teacher and students on Shakespeare")
    p.add_argument("--deadline", type=float, default=570, help="seconds after start by which everything ends")
    p.add_argument("--teacher-seconds", type=float, default=150, help="teacher training budget (compile included)")
    p.add_argument("--teacher-steps", type=int, default=0, help="--quick only: teacher steps (default 20)")
    p.add_argument("--student-steps", type=int, default=0, help="steps of every student (default 600; quick 8)")
    p.add_argument("--eval-batches", type=int, default=64, help="val batches of each final evaluation")
    p.add_argument("--kd-temperature", type=float, default=1.0)
    p.add_argument("--kd-alpha", type=float, default=1.0, help="weight of the KD term (1 - it weighs the CE)")
    p.add_argument("--topk", type=int, default=64, help="K of the offline cache")
    ARGS = p.parse_args()
    main(ARGS)
