"""Muon against AdamW at equal wall clock (issue 27, items 5 and 6), one call, one GPU.

Every run is `dsv3_min.train.train`, the loop of `python -m dsv3_min train`, with the same preset, data, schedule and
`time_budget` (seconds of training: the cosine decay follows that clock, so both optimizers finish their decay);
only `optimizer=adamw|muon` and the seed (model initialisation and batch order) change. Runs alternate
adamw/muon seed by seed, so a call cut short still holds complete pairs. The budget of each run is fixed before the
first one: (deadline - data preparation - reserve) / runs - `--overhead` (build, final evaluation, checkpoint).

    python bench/muon.py --corpus .device_carry/plays --out $OUT            # GPU, <= 9.5 min (--deadline 560)
    python bench/muon.py --quick --out /tmp/muon                            # CPU smoke run, seconds
    python bench/muon.py --cpu-steps 300 --out results                      # the CPU main job's model (item 7)

`--cpu-steps N` (item 7, CPU): the README's main job (`cpu-tiny` on shakespeare) with each optimizer for N steps
(the schedule laid over the N steps, no time budget: the result does not depend on the machine's load), and the
medians of interleaved repetitions (both optimizers under the same load) of one optimizer step and one whole
training step of each; `muon_step_time_ratio` (Muon's whole step over AdamW's) turns equal steps into equal wall
clock. Writes `muon_cpu.json` with the load averages of the machine.

Writes `muon.json` (top level: `adamw_bpb`, `muon_bpb` = the mean over seeds of the final validation bits/byte on
the whole validation split, `seed_noise_bpb` = the larger of the two optimizers' standard deviations over seeds
(ddof=1), `seconds` = the training budget of each run; then every run's curve) and `muon.png`.
"""
from __future__ import annotations

import argparse
import gc
import os
import shutil
import statistics
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from dsv3_min.__main__ import _configs  # noqa: E402
from dsv3_min.config import count_params  # noqa: E402
from dsv3_min.files import atomic_write, write_json  # noqa: E402
from dsv3_min.model import DeepSeekV3  # noqa: E402
from dsv3_min.optim import make_optimizer  # noqa: E402
from dsv3_min.step import train_step  # noqa: E402
from dsv3_min.train import prepare_data, read_metrics, train  # noqa: E402

# gpu-small's model on the plays (a small corpus: an 8,192-id vocabulary, 512-token windows, eager so that no run
# spends its budget compiling); the CLI's `--set` names
GPU_SET = ["vocab_size=8192", "batch_size=16", "seq_len=512", "compile=false", "warmup=50", "eval_every=50",
           "eval_batches=8", "final_eval_batches=0", "ckpt_every=0", "keep_last=1", "max_steps=1000000"]
QUICK_SET = ["vocab_size=512", "hidden_size=64", "intermediate_size=96", "moe_intermediate_size=32",
             "num_hidden_layers=2", "num_attention_heads=2", "q_lora_rank=32", "kv_lora_rank=16",
             "qk_nope_head_dim=16", "qk_rope_head_dim=8", "v_head_dim=16", "n_routed_experts=4",
             "num_experts_per_tok=2", "n_group=1", "topk_group=1", "batch_size=4", "seq_len=64", "warmup=5",
             "eval_every=10", "eval_batches=2", "final_eval_batches=4", "ckpt_every=0", "keep_last=1",
             "max_steps=1000000", "device=cpu", "threads=1"]


def one_run(name: str, preset: str, sets: list[str], out: Path, data) -> dict:
    "One training run; its final validation bits/byte and curve (or the error). The checkpoint is deleted."
    t0 = time.time()
    try:
        cfg, tc = _configs(preset, sets)
        r = train(cfg, tc, out / name, data=data, progress=False)
        rows = read_metrics(out / name)
        s = dict(name=name, final_bpb=r.val_bpb, steps=r.step, train_s=r.seconds, stopped=r.stopped,
                 curve=[(row["step"], row["elapsed_s"], row["val_bits_per_byte"]) for row in rows
                        if "val_bits_per_byte" in row],
                 train_loss=[(row["step"], row["elapsed_s"], row["loss"]) for row in rows if "loss" in row][::10],
                 tokens_per_s=statistics.median(row["tokens_per_s"] for row in rows if "tokens_per_s" in row))
    except Exception as e:  # keep going: the other runs still count
        traceback.print_exc()
        s = dict(name=name, error=f"{type(e).__name__}: {e}")
    s["wall_s"] = time.time() - t0
    gc.collect()  # the run's model and optimizer go before the next run builds its own
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    for ck in (out / name).glob("ckpt-*"):
        shutil.rmtree(ck)
    print({k: v for k, v in s.items() if k not in ("curve", "train_loss")}, flush=True)
    return s


def summarise(runs: list[dict]) -> dict:
    "Means and seed noise over the seeds where both optimizers finished (complete pairs only)."
    ok = {(r["opt"], r["seed"]): r["final_bpb"] for r in runs if "final_bpb" in r}
    seeds = sorted({s for (_, s) in ok if ("adamw", s) in ok and ("muon", s) in ok})
    res: dict = {"seeds_paired": seeds}
    if not seeds:
        return res
    for opt in ("adamw", "muon"):
        v = [ok[(opt, s)] for s in seeds]
        res[f"{opt}_bpb"] = statistics.mean(v)
        res[f"{opt}_bpb_per_seed"] = v
        res[f"{opt}_std_bpb"] = statistics.stdev(v) if len(v) > 1 else None
    stds = [res[f"{o}_std_bpb"] for o in ("adamw", "muon") if res[f"{o}_std_bpb"] is not None]
    res["seed_noise_bpb"] = max(stds) if stds else None
    res["muon_minus_adamw_bpb"] = res["muon_bpb"] - res["adamw_bpb"]
    res["paired_diffs_bpb"] = [ok[("muon", s)] - ok[("adamw", s)] for s in seeds]
    if res["seed_noise_bpb"]:
        res["gain_over_noise"] = (res["adamw_bpb"] - res["muon_bpb"]) / res["seed_noise_bpb"]
    return res


def plot(runs: list[dict], path: Path, title: str) -> None:
    "Validation bits/byte against training seconds, one line per run."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for r in runs:
        if r.get("curve"):
            _, t, bpb = zip(*r["curve"])
            ax.plot(t, bpb, color="C0" if r["opt"] == "adamw" else "C3", alpha=0.8,
                    label=f"{r['opt']} seed {r['seed']}", ls=["-", "--", ":", "-."][r["seed"] % 4])
    ax.set(xlabel="training seconds", ylabel="validation bits/byte", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def step_seconds(preset: str, reps: int = 8) -> dict:
    """Median seconds of one `opt.step()` and of one whole `train_step` (forward, backward, clip, optimizer) of each
    optimizer on `preset`'s model and batch shape, interleaved (the same load for both), one thread."""
    cfg, tc = _configs(preset, ["threads=1"])
    torch.set_num_threads(1)  # as the runs below (threads=1): two threads spin badly on a shared machine
    x = torch.randint(0, cfg.vocab_size, (tc.batch_size, tc.seq_len + 1), generator=torch.Generator().manual_seed(0))
    runs = {}
    for o in ("adamw", "muon"):
        torch.manual_seed(0)
        model = DeepSeekV3(cfg)
        runs[o] = model, make_optimizer(model, replace(tc, optimizer=o), torch.device("cpu"))
    opt_s: dict = {o: [] for o in runs}
    step_s: dict = {o: [] for o in runs}
    for _ in range(reps):
        for o, (model, opt) in runs.items():
            t0 = time.perf_counter()
            train_step(model, opt, [(x[:, :-1], x[:, 1:])], lr=tc.lr, grad_clip=tc.grad_clip)
            step_s[o].append(time.perf_counter() - t0)
            for p in model.parameters():
                p.grad = torch.randn_like(p) * 1e-3
            t0 = time.perf_counter()
            opt.step()
            opt_s[o].append(time.perf_counter() - t0)
            opt.zero_grad(set_to_none=True)
    med = lambda v: statistics.median(v[1:])  # noqa: E731 (the first repetition warms up)
    return dict(opt_step_s={o: med(v) for o, v in opt_s.items()}, train_step_s={o: med(v) for o, v in step_s.items()})


def cpu_main_job(steps: int, out: Path) -> None:
    "Item 7: cpu-tiny on shakespeare, AdamW and Muon for `steps` steps each, and their optimizer-step times."
    load = [os.getloadavg()]
    sets = [f"max_steps={steps}", "time_budget=0", "ckpt_every=0", "eval_every=40", "final_eval_batches=16", "threads=1"]
    cfg, tc = _configs("cpu-tiny", sets)
    data = prepare_data(tc.corpus, cfg.vocab_size, log=lambda *a: None)
    res = dict(preset="cpu-tiny", sets=sets, steps=steps, machine=dict(torch=torch.__version__, cores=os.cpu_count()),
               **step_seconds("cpu-tiny"), runs=[])
    for opt in ("adamw", "muon"):
        r = one_run(opt, "cpu-tiny", [*sets, f"optimizer={opt}"], out / "muon_cpu_runs", data)
        res["runs"].append({"opt": opt, "seed": 0, **r})
        res[f"{opt}_bpb"] = r.get("final_bpb")
        load.append(os.getloadavg())
    res["load_averages"] = load
    t = res["train_step_s"]
    res["muon_step_time_ratio"] = t["muon"] / t["adamw"]  # Muon's steps in AdamW's wall clock: steps / this ratio
    shutil.rmtree(out / "muon_cpu_runs", ignore_errors=True)
    write_json(out / "muon_cpu.json", res)
    print({k: v for k, v in res.items() if k != "runs"}, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--corpus", default=str(ROOT / ".device_carry" / "plays"), help="a corpus name or folder")
    ap.add_argument("--preset", default="gpu-small")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--deadline", type=float, default=560.0, help="seconds for the whole call")
    ap.add_argument("--overhead", type=float, default=25.0, help="seconds per run outside its budget (a guess)")
    ap.add_argument("--reserve", type=float, default=15.0, help="seconds kept for the summary and the plot")
    ap.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE", help="more --set for every run")
    ap.add_argument("--quick", action="store_true", help="CPU smoke run: a tiny model on shakespeare, about 5 s per run")
    ap.add_argument("--cpu-steps", type=int, default=0, help="item 7 instead: cpu-tiny, N steps per optimizer")
    a = ap.parse_args()
    if a.cpu_steps:
        return cpu_main_job(a.cpu_steps, Path(a.out))
    t_start = time.time()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.quick:
        a.preset, a.corpus, a.seeds, a.deadline, a.overhead, a.reserve = "cpu-tiny", "shakespeare", 2, 36.0, 2.0, 2.0
    sets = [*(QUICK_SET if a.quick else GPU_SET), f"corpus={a.corpus}", *a.set]
    cfg, tc = _configs(a.preset, sets)
    data = prepare_data(tc.corpus, cfg.vocab_size, cache_dir=out / "cache")
    n_runs = 2 * a.seeds
    budget = (a.deadline - (time.time() - t_start) - a.reserve) / n_runs - a.overhead
    pc = count_params(cfg)
    res = dict(preset=a.preset, sets=sets, seconds=budget, deadline_s=a.deadline,
               params=dict(total=pc.total, active=pc.active), tokens_per_step=tc.batch_size * tc.seq_len,
               machine=dict(torch=torch.__version__, device=torch.cuda.get_device_name() if
                            torch.cuda.is_available() and not a.quick else "cpu"),
               data=dict(train_tokens=len(data.train), val_tokens=len(data.val)), runs=[])
    print(f"{n_runs} runs of {budget:.1f} s of training each; {pc.total / 1e6:.1f}M parameters", flush=True)
    for seed in range(a.seeds):
        for opt in ("adamw", "muon"):
            if time.time() - t_start + budget + a.overhead > a.deadline - a.reserve + 5:
                print(f"no time for {opt} seed {seed}: stopping", flush=True)
                res["cut_short"] = True
                break
            r = one_run(f"{opt}-seed{seed}", a.preset, [*sets, f"optimizer={opt}", f"seed={seed}",
                                                          f"time_budget={budget}"], out / "runs", data)
            res["runs"].append({"opt": opt, "seed": seed, **r})
            res.update(summarise(res["runs"]))
            write_json(out / "muon.json", res)  # after each run: a call cut off keeps what it measured
    res["wall_s"] = time.time() - t_start
    res.update(summarise(res["runs"]))
    write_json(out / "muon.json", res)
    plot(res["runs"], out / "muon.png", f"{a.preset}, {budget:.0f} s per run, {res['machine']['device']}")
    shutil.rmtree(out / "cache", ignore_errors=True)
    atomic_write(out / "muon_done.txt", "ok\n")
    print({k: v for k, v in res.items() if k.endswith(("bpb", "noise", "seconds", "wall_s"))}, flush=True)


if __name__ == "__main__":
    main()
