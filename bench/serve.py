"""Serving throughput and latency of `python -m dsv3_min serve` (continuous batching, notebook 38) against the
number of concurrent clients: total generated tok/s and time to first token (TTFT) at 1, 2, 4, 8, 16 clients.

The server is the CLI, in its own process, on loopback; each client is a closed loop of streamed
`/v1/completions` requests (server-sent events, as users' clients read them). A model is trained first in the same
call unless --ckpt names one.

    CPU:  python bench/serve.py --preset cpu-tiny --train-seconds 30 --out results/serve_cpu.json
    GPU:  python bench/serve.py --preset gpu-small --corpus .device_carry/plays --train-seconds 120 \\
              --device cuda --max-tokens 128 --out $OUT/serve_gpu.json
    MTP drafting (`serve --draft mtp`): add `--draft mtp`; `--compare` serves the same checkpoint without drafting
    first, in the same call, and writes both (`levels` drafting, `levels_no_draft` not).

Reported: tok_s = completion tokens of all requests of a level / the level's wall time; TTFT = time from sending a
request to its first streamed token chunk (mean, median, p90 over the level's requests). With --draft mtp also the
acceptance of each level: accepted / verified drafts, summed over the requests' `usage.x_draft`.
"""
import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dsv3_min.files import write_json  # noqa: E402

PROMPTS = ["ROMEO:", "To be, or not to be", "KING HENRY:", "First Citizen:\nBefore we proceed", "def main(",
           "The quality of mercy", "JULIET:\nO Romeo", "import os\n"]


def _env(args) -> dict:
    "The subprocesses' environment: `--threads` sets OMP_NUM_THREADS (torch's CPU threads) when given."
    return {**os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}


def train(args, work: Path) -> Path:
    "Train `--preset` on `--corpus` for `--train-seconds` with the CLI; the run folder."
    out = work / "run"
    cmd = [sys.executable, "-m", "dsv3_min", "train", "--preset", args.preset, "--out", str(out), "--no-progress",
           "--time-budget", str(args.train_seconds), "--set", f"device={args.device}", "eval_every=100000",
           "final_eval_batches=2"]
    if args.corpus:
        cmd += ["--corpus", args.corpus]
    subprocess.run(cmd, check=True, cwd=REPO, env=_env(args))
    return out


def start_server(ckpt: Path, args, draft: str):
    "`python -m dsv3_min serve --draft DRAFT` on a free loopback port; (process, url) once /health answers."
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "dsv3_min", "serve", "--ckpt", str(ckpt), "--port", str(port),
                             "--max-batch", str(args.max_batch), "--device", args.device, "--draft", draft], cwd=REPO,
                            env=_env(args))
    url, t0 = f"http://127.0.0.1:{port}", time.time()
    while True:
        try:
            if httpx.get(url + "/health").status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.time() - t0 > 180:
            raise RuntimeError("the server did not start")
        time.sleep(0.2)


async def one_request(client: httpx.AsyncClient, url: str, prompt: str, args, seed: int) -> tuple[float, int, dict]:
    "Stream one completion; (TTFT seconds, completion tokens, usage.x_draft: drafts verified and accepted)."
    body = {"prompt": prompt, "max_tokens": args.max_tokens, "temperature": 1.0, "seed": seed, "stream": True,
            "stream_options": {"include_usage": True}, "x_draft": True}
    t0, ttft, tokens, drafts = time.perf_counter(), None, 0, {}
    async with client.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if ttft is None and chunk["choices"]:
                ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens, drafts = chunk["usage"]["completion_tokens"], chunk["usage"]["x_draft"]
    return ttft, tokens, drafts


async def level(url: str, clients: int, args) -> dict:
    "`clients` closed loops of `--requests` requests each, all at once."
    async def loop(c: int, client):
        return [await one_request(client, url, PROMPTS[(c + k) % len(PROMPTS)], args, seed=1000 * c + k)
                for k in range(args.requests)]
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(limits=limits) as client:
        t0 = time.perf_counter()
        runs = await asyncio.gather(*(loop(c, client) for c in range(clients)))
        wall = time.perf_counter() - t0
    ttfts = sorted(t for run in runs for t, _, _ in run)
    tokens = sum(n for run in runs for _, n, _ in run)
    drafted, accepted = (sum(d[k] for run in runs for _, _, d in run) for k in ("drafted", "accepted"))
    return {"clients": clients, "requests": len(ttfts), "tokens": tokens, "wall_s": round(wall, 3),
            "drafted": drafted, "accepted": accepted, "acceptance": round(accepted / drafted, 4) if drafted else None,
            "tok_s": round(tokens / wall, 2), "ttft_mean_s": round(statistics.mean(ttfts), 4),
            "ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p90_s": round(ttfts[min(len(ttfts) - 1, int(0.9 * len(ttfts)))], 4)}


def run_levels(ckpt: Path, args, draft: str) -> tuple[dict, list, dict]:
    "Serve `ckpt` with `--draft draft` and run every level; (model info, levels, the engine's /health at the end)."
    proc, url = start_server(ckpt, args, draft)
    try:
        asyncio.run(one_request(httpx.AsyncClient(), url, "warm up", args, 0))
        info = httpx.get(url + "/v1/models").json()["data"][0]
        levels = []
        for c in [int(x) for x in args.clients.split(",")]:
            levels.append({"draft": draft, **asyncio.run(level(url, c, args))})
            print(json.dumps(levels[-1]), flush=True)
        return info, levels, httpx.get(url + "/health").json()
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", help="a run or checkpoint folder (default: train one with --preset)")
    p.add_argument("--preset", default="cpu-tiny")
    p.add_argument("--corpus", help="corpus for the training run (default: the CLI's, shakespeare)")
    p.add_argument("--train-seconds", type=float, default=30)
    p.add_argument("--device", default="cpu")
    p.add_argument("--clients", default="1,2,4,8,16")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--requests", type=int, default=3, help="requests per client at each level")
    p.add_argument("--threads", type=int, help="CPU threads of the trainer and the server (OMP_NUM_THREADS)")
    p.add_argument("--draft", choices=["none", "mtp"], default="none", help="the server's --draft")
    p.add_argument("--compare", action="store_true", help="with --draft mtp: also serve without drafting, first")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="serve-bench-"))
    ckpt = Path(args.ckpt) if args.ckpt else train(args, work)
    extra = {}
    if args.compare and args.draft != "none":
        _, plain, plain_health = run_levels(ckpt, args, "none")
        extra = {"levels_no_draft": plain, "engine_no_draft": plain_health}
    info, levels, health = run_levels(ckpt, args, args.draft)
    import torch
    write_json(args.out, {
        "what": "python -m dsv3_min serve: total tok/s and TTFT against concurrent streaming clients"
                + (f", drafting with {args.draft}" if args.draft != "none" else ""),
        "formula": "tok_s = sum of usage.completion_tokens over the level's requests / level wall time; "
                   "TTFT = first streamed chunk - request sent; acceptance = accepted / drafted (usage.x_draft)",
        "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu",
        "cpu_threads": args.threads, "cpus": os.cpu_count(), "torch": torch.__version__,
        "preset": args.preset, "trained_seconds": None if args.ckpt else args.train_seconds,
        "context": info["max_model_len"], "max_batch": args.max_batch, "max_tokens": args.max_tokens,
        "requests_per_client": args.requests, "sampling": "temperature 1, a seed per request", "draft": args.draft,
        "load_average_1m": os.getloadavg()[0],  # other work on the machine during the run (CPU runs)
        "engine": health, "levels": levels, **extra})


if __name__ == "__main__":
    main()
