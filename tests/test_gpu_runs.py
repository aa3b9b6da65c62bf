"""Tests for bench/gpu_runs.py, the GPU training run's helpers (the GPU part itself runs only on a GPU)."""
import dataclasses
import importlib.util
import io
import json
import lzma
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dsv3_min.__main__ import _configs as cli_configs
from dsv3_min.config import count_params

_BENCH = Path(__file__).resolve().parents[1] / "bench"
_spec = importlib.util.spec_from_file_location("gpu_runs", _BENCH / "gpu_runs.py")
gpu_runs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(gpu_runs)

DICTD = """

00-database-url
   ftp://ftp.gnu.org/gnu/gcide

 Begin file 1 of 26:  Letter A
GCIDE is free software; licence text.

A \\A\\ (named [=a] in the English).
   The first letter of the English alphabet.
   [1913 Webster]

Aback \\A*back"\\, adv.
   Backward; back.
      [1913 Webster]

            Therefore came I to them aback. --Chaucer.
      [WordNet 1.5 +PJC]

Zythum \\Zy"thum\\, n.
   A kind of ancient malt beverage.
   [1913 Webster]
"""


def test_gcide_docs_drops_preamble_and_source_tags_and_keeps_whole_entries():
    """The licence preamble and the lines holding only a source tag go; entries stay whole and in order, and a
    small `doc_chars` cuts documents only between entries."""
    docs = gpu_runs.gcide_docs(DICTD, doc_chars=10**6)
    assert len(docs) == 1 and docs[0][0] == "gcide-0000.txt"
    text = docs[0][1]
    assert text.startswith("A \\A\\ (named") and "licence" not in text and "00-database" not in text
    assert "[1913 Webster]" not in text and "[WordNet" not in text
    assert "Therefore came I to them aback. --Chaucer." in text and text.rstrip().endswith("malt beverage.")
    small = gpu_runs.gcide_docs(DICTD, doc_chars=1)
    assert [t.split(" ", 1)[0] for _, t in small] == ["A", "Aback", "Zythum"]
    assert "\n\n".join(t.rstrip("\n") for _, t in small) + "\n" == text


def _touch(root: Path, files: dict[str, int]) -> Path:
    "Files of the given sizes under `root` (an unpacked .deb's tree)."
    for rel, size in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text("x" * size)
    return root


def test_python_sources_skip_generated_tables_and_benchmarks(tmp_path):
    """A Python package's documents are its `.py` modules below dist-packages, named by their import path; files over
    `MAX_PY_BYTES`, sympy's generated RUBI rules, benchmarks and non-Python files are left out."""
    big = gpu_runs.MAX_PY_BYTES + 1
    root = _touch(tmp_path, {"usr/lib/python3/dist-packages/sympy/core/basic.py": 10,
                             "usr/lib/python3/dist-packages/sympy/core/tests/test_basic.py": 10,
                             "usr/lib/python3/dist-packages/sympy/integrals/rubi/rules/sine.py": 10,
                             "usr/lib/python3/dist-packages/sympy/polys/benchmarks/bench_solvers.py": 10,
                             "usr/lib/python3/dist-packages/sympy/physics/huge_table.py": big,
                             "usr/lib/python3/dist-packages/sympy/core/data.json": 10,
                             "usr/share/doc/python3-sympy/copyright": 10})
    got = [name for name, _ in gpu_runs._python_sources(root)]
    assert got == ["sympy/core/basic.py", "sympy/core/tests/test_basic.py"]


def test_globbed_and_sphinx_rules_name_documents_below_their_folder(tmp_path):
    """`_globbed` names each match by its path below the pattern's fixed prefix; `_sphinx_sources` takes the reST
    sources of a Sphinx build, drops `.txt` and skips translations."""
    root = _touch(tmp_path, {"usr/share/perl/5.36.0/pod/perlre.pod": 5, "usr/share/perl/5.36.0/pod/x.html": 5,
                             "usr/share/doc/linux-doc/html/_sources/admin/index.rst.txt": 5,
                             "usr/share/doc/linux-doc/html/_sources/translations/it/index.rst.txt": 5})
    assert [n for n, _ in gpu_runs._globbed("usr/share/perl/*/pod/*.pod")(root)] == ["5.36.0/pod/perlre.pod"]
    assert [n for n, _ in gpu_runs._sphinx_sources(root)] == ["admin/index.rst"]


def test_every_listed_package_has_a_rule_and_unknown_ones_are_refused(tmp_path, monkeypatch):
    """Each package of `DEBS` maps to a part of the mix (GCIDE has its own reader), and a .deb of any other package
    raises `ValueError` naming it before anything is unpacked."""
    parts = {Path(p).name for p in gpu_runs.PARTS}
    for deb in gpu_runs.DEBS:
        rule = next((r for prefix, r in gpu_runs.DEB_RULES.items() if deb.startswith(prefix)), None)
        assert deb == "dict-gcide" or (rule is not None and rule[0].split("/")[0] in parts), deb
    monkeypatch.setattr(gpu_runs, "DOCS", tmp_path / "docs")
    with pytest.raises(ValueError, match="python-django-doc_3.2_all.deb"):
        gpu_runs.extract_debs([str(tmp_path / "python-django-doc_3.2_all.deb")])


def test_configs_match_the_cli():
    """`_configs` builds exactly the ModelConfig and TrainConfig that `python -m dsv3_min train --set ...` builds."""
    ov = {**gpu_runs.ABL, **gpu_runs.ABLATIONS["aux"], "time_budget": 35.0}
    cfg, tc = gpu_runs._configs("gpu-small", ov)
    cli_cfg, cli_tc = cli_configs("gpu-small", [f"{k}={json.dumps(v)}" for k, v in ov.items()])
    assert cfg == cli_cfg and tc == cli_tc
    assert (cfg.bias_update_speed, cfg.aux_loss_alpha, tc.time_budget, tc.compile) == (0.0, 0.01, 35.0, True)


def test_dense_ablation_matches_active_parameters():
    """The dense (GQA + SwiGLU) model has no MoE layer and its active parameters are within 0.5% of the MoE base."""
    base, _ = gpu_runs._configs("gpu-small", {**gpu_runs.ABL, **gpu_runs.ABLATIONS["base"]})
    dense, _ = gpu_runs._configs("gpu-small", {**gpu_runs.ABL, **gpu_runs.ABLATIONS["dense"]})
    assert dense.attention == "gqa" and not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))
    a, b = count_params(base).active, count_params(dense).active
    assert abs(a - b) / a < 0.005, (a, b)
    assert count_params(base).total > 2 * count_params(dense).total  # the MoE holds far more parameters


def test_ablations_differ_from_base_in_one_knob_each():
    """Each ablation changes only the knobs it names (same data, seed, batch, budget): a fair comparison."""
    base, base_tc = gpu_runs._configs("gpu-small", gpu_runs.ABL)
    for name, ov in gpu_runs.ABLATIONS.items():
        cfg, tc = gpu_runs._configs("gpu-small", {**gpu_runs.ABL, **ov})
        changed = {k for k in base.to_dict() if getattr(cfg, k) != getattr(base, k)}
        assert changed == {k for k in ov if hasattr(base, k) and getattr(base, k) != ov[k]}, name
        assert tc == (dataclasses.replace(base_tc, seed=1) if name == "seed1" else base_tc), name


def test_load_data_reads_packed_tokens(tmp_path):
    """`load_data` maps the carried uint16 splits and derives val tokens per byte from the sidecar."""
    from dsv3_min.tokenizer import train_tokenizer
    tok = train_tokenizer(["to be or not to be, that is the question\n" * 50], vocab_size=300)
    tok.save(tmp_path / "tokenizer")
    ids = {"train": np.arange(100, dtype=np.uint16), "val": np.arange(40, dtype=np.uint16)}
    for s, a in ids.items():
        a.tofile(tmp_path / f"{s}.bin")
    meta = {"dtype": "uint16", "train": {"tokens": 100, "bytes": 350}, "val": {"tokens": 40, "bytes": 160}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    data, m = gpu_runs.load_data(tmp_path, tmp_path / "unused")
    assert m == meta and data.val_tokens_per_byte == pytest.approx(0.25)
    assert np.array_equal(data.train, ids["train"]) and np.array_equal(data.val, ids["val"])
    assert data.tokenizer.vocab_size == tok.vocab_size
    assert not (tmp_path / "unused").exists()
    for s in ids:  # the carried form: xz-compressed splits, unpacked once into unzip_dir
        with open(tmp_path / f"{s}.bin", "rb") as src, lzma.open(tmp_path / f"{s}.bin.xz", "wb") as dst:
            dst.write(src.read())
        (tmp_path / f"{s}.bin").unlink()
    data, _ = gpu_runs.load_data(tmp_path, tmp_path / "raw")
    assert np.array_equal(data.train, ids["train"]) and np.array_equal(data.val, ids["val"])
    assert (tmp_path / "raw" / "train.bin").stat().st_size == 200


def test_report_keeps_metrics_and_drops_weights(tmp_path):
    """`report` unpacks metrics, configs and summary under `dest` (the `gpu_train/` prefix removed) and never a
    checkpoint or a .safetensors file."""
    tar = tmp_path / "g.tar.gz"
    with tarfile.open(tar, "w:gz") as t:
        for name, body in [("gpu_train/summary.json", b"{}"), ("gpu_train/main/metrics.jsonl", b'{"step": 1}\n'),
                           ("gpu_train/main/ckpt-0000100/state.json", b"{}"), ("gpu_train/x.safetensors", b"w"),
                           ("log.txt", b"log")]:
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    gpu_runs.report([str(tar)], tmp_path / "out")
    got = sorted(str(p.relative_to(tmp_path / "out")) for p in (tmp_path / "out").rglob("*") if p.is_file())
    assert got == ["log.txt", "main/metrics.jsonl", "summary.json"]


def _tar(path, files: dict) -> str:
    with tarfile.open(path, "w:gz") as t:
        for name, body in files.items():
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    return str(path)


def test_report_merges_calls_and_rebuilds_a_cut_off_run(tmp_path):
    """Two calls' tarballs merge into one summary (runs from both, each log kept apart), and a run whose process was
    cut off before writing its summary gets one rebuilt from its metrics (final full-split value, best periodic)."""
    tc = {"train": {"batch_size": 2, "seq_len": 8, "grad_accum": 1}}
    lines = [{"step": 1, "tokens_per_s": 10.0, "elapsed_s": 1.0, "val_loss": 3.0, "val_bits_per_byte": 2.0},
             {"step": 2, "tokens_per_s": 20.0, "elapsed_s": 2.0, "val_loss": 2.9, "val_bits_per_byte": 1.5,
              "max_vio": [0.5]},
             {"step": 3, "tokens_per_s": 30.0, "elapsed_s": 3.0, "val_loss": 3.1, "val_bits_per_byte": 1.8,
              "val_full_split": True, "max_vio": [0.25]}]
    a = _tar(tmp_path / "main.tar.gz", {"gpu_train/summary.json": {"env": {"gpu": "x"}, "steps": ["main"],
                                                                    "runs": {"main": {"name": "main"}}},
                                        "log.txt": b"main log"})
    b = _tar(tmp_path / "abl.tar.gz", {"gpu_train/summary.json": {"steps": ["ablations"], "runs": {}},
                                       "gpu_train/abl_x/metrics.jsonl": "".join(json.dumps(x) + "\n" for x in lines).encode(),
                                       "gpu_train/abl_x/train_config.json": tc, "log.txt": b"abl log"})
    gpu_runs.report([a, b], tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["env"] == {"gpu": "x"} and s["steps"] == ["main", "ablations"] and set(s["runs"]) == {"main", "abl_x"}
    x = s["runs"]["abl_x"]
    assert x["rebuilt_from_metrics"] and x["steps"] == 3 and x["tokens"] == 48
    assert x["final_val_bpb"] == 1.8 and x["best_val_bpb"] == 1.5 and x["last_max_vio"] == [0.25]
    assert (tmp_path / "out" / "log-main.txt").read_text() == "main log"
    assert (tmp_path / "out" / "log-abl.txt").read_text() == "abl log"


def test_report_renames_a_second_main_run(tmp_path):
    """`x.tar.gz=NAME` files that call's main run under NAME (folder, summary entry, budget, samples' origin), so a
    second main run merges beside the first instead of overwriting it; a call stopped by a signal is named."""
    first = _tar(tmp_path / "main.tar.gz", {"gpu_train/summary.json": {"env": {}, "steps": ["main"],
                                                                        "main_budget_s": 520, "runs": {"main": {"name": "main"}}},
                                            "gpu_train/main/metrics.jsonl": b'{"step": 9}\n'})
    rerun = _tar(tmp_path / "rerun.tar.gz", {"gpu_train/summary.json": {"steps": ["main"], "main_budget_s": 425,
                                                                         "runs": {"main": {"name": "main"}},
                                                                         "samples": [{"prompt": "a", "text": "b"}],
                                                                         "interrupted": "SIGTERM"},
                                             "gpu_train/main/metrics.jsonl": b'{"step": 7}\n'})
    gpu_runs.report([first, f"{rerun}=main_rerun"], tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["runs"] == {"main": {"name": "main"}, "main_rerun": {"name": "main_rerun"}}
    assert (s["main_budget_s"], s["main_rerun_budget_s"], s["samples_from"]) == (520, 425, "main_rerun")
    assert s["steps"] == ["main", "main_rerun"] and s["interrupted"] == {"rerun.tar.gz": "SIGTERM"}
    assert (tmp_path / "out" / "main" / "metrics.jsonl").read_text() == '{"step": 9}\n'
    assert (tmp_path / "out" / "main_rerun" / "metrics.jsonl").read_text() == '{"step": 7}\n'
