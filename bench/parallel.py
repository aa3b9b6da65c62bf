"""Expert-parallel communication and a functional throughput check on CPU (gloo).

    python bench/parallel.py --out results/parallel.json            # bytes/token (measured vs closed form),
                                                                     # the 671B closed form, gloo tokens/s at ep 1/2/4
    python bench/parallel.py --trace notebooks/parallel_trace.json  # the 2-rank dispatch picture of notebook 31

Bytes are counted at the collective: every `dist.all_to_all_single` of the MoE dispatch and combine is wrapped and
the rows it sends to *other* ranks are summed (rows kept on the own rank cross no link); the routing is counted by a
forward pre-hook on each `EPExperts`. Each batch is one `train_step` at learning rate 0 (forward: dispatch and
combine; backward: both again), so the routing stays that of the initial model. The closed forms are in
`closed_form_*` below; tokens/s here is a functional check of the gloo path, not a speed claim.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
from math import comb
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from dsv3_min import dist as dd  # noqa: E402
from dsv3_min import parallel as par  # noqa: E402
from dsv3_min.config import ModelConfig  # noqa: E402
from dsv3_min.files import write_json  # noqa: E402
from dsv3_min.model import DeepSeekV3  # noqa: E402
from dsv3_min.optim import param_groups  # noqa: E402
from dsv3_min.step import train_step  # noqa: E402


def bench_config(**kw) -> ModelConfig:
    """TINY (CPU functional check, not a real model size): 16 routed experts, top-4, hidden 64, 2 MoE layers."""
    base = dict(vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=3,
                num_attention_heads=4, max_position_embeddings=256, q_lora_rank=32, kv_lora_rank=24,
                qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=16, n_shared_experts=1,
                num_experts_per_tok=4, n_group=1, topk_group=1, first_k_dense_replace=1, num_nextn_predict_layers=0,
                attn_backend="eager", initializer_range=0.5)
    base.update(kw)
    return ModelConfig(**base)


# ---------------------------------------------------------------------------------------------- closed forms
def p_rank_reached(E: int, k: int, ranks: int) -> float:
    """P(a given rank holds at least one of a token's k experts), k of E chosen uniformly, E/ranks per rank."""
    return 1.0 - comb(E - E // ranks, k) / comb(E, k)


def closed_form_copies(k: int, ranks: int) -> float:
    """Expected off-rank copies per token when every (token, expert) pair travels: k · (1 - 1/ranks)."""
    return k * (1 - 1 / ranks)


def closed_form_dedup(E: int, k: int, ranks: int, n_group: int = 1, topk_group: int = 1) -> float:
    """Expected distinct off-rank destinations per token (one copy per rank) under uniform routing; with
    group-limited routing (whole groups per rank) the bound topk_group·ceil(ranks/n_group)·(1 - 1/ranks)."""
    free = (ranks - 1) * p_rank_reached(E, k, ranks)
    if n_group > 1:
        return min(free, topk_group * -(-ranks // n_group) * (1 - 1 / ranks))
    return free


def v3_671b() -> dict:
    """DeepSeek-V3's shape: hidden 7168, 8 of 256 experts, EP over 8 nodes × 8 GPUs, tokens reach ≤ 4 nodes.
    Bytes per token that cross the inter-node links (IB), dispatch and combine."""
    d, E, k, nodes, limit = 7168, 256, 8, 8, 4
    fp8 = d + d // 128 * 4  # e4m3 payload + one fp32 scale per 1×128 tile
    bf16 = 2 * d
    per_copy = closed_form_copies(k, nodes)
    free = (nodes - 1) * p_rank_reached(E, k, nodes)
    limited = limit * (1 - 1 / nodes)  # 4 of 8 nodes, uniform: own node among them with p = 4/8
    rows = {"per_copy_no_limit": per_copy, "per_node_no_limit": free, "per_node_4_node_limit": limited,
            "per_node_4_node_limit_worst": float(limit)}
    out = {"hidden": d, "experts": E, "top_k": k, "nodes": nodes, "gpus_per_node": 8, "node_limit": limit,
           "bytes_fp8_row": fp8, "bytes_bf16_row": bf16, "off_node_rows_per_token": rows, "bytes_per_token": {}}
    for name, r in rows.items():
        out["bytes_per_token"][name] = {"dispatch_fp8": r * fp8, "dispatch_bf16": r * bf16, "combine_bf16": r * bf16,
                                        "total_fp8_dispatch": r * (fp8 + bf16), "total_bf16": 2 * r * bf16}
    return out


# ---------------------------------------------------------------------------------------------- workers
def _init(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)


class _Counter:
    """Wraps dist.all_to_all_single: bytes of the rows each call sends to other ranks (variable-split calls only)."""

    def __init__(self):
        self.bytes, self.calls, self.orig = 0, 0, dist.all_to_all_single

    def __call__(self, out, inp, output_split_sizes=None, input_split_sizes=None, group=None, **kw):
        if input_split_sizes is not None:  # the row exchange (the fixed-size count exchange is bookkeeping)
            me = dist.get_rank(group)
            row = inp[0].numel() * inp.element_size() if len(inp) else 0
            self.bytes += (sum(input_split_sizes) - input_split_sizes[me]) * row
            self.calls += 1
        return self.orig(out, inp, output_split_sizes, input_split_sizes, group=group, **kw)


def _routing_counter(stats: dict):
    """A forward pre-hook for an `EPExperts`: from the global expert ids `idx (T, k)` it receives, count tokens,
    copies, copies bound for other ranks, and distinct other ranks per token (a per-rank deduplicated send)."""
    def hook(experts, args):
        idx = args[2]
        dest = idx // experts.n_experts  # (T, k) EP rank of each copy
        hit = torch.zeros(idx.shape[0], experts.ep, dtype=torch.bool).scatter_(1, dest, True)
        hit[:, experts.rank] = False
        stats["tokens"] += idx.shape[0]
        stats["copies"] += idx.numel()
        stats["remote_copies"] += int((dest != experts.rank).sum())
        stats["remote_ranks"] += int(hit.sum())
    return hook


def _volume_worker(rank, world, port, cfg_kw, batches, seq, out):
    _init(rank, world, port)
    try:
        cfg = bench_config(bias_update_speed=0.0, **cfg_kw)  # the routing of the initial model at every batch
        torch.manual_seed(0)
        model = par.parallelize(DeepSeekV3(cfg), par.make_mesh(cfg.n_routed_experts, world))
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=0.0)  # lr 0: the weights stay those at init
        stats = dict.fromkeys(("tokens", "copies", "remote_copies", "remote_ranks"), 0)
        for m in model.moe_layers():
            m.experts.register_forward_pre_hook(_routing_counter(stats))
        counter = _Counter()
        dist.all_to_all_single = counter
        g = torch.Generator().manual_seed(1 + rank)
        try:
            for _ in range(batches):  # forward: dispatch + combine; backward: both again
                x = torch.randint(0, cfg.vocab_size, (4, seq + 1), generator=g)
                train_step(model, opt, [(x[:, :-1], x[:, 1:])], lr=0.0)
        finally:
            dist.all_to_all_single = counter.orig
        total = torch.tensor([*stats.values(), counter.bytes], dtype=torch.float64)
        dist.all_reduce(total)
        if rank == 0:  # row_bytes: fp32 rows in this run
            keys = (*stats, "bytes_sent")
            write_json(out, {**dict(zip(keys, total.tolist())), "row_bytes": cfg.hidden_size * 4})
    finally:
        dist.destroy_process_group()


def _speed_worker(rank, world, port, steps, batch, seq, out):
    _init(rank, world, port)
    try:
        cfg = bench_config()
        torch.manual_seed(0)
        model = par.parallelize(DeepSeekV3(cfg), par.make_mesh(cfg.n_routed_experts, world))
        opt = torch.optim.AdamW(param_groups(model, 0.1), lr=1e-3, foreach=True)
        g = torch.Generator().manual_seed(0)
        times = []
        for _ in range(steps):
            x = dd.my_rows(torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=g))
            dist.barrier()
            t0 = time.perf_counter()
            train_step(model, opt, [(x[:, :-1], x[:, 1:])], lr=1e-3, grad_clip=1.0)
            dist.barrier()
            times.append(time.perf_counter() - t0)
        if rank == 0:
            step = sorted(times[1:])[len(times[1:]) // 2]  # median, first step excluded
            write_json(out, {"step_s": step, "tokens_per_s": batch * seq / step})
    finally:
        dist.destroy_process_group()


def _trace_worker(rank, world, port, out):
    """A 2-rank TINY run: for each token of each rank, its experts, their ranks, and where its rows land."""
    _init(rank, world, port)
    try:
        cfg = bench_config(n_routed_experts=8, num_experts_per_tok=2, n_group=1)
        torch.manual_seed(0)
        model = par.parallelize(DeepSeekV3(cfg), par.make_mesh(cfg.n_routed_experts, world))
        moe = model.moe_layers()[0]
        seen = {}
        moe.experts.register_forward_pre_hook(lambda m, args: seen.update(idx=args[2].clone()))  # returns None
        g = torch.Generator().manual_seed(3)
        x = torch.randint(0, cfg.vocab_size, (world, 7), generator=g)
        with torch.no_grad():
            model(dd.my_rows(x))
            idx = seen["idx"]
            T = idx.shape[0]
            label = torch.stack([torch.full((T,), float(rank)), torch.arange(T, dtype=torch.float32)], 1)  # (T, 2)
            rows, local, _ = moe.experts.dispatch(label, idx)  # the real dispatch, carrying (rank, token) labels
        gathered = [None] * world
        dist.all_gather_object(gathered, {"rank": rank, "idx": idx.tolist(), "n_local": moe.experts.n_experts,
                                          "received": [[int(r), int(t), int(e) + rank * moe.experts.n_experts]
                                                       for (r, t), e in zip(rows.tolist(), local.tolist())]})
        if rank == 0:
            write_json(out, {"world": world, "experts": cfg.n_routed_experts, "top_k": cfg.num_experts_per_tok,
                                "ranks": gathered})
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------------------------------------------------- driver
def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(fn, world, *args, out=None):
    """Spawn `world` gloo ranks of `fn(rank, world, port, *args, out)`; the JSON rank 0 wrote to `out`."""
    with tempfile.TemporaryDirectory() as tmp:
        out = str(out or Path(tmp) / "r.json")
        mp.spawn(fn, args=(world, _port(), *args, out), nprocs=world, join=True)
        return json.loads(Path(out).read_text())


def volume(ep: int, n_group: int, topk_group: int, batches: int, seq: int) -> dict:
    """Measured bytes/token (dispatch + combine, forward + backward) at `ep` vs the closed forms."""
    cfg = bench_config(n_group=n_group, topk_group=topk_group)
    m = _run(_volume_worker, ep, {"n_group": n_group, "topk_group": topk_group}, batches, seq)
    tokens, row = m["tokens"], m["row_bytes"]
    # each forward sends every off-rank copy twice (dispatch, combine); the backward sends their gradients again
    counted = 4 * m["remote_copies"] * row
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return {"ep": ep, "n_group": n_group, "topk_group": topk_group, "tokens_moe_layer_passes": tokens,
            "row_bytes": row, "bytes_sent_measured": m["bytes_sent"], "bytes_from_routing": counted,
            "measured_equals_routing_count": m["bytes_sent"] == counted,
            "dispatch_bytes_per_token": m["remote_copies"] * row / tokens,
            "combine_bytes_per_token": m["remote_copies"] * row / tokens,
            "off_rank_copies_per_token": m["remote_copies"] / tokens,
            "closed_form_copies_per_token": closed_form_copies(k, ep),
            "off_rank_ranks_per_token_dedup": m["remote_ranks"] / tokens,
            "closed_form_ranks_per_token_dedup": closed_form_dedup(E, k, ep, n_group, topk_group),
            "max_ranks_per_token": par.max_ranks_per_token(k, n_group, topk_group, ep)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/parallel.json", help="JSON to write (atomically)")
    ap.add_argument("--trace", default="", help="write only the 2-rank dispatch trace to this JSON and exit")
    ap.add_argument("--batches", type=int, default=4, help="batches of 4 x seq tokens per rank for the volume")
    ap.add_argument("--seq", type=int, default=64)
    ap.add_argument("--steps", type=int, default=6, help="training steps per ep for tokens/s")
    args = ap.parse_args(argv)
    if args.trace:
        return _run(_trace_worker, 2, out=args.trace)
    res = {"what": "expert-parallel all-to-all bytes per token (gloo, CPU, TINY config) vs closed forms; "
                   "the closed form at DeepSeek-V3 671B; gloo tokens/s as a functional check (not a speed claim)",
           "torch": torch.__version__, "volume": [], "v3_671b": v3_671b(), "tokens_per_s": {}}
    from tqdm import tqdm
    jobs = [(2, 1, 1), (4, 1, 1), (4, 4, 1), (4, 2, 1)]
    for ep, ng, tg in tqdm(jobs, desc="volume"):
        res["volume"].append(volume(ep, ng, tg, args.batches, args.seq))
    for ep in tqdm([1, 2, 4], desc="tokens/s"):
        res["tokens_per_s"][str(ep)] = _run(_speed_worker, ep, args.steps, 8, args.seq)
    write_json(args.out, res)
    return res


if __name__ == "__main__":
    main()
