"""Distillation at gpu-small scale (issue 33, notebook 37): a stronger MoE teacher trained in the same call, its top-K
logits written once and reused, kd_alpha and temperature chosen on a held-out slice, dense students against scratch
over 3 seeds at equal student steps and at equal total wall clock. One H100, one call of <= 9.5 minutes:

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; mkdir -p $OUT/distill
    timeout -k 5 575 python3 bench/distill_gpu.py --out $OUT/distill --mix .device_carry/gpu_mix --deadline 560 \\
        > $OUT/distill/log.txt 2>&1; tail -40 $OUT/distill/log.txt

CPU smoke test (a TINY teacher on Shakespeare, about two minutes): `python bench/distill_gpu.py --quick --out /tmp/d`.

Stages (each one appends to `--out/distill.json`; one that would overrun `--deadline` is skipped and recorded):
  data      the carried mix (`--mix`) or python-stdlib with a quick tokenizer; the val split is cut in two halves:
            `select` (the sweep's held-out slice) and `final` (every reported number); bits/byte of a half uses
            the whole val split's tokens per byte
  teacher   gpu-small (MoE + MLA + MTP), torch.compile, bf16, `--teacher-seconds` of training (compile included)
  sweep     a top-K cache of `--sweep-steps` batches per temperature in `--temperatures`; one short offline student
            per (temperature, kd_alpha) in the grid, judged on the `select` half; the best pair is used below
  cache     the teacher's top-K (`--topk`) log-probs + rest bucket of every student batch, written once (seed 0)
  students  dense `student_config(teacher)`, `--student-steps` steps of 16 x 1024 tokens, eager, bf16:
              scratch_s0/s1/s2  plain CE, seeds 0, 1, 2 (init and batch order): the seed noise is their sample std
              offline           KD from the cache (chosen alpha, T; top-K + rest bucket), seed 0's batches and init
              online            KD against the full-vocabulary teacher run in the same step (chosen alpha, T)
              equal_time        plain CE (seed 0) for the offline student's seconds plus its share of the teacher:
                                (teacher training + sweep caches) / (distilled students) + main cache / (its readers)
  decode    greedy 256 tokens at batch 1, bf16, `dsv3_min.infer.generate`: student vs teacher tok/s

Top-level keys: scratch_bpb (seed 0), scratch_mean_bpb, seed_noise_bpb (sample std over the 3 seeds), distilled_bpb
(offline, the chosen setting), distilled_online_bpb, distilled_topk_bpb (= distilled_bpb), teacher_bpb,
equal_time_scratch_bpb, equal_time_budget_s, chosen, sweep, gap_closed_pct, student_params, teacher_params,
decode_speedup_b1, targets.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from dataclasses import asdict, replace
from pathlib import Path

import torch
from distill_report import curve_summary, decode_speed, noise, plot, targets  # noqa: E402 (bench/, next to this)

from dsv3_min.config import count_params, get_preset
from dsv3_min.data import load_corpus, pack
from dsv3_min.distill import DistillConfig, distill, student_config, write_teacher_cache
from dsv3_min.files import write_json
from dsv3_min.hf import from_pretrained
from dsv3_min.tokenizer import train_tokenizer
from dsv3_min.train import TrainConfig, TrainData, train

T0 = time.time()


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def left() -> float:
    return ARGS.deadline - (time.time() - T0)


def load(a, work: Path) -> TrainData:
    "The carried mix or a corpus with a quick tokenizer, packed."
    if a.mix and not a.quick:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from gpu_runs import load_data  # bench-only loader of the carried mix

        return load_data(Path(a.mix))[0]
    corpus, vocab, chunks = ("shakespeare", 512, 200) if a.quick else ("python-stdlib", 8192, 3000)
    c = load_corpus(corpus)
    tok = train_tokenizer(c, vocab, max_chunks=chunks)
    packed = pack(c, tok, cache_dir=work / "data_cache")
    return TrainData(tok, packed.train, packed.val, 1 / packed.bytes_per_token("val"))


def halves(data: TrainData) -> tuple[TrainData, TrainData]:
    "The val split cut in two: (select, final); the training tokens are shared."
    h = len(data.val) // 2
    return replace(data, val=data.val[:h]), replace(data, val=data.val[h:])


def main(a) -> None:
    out, work = Path(a.out), Path(a.work)
    out.mkdir(parents=True, exist_ok=True)
    for sub in work.glob("*"):
        if sub.name != "data_cache":
            shutil.rmtree(sub, ignore_errors=True)  # a fresh run each call (the data cache is kept)
    dev = "cuda" if torch.cuda.is_available() and not a.quick else "cpu"
    res: dict = dict(command=vars(a), device=torch.cuda.get_device_name() if dev == "cuda" else "cpu",
                     torch=torch.__version__, students={}, sweep={}, stages={})
    save = lambda: write_json(out / "distill.json", res)  # noqa: E731
    data = load(a, work)
    select, final = halves(data)
    V = data.tokenizer.vocab_size
    res["data"] = dict(vocab=V, train_tokens=len(data.train), select_val_tokens=len(select.val),
                       final_val_tokens=len(final.val), val_tokens_per_byte=data.val_tokens_per_byte)
    log(f"data: {len(data.train):,} train tokens, val {len(select.val):,} select + {len(final.val):,} final, vocab {V}")
    B, S = (2, 32) if a.quick else (16, 1024)
    if a.quick:
        tcfg = get_preset("test-tiny", vocab_size=V, max_position_embeddings=256)
        t_tc = TrainConfig(max_steps=a.teacher_steps or 40, batch_size=B, seq_len=S, lr=3e-3, warmup=5,
                           eval_every=1000, final_eval_batches=4, device=dev, threads=1)
    else:
        tcfg = get_preset("gpu-small", vocab_size=V)
        t_tc = TrainConfig(max_steps=100_000, batch_size=B, seq_len=S, lr=1.5e-3, warmup=100, eval_every=100_000,
                           final_eval_batches=a.eval_batches, time_budget=a.teacher_seconds, compile=True,
                           device=dev, keep_last=1)
    r = train(tcfg, t_tc, work / "teacher", data=final, progress=False, log=log)
    teacher = from_pretrained(work / "teacher", device=dev)
    scfg = student_config(tcfg)
    res.update(teacher_bpb=r.val_bpb, teacher=dict(curve_summary(r), config=tcfg.to_dict()),
               teacher_params=count_params(tcfg).total, teacher_active_params=count_params(tcfg).active,
               student_params=count_params(scfg).total, student_config=scfg.to_dict())
    res["stages"]["teacher_s"] = round(r.seconds, 2)
    log(f"teacher {res['teacher_params'] / 1e6:.1f}M: {r.step} steps in {r.seconds:.0f}s, val {r.val_bpb:.4f}; "
        f"student {res['student_params'] / 1e6:.1f}M")
    save()

    steps = a.student_steps or (16 if a.quick else 800)
    sweep_steps = a.sweep_steps or (8 if a.quick else 100)
    s_tc = TrainConfig(max_steps=steps, batch_size=B, seq_len=S, lr=3e-3, warmup=max(1, steps // 16),
                       eval_every=max(1, steps // 8), eval_batches=2 if a.quick else 8,
                       final_eval_batches=4 if a.quick else a.eval_batches, device=dev, keep_last=1,
                       threads=1 if a.quick else 0)
    res["student_train_config"] = asdict(s_tc)
    quiet = lambda *x: None  # noqa: E731

    def stage(name, fn, need: float = 20.0, into: dict | None = None):
        "Run one student; skipped when fewer than `need` seconds are left; an error is recorded, not raised."
        into = res["students"] if into is None else into
        if left() < need:
            into[name] = dict(skipped=f"{left():.0f}s left, needed {need:.0f}s")
            log(f"skip {name}: {left():.0f}s left, needs {need:.0f}s")
            return None
        try:
            rr = fn()
            into[name] = curve_summary(rr)
            log(f"{name}: val {rr.val_bpb:.4f} bpb in {rr.seconds:.1f}s ({rr.step} steps)")
            return rr
        except Exception as e:  # record and go on with the next stage
            into[name] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc())
            log(f"{name} FAILED: {e}")
            return None
        finally:
            save()

    def cache(name: str, n: int, T: float) -> float:
        "Write the teacher's top-K cache of batches 0..n-1 at temperature T; its seconds."
        t = time.perf_counter()
        write_teacher_cache(teacher, data.train, work / name, n, B, S, 0, a.topk, T, name="teacher", progress=False)
        dt = time.perf_counter() - t
        res["stages"][f"{name}_s"] = round(dt, 2)
        log(f"{name}: {n} batches at T={T} in {dt:.1f}s")
        return dt

    # the sweep: short offline students judged on the held-out `select` half
    sw_tc = replace(s_tc, max_steps=sweep_steps, warmup=max(1, sweep_steps // 16), eval_every=sweep_steps,
                    final_eval_batches=s_tc.eval_batches * 2)
    sweep_cache_s = 0.0
    for T in a.temperatures:
        if left() < 60:
            break
        sweep_cache_s += cache(f"sweep_T{T:g}", sweep_steps, T)
        for alpha in a.alphas:
            name, dc = f"T{T:g}_a{alpha:g}", DistillConfig(kd_temperature=T, kd_alpha=alpha, kd_topk=a.topk)
            stage(name, lambda n=name, dc=dc, c=work / f"sweep_T{T:g}": distill(
                teacher, scfg, sw_tc, dc, work / n, data=select, cache=c, progress=False, log=quiet),
                into=res["sweep"])
    done = {k: v["val_bpb"] for k, v in res["sweep"].items() if v.get("val_bpb") is not None}
    best = min(done, key=done.get) if done else f"T{a.temperatures[0]:g}_a{a.alphas[0]:g}"
    T, alpha = (float(x[1:]) for x in best.split("_"))
    res["chosen"] = dict(kd_temperature=T, kd_alpha=alpha, select_bpb=done.get(best), by="lowest select-half bpb")
    log(f"chosen: T={T:g}, kd_alpha={alpha:g} ({done})")
    dc_off = DistillConfig(kd_temperature=T, kd_alpha=alpha, kd_topk=a.topk)
    dc_on = DistillConfig(kd_temperature=T, kd_alpha=alpha)
    res["distill_config"] = dict(offline=asdict(dc_off), online=asdict(dc_on))
    main_cache_s = cache("cache", steps, T)
    res["cache"] = dict(seconds=round(main_cache_s, 2), k=a.topk, batches=steps,
                        bytes=sum(f.stat().st_size for f in (work / "cache").iterdir()))

    seeds = {f"scratch_s{s}": replace(s_tc, seed=s) for s in range(3)}
    stage("scratch_s0", lambda: train(scfg, seeds["scratch_s0"], work / "scratch_s0", data=final, progress=False,
                                      log=quiet))
    off = stage("offline", lambda: distill(teacher, scfg, s_tc, dc_off, work / "offline", data=final,
                                           cache=work / "cache", progress=False, log=quiet))
    n_distilled = len(done) + 2  # every student that learned from this teacher's logits: the sweep, offline, online
    share = (res["stages"]["teacher_s"] + sweep_cache_s) / n_distilled + main_cache_s
    s0 = res["students"].get("scratch_s0", {})
    if off is not None and s0.get("steps"):
        budget = off.seconds + share
        # the schedule (warmup, decay) is laid out over the steps that fit in the budget at scratch_s0's speed, so
        # that the run ends decayed like the others; the time budget stops it if the estimate runs long
        est = max(steps, int(budget / (s0["seconds"] / s0["steps"])))
        res.update(equal_time_budget_s=round(budget, 1), equal_time_share=dict(
            student_s=round(off.seconds, 1), teacher_train_s=res["stages"]["teacher_s"], sweep_cache_s=round(
                sweep_cache_s, 1), main_cache_s=round(main_cache_s, 1), distilled_students=n_distilled,
            planned_steps=est))
        et_tc = replace(s_tc, max_steps=est, warmup=max(1, est // 16), eval_every=max(1, est // 8), time_budget=budget)
        stage("equal_time", lambda: train(scfg, et_tc, work / "equal_time", data=final, progress=False, log=quiet),
              need=budget + 30)
    for s in ("scratch_s1", "scratch_s2"):
        stage(s, lambda s=s: train(scfg, seeds[s], work / s, data=final, progress=False, log=quiet),
              need=(res["students"].get("scratch_s0", {}).get("seconds") or 20) + 20)
    stage("online", lambda: distill(teacher, scfg, s_tc, dc_on, work / "online", data=final, progress=False,
                                    log=quiet), need=3 * (res["students"].get("scratch_s0", {}).get("seconds") or 20))

    st = res["students"]
    bpb = {k: v.get("val_bpb") for k, v in st.items()}
    res.update(scratch_bpb=bpb.get("scratch_s0"), distilled_bpb=bpb.get("offline"),
               distilled_topk_bpb=bpb.get("offline"), distilled_online_bpb=bpb.get("online"),
               equal_time_scratch_bpb=bpb.get("equal_time"), **noise(bpb))
    gap = (res["scratch_bpb"] - res["teacher_bpb"]) if res["scratch_bpb"] is not None else None
    res["gap_closed"] = {k: (100 * (res["scratch_bpb"] - bpb[k]) / gap if gap and bpb.get(k) is not None else None)
                         for k in ("offline", "online", "equal_time")}
    res["gap_closed_pct"] = res["gap_closed"]["offline"]
    save()
    if left() > 15:
        from dsv3_min.hf import latest_checkpoint
        student = from_pretrained(latest_checkpoint(work / "offline") or latest_checkpoint(work / "scratch_s0"),
                                  device=dev)
        dtype = torch.bfloat16 if dev == "cuda" else torch.float32
        prompt = torch.as_tensor(final.val[:32].astype("int64"), device=dev)[None]
        res["decode_b1"] = {n: decode_speed(m.to(dtype).eval(), prompt, 16 if a.quick else 256)
                            for n, m in (("teacher", teacher), ("student", student))}
        res["decode_speedup_b1"] = res["decode_b1"]["student"]["tok_s"] / res["decode_b1"]["teacher"]["tok_s"]
    res["targets"] = targets(res)
    res["total_seconds"] = round(time.time() - T0, 1)
    save()
    plot(res, out / "distill.png")
    log("done:", json.dumps({k: res.get(k) for k in (
        "scratch_bpb", "scratch_mean_bpb", "seed_noise_bpb", "distilled_bpb", "distilled_online_bpb", "teacher_bpb",
        "equal_time_scratch_bpb", "equal_time_budget_s", "chosen", "decode_speedup_b1", "targets")}))


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", required=True, help="folder for distill.json and distill.png")
    p.add_argument("--work", default="/tmp/distill_work", help="runs, checkpoints, data and the teacher caches (GBs)")
    p.add_argument("--mix", default="", help="train on the GPU notebook's packed mix in this folder (gpu_runs.py "
                   "prepare; carry .device_carry/gpu_mix) instead of python-stdlib")
    p.add_argument("--quick", action="store_true", help="CPU smoke test: TINY teacher and students on Shakespeare")
    p.add_argument("--deadline", type=float, default=560, help="seconds after start by which everything ends")
    p.add_argument("--teacher-seconds", type=float, default=150, help="teacher training budget (compile included)")
    p.add_argument("--teacher-steps", type=int, default=0, help="--quick only: teacher steps (default 40)")
    p.add_argument("--student-steps", type=int, default=0, help="steps of every student (default 800; quick 16)")
    p.add_argument("--sweep-steps", type=int, default=0, help="steps of each sweep student (default 100; quick 8)")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0], help="the sweep's KD temperatures")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.5, 0.8], help="the sweep's kd_alpha values")
    p.add_argument("--eval-batches", type=int, default=64, help="val batches of each final evaluation")
    p.add_argument("--topk", type=int, default=32, help="K of the offline caches")
    ARGS = p.parse_args()
    main(ARGS)
