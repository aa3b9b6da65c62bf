"""Multi-GPU run (issue 17): expert parallelism + FSDP2 on several GPUs with NCCL, against one GPU.

Each variant runs under torchrun and writes OUT/multigpu/<variant>.json; after every variant the summary
OUT/multigpu.json is rebuilt from all variant files present (so variants may run in separate device calls):

    python bench/multigpu.py --out results --gpus 2 --variants single,single_seed1,ep,fsdp --steps 200
    python bench/multigpu.py --out results --gpus 2 --variants big --steps 300     # the >8B-parameter MoE
    python bench/multigpu.py --out results --gpus 1 --variants ep --steps 20       # NCCL path, a world of 1

Every variant trains with the package's `step.train_step` (bf16 autocast over fp32 master weights, compiled as
`train --set compile=true` compiles: the loss on one GPU, each block's sub-modules under FSDP2):
  single        gpu-small on 1 GPU (seed 0)            single_seed1  the same with model seed 1 (the noise level)
  ep            gpu-small, ep = --gpus (16 experts / ep per GPU), FSDP2 for the rest (at 1 GPU: FSDP2 alone)
  fsdp          gpu-small, pure FSDP2 (ep = 1) on --gpus GPUs
  big           a >8B-parameter MoE (does not fit one H200 at 16 bytes/parameter) with EP + FSDP2 on --gpus GPUs
Reported: tokens/s per GPU, scaling efficiency (tokens/s per GPU at N GPUs / tokens/s on 1 GPU), the share of
step time in all-to-all kernels (torch.profiler over a few steps), peak memory per GPU, the first steps' losses.
The data are a synthetic low-entropy bigram stream (deterministic, the same global batches in every variant), so
the loss falls and runs can be compared step by step without a dataset on the device.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def big_config():
    """A ~9.8B-parameter MoE (157 GB at 16 bytes/parameter, over one H200's 139 GiB): 64 experts, 18 layers."""
    from dsv3_min.config import get_preset
    return get_preset("gpu-small", hidden_size=2048, intermediate_size=5632, num_hidden_layers=18,
                      num_attention_heads=16, q_lora_rank=768, kv_lora_rank=512, n_routed_experts=64,
                      moe_intermediate_size=1408, num_experts_per_tok=6, n_group=8, topk_group=4)


def bigram_batches(vocab: int, batch: int, seq: int, seed: int = 1234, fanout: int = 4):
    """Endless global batches (batch, seq+1) from a random sparse bigram chain: each token has `fanout` successors."""
    import torch
    g = torch.Generator().manual_seed(seed)
    succ = torch.randint(0, vocab, (vocab, fanout), generator=g)
    while True:
        x = torch.empty(batch, seq + 1, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        pick = torch.randint(0, fanout, (batch, seq), generator=g)
        for t in range(seq):
            x[:, t + 1] = succ[x[:, t], pick[:, t]]
        yield x


def _a2a_share(prof, steps: int, step_s: float) -> float:
    """Seconds per step of all-to-all (NCCL send/recv) kernels over the step time."""
    total = 0.0
    for e in prof.key_averages():
        name = e.key.lower()
        if "alltoall" in name or "all_to_all" in name or "sendrecv" in name:
            total += getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0.0)) / 1e6
    return total / steps / step_s


def _top_ops(prof, steps: int, n: int = 15) -> dict:
    """The `n` operations with the most self device time (ms per step): where a variant's step goes."""
    rows = [(getattr(e, "self_device_time_total", 0.0) / 1e3 / steps, e.key[:90]) for e in prof.key_averages()]
    return {k: round(ms, 3) for ms, k in sorted(rows, reverse=True)[:n] if ms > 0}


def worker(args) -> None:
    """One rank of a variant (under torchrun): train, time, profile, write the variant JSON on rank 0."""
    import torch
    import torch.distributed as dist

    from dsv3_min import dist as dd
    from dsv3_min import parallel as par
    from dsv3_min.config import count_params, get_preset
    from dsv3_min.model import DeepSeekV3
    from dsv3_min.optim import param_groups
    from dsv3_min.rope import RotaryEmbedding
    from dsv3_min.step import lm_loss, train_step
    cuda = torch.cuda.is_available()  # CPU/gloo only for the `--tiny` dry run of this script
    par.init_distributed("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    dev = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    cfg = big_config() if args.variant == "big" else get_preset("gpu-small")
    if args.tiny:  # TINY dry run (CPU): not a measurement
        cfg = cfg.replace(hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
                          q_lora_rank=32, kv_lora_rank=32, num_attention_heads=4, vocab_size=512, qk_nope_head_dim=16,
                          qk_rope_head_dim=8, v_head_dim=16)
    ep = world if args.variant in ("ep", "big") else 1
    single = args.variant.startswith("single")
    torch.manual_seed(args.seed)
    with torch.device("meta" if args.variant == "big" else "cpu"):
        model = DeepSeekV3(cfg)
    if args.variant == "big":  # too large to build whole on one GPU: materialize after sharding
        model = par.parallelize(model, par.make_mesh(cfg.n_routed_experts, ep, dev.type), compile=args.compile)
        model.to_empty(device=dev)
        torch.manual_seed(args.seed + rank)
        with torch.no_grad():
            model.reset_parameters()  # per-rank init of the shards: a valid initialization, not the 1-GPU one
            for n, b in model.named_buffers():  # to_empty left the buffers uninitialized
                b.zero_() if not n.endswith("inv_freq") else None
            fresh = RotaryEmbedding(model.rotary.inv_freq.numel() * 2, cfg.rope_theta, cfg.rope_scaling)
            model.rotary.inv_freq.copy_(fresh.inv_freq)
    elif single:  # the baseline: the plain single-GPU model, as `train` runs it
        model = model.to(dev)
    else:  # as `torchrun ... train --set ep=E compile=...` does
        model = par.parallelize(model.to(dev), par.make_mesh(cfg.n_routed_experts, ep, dev.type), compile=args.compile)
    loss_fn = torch.compile(lm_loss) if args.compile and single else lm_loss  # as `train` chooses
    opt = torch.optim.AdamW(param_groups(model, 0.1), lr=args.lr, fused=cuda)
    data = bigram_batches(cfg.vocab_size, args.batch, args.seq)
    losses, times = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    def step():
        x = dd.my_rows(next(data)).to(dev, non_blocking=True)
        parts, _ = train_step(model, opt, [(x[:, :-1], x[:, 1:])], loss_fn, args.lr, 1.0,
                              lambda: torch.autocast(dev.type, dtype=torch.bfloat16))
        return parts[0]

    for i in range(args.steps):
        sync()
        t0 = time.perf_counter()
        loss = step()
        losses.append(float(loss))
        sync()
        times.append(time.perf_counter() - t0)
        if rank == 0 and (i % 20 == 0 or i == args.steps - 1):
            print(f"[{args.variant}] step {i} loss {losses[-1]:.4f} {times[-1] * 1e3:.0f} ms", flush=True)
    from torch.profiler import ProfilerActivity, profile
    n_prof = 5
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        sync()
        t0 = time.perf_counter()
        for _ in range(n_prof):
            step()
        sync()
        prof_step = (time.perf_counter() - t0) / n_prof
    warm = times[min(len(times) - 1, max(3, len(times) // 5)):]
    step_s = sorted(warm)[len(warm) // 2]
    peak = torch.tensor(torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0, device=dev)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    if rank == 0:
        rec = {"variant": args.variant, "gpus": world, "ep": ep, "dp": world // ep, "seed": args.seed,
               "device": torch.cuda.get_device_name() if cuda else "cpu (dry run)", "torch": torch.__version__, "compile": args.compile,
               "global_batch": [args.batch, args.seq], "params": count_params(cfg).total,
               "step_s_median": step_s, "tokens_per_s": args.batch * args.seq / step_s,
               "tokens_per_s_per_gpu": args.batch * args.seq / step_s / world,
               "all_to_all_share": _a2a_share(prof, n_prof, prof_step), "peak_mem_gib_max_rank": float(peak),
               "top_device_ms_per_step": _top_ops(prof, n_prof),
               "losses": losses}
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".tmp").write_text(json.dumps(rec) + "\n")
        os.replace(out.with_suffix(".tmp"), out)
    dist.destroy_process_group()


def summarize(out_dir: Path) -> dict:
    """results/multigpu.json from the variant files: gpus, scaling_efficiency, all_to_all_share, device kind, noise."""
    runs = {p.stem: json.loads(p.read_text()) for p in sorted((out_dir / "multigpu").glob("*.json"))}
    s = {"runs": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in runs.items()}}
    multi = [runs[k] for k in ("ep", "fsdp", "big") if k in runs]
    s["gpus"] = max([r["gpus"] for r in runs.values()], default=0)
    s["device_kind"] = next((r["device"] for r in runs.values()), None)
    one = runs.get("single")
    for k in ("ep", "fsdp"):
        if one and k in runs:
            s[f"scaling_efficiency_{k}"] = runs[k]["tokens_per_s_per_gpu"] / one["tokens_per_s_per_gpu"]
    s["scaling_efficiency"] = s.get("scaling_efficiency_ep")
    s["all_to_all_share"] = runs["ep"]["all_to_all_share"] if "ep" in runs else None
    if one and "single_seed1" in runs:
        n = min(len(one["losses"]), len(runs["single_seed1"]["losses"]))
        noise = [abs(a - b) for a, b in zip(one["losses"][:n], runs["single_seed1"]["losses"][:n])]
        s["loss_seed_noise_mean_abs"] = sum(noise) / max(n, 1)
        for k in ("ep", "fsdp"):
            if k in runs:
                d = [abs(a - b) for a, b in zip(one["losses"][:n], runs[k]["losses"][:n])]
                s[f"loss_vs_single_mean_abs_{k}"] = sum(d) / max(len(d), 1)
    s["losses"] = {k: v["losses"] for k, v in runs.items()}
    s["multi_gpu_runs"] = len(multi)
    path = out_dir / "multigpu.json"
    path.with_suffix(".tmp").write_text(json.dumps(s, indent=1) + "\n")
    os.replace(path.with_suffix(".tmp"), path)
    return s


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results", help="directory for multigpu/<variant>.json and multigpu.json")
    ap.add_argument("--gpus", type=int, default=2, help="GPUs for the ep/fsdp/big variants")
    ap.add_argument("--variants", default="single,single_seed1,ep,fsdp", help="comma-separated, see above")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16, help="global batch (sequences)")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--tiny", action="store_true", help="TINY dry run of the script (CPU/gloo works), no measurement")
    ap.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: run one variant's rank
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--json", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        args.variant = args.worker
        return worker(args)
    out = Path(args.out)
    for v in [v for v in args.variants.split(",") if v]:
        if v not in ("single", "single_seed1", "ep", "fsdp", "big"):
            raise SystemExit(f"unknown variant {v!r}: choose from single, single_seed1, ep, fsdp, big")
        n = 1 if v.startswith("single") else args.gpus
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__,
               "--worker", v, "--seed", "1" if v == "single_seed1" else "0",
               "--json", str(out / "multigpu" / f"{v}.json"), "--steps", str(args.steps), "--batch", str(args.batch),
               "--seq", str(args.seq), "--lr", str(args.lr)] + ([] if args.compile else ["--no-compile"]) + (
                   ["--tiny"] if args.tiny else [])
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        summarize(out)
    print(json.dumps({k: v for k, v in summarize(out).items() if k not in ("losses", "runs")}, indent=1))


if __name__ == "__main__":
    main()
