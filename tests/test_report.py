"""Tests for dsv3_min.report: the GPU runs' plan, the readers of their results, the merge of calls and the plots."""
import dataclasses
import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from dsv3_min.__main__ import _configs
from dsv3_min.config import PRESETS, count_params, get_preset
from dsv3_min.report import (
    ABL,
    ABLATIONS,
    PRESET,
    VOCAB,
    metrics_summary,
    preset_diff,
    read_results,
    read_runs,
    unpack_results,
)

RESULTS = Path(__file__).resolve().parents[1] / "results" / "gpu_train"


def _tar(path: Path, files: dict) -> str:
    "A .tar.gz at `path` holding `files` (name -> bytes, or an object written as JSON)."
    with tarfile.open(path, "w:gz") as t:
        for name, body in files.items():
            body = body if isinstance(body, bytes) else json.dumps(body).encode()
            info = tarfile.TarInfo(name)
            info.size = len(body)
            t.addfile(info, io.BytesIO(body))
    return str(path)


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def test_preset_diff_turns_one_preset_into_another():
    """For every ordered pair of presets, `base` with `preset_diff(name, base)` is exactly preset `name`, and a
    preset differs from itself in nothing."""
    for name in PRESETS:
        assert preset_diff(name, name) == {}
        for base in PRESETS:
            assert get_preset(base, **preset_diff(name, base)) == PRESETS[name], (name, base)


def test_dense_ablation_is_the_dense_preset_with_the_base_active_parameters():
    """The dense ablation builds exactly the `gpu-small-dense` preset (at the runs' vocabulary): no MoE layer, active
    parameters within 0.5% of the MoE base, and less than half its total parameters."""
    base, _ = _configs(PRESET, {**ABL, **ABLATIONS["base"]})
    dense, _ = _configs(PRESET, {**ABL, **ABLATIONS["dense"]})
    assert dense == get_preset("gpu-small-dense", vocab_size=VOCAB)
    assert dense.attention == "gqa" and not any(dense.is_moe_layer(i) for i in range(dense.num_hidden_layers))
    a, b = count_params(base).active, count_params(dense).active
    assert abs(a - b) / a < 0.005, (a, b)
    assert count_params(base).total > 2 * count_params(dense).total  # the MoE holds far more parameters


def test_ablations_differ_from_base_in_one_knob_each():
    """Each ablation changes only the knobs it names (same data, seed, batch, budget): a fair comparison."""
    base, base_tc = _configs(PRESET, ABL)
    for name, ov in ABLATIONS.items():
        cfg, tc = _configs(PRESET, {**ABL, **ov})
        changed = {k for k in base.to_dict() if getattr(cfg, k) != getattr(base, k)}
        assert changed == {k for k in ov if hasattr(base, k) and getattr(base, k) != ov[k]}, name
        assert tc == (dataclasses.replace(base_tc, seed=1) if name == "seed1" else base_tc), name


def test_run_overrides_are_what_the_command_line_builds():
    """A run's overrides (as its summary records them) typed as `--set name=value` give the same ModelConfig and
    TrainConfig as the dict the run was built from: `python -m dsv3_min train --set ...` reproduces each run."""
    for ov in [{**ABL, **v, "time_budget": 35.0} for v in ABLATIONS.values()]:
        assert _configs(PRESET, ov) == _configs(PRESET, [f"{k}={json.dumps(v)}" for k, v in ov.items()])


def test_metrics_summary_reproduces_the_committed_summaries():
    """For every committed GPU run, the summary rebuilt from its metrics has the steps, tokens, final and best bits
    per byte, median tokens/s and last MaxVio that the run recorded when it ended."""
    summary, rows = read_results(RESULTS)
    assert set(summary["runs"]) <= set(rows) and len(summary["runs"]) == 8
    for name, rec in summary["runs"].items():
        rebuilt = metrics_summary(RESULTS / name)
        for k in ("steps", "tokens", "final_val_bpb", "best_val_bpb", "tok_s_median", "last_max_vio"):
            assert rebuilt[k] == rec[k], (name, k)


def test_committed_summaries_match_their_raw_metrics_lines():
    """Every committed GPU run's summary numbers, checked against its raw `metrics.jsonl` lines parsed here (not
    against `metrics_summary`, which wrote some of them): steps and tokens of the last line, the final evaluation's
    bits per byte, the best periodic one, the median tokens/s after the first fifth, the last MaxVio."""
    import statistics
    summary = json.loads((RESULTS / "summary.json").read_text())
    assert len(summary["runs"]) == 8
    for name, rec in summary["runs"].items():
        lines = [json.loads(x) for x in (RESULTS / name / "metrics.jsonl").read_text().splitlines()]
        tc = json.loads((RESULTS / name / "train_config.json").read_text())["train"]
        evals = [x for x in lines if "val_bits_per_byte" in x]
        assert evals[-1]["step"] == lines[-1]["step"], name          # every run ends with an evaluation
        assert rec["steps"] == lines[-1]["step"], name
        assert rec["tokens"] == lines[-1]["step"] * tc["batch_size"] * tc["seq_len"] * tc["grad_accum"], name
        assert rec["final_val_bpb"] == evals[-1]["val_bits_per_byte"], name
        assert rec["best_val_bpb"] == min(x["val_bits_per_byte"] for x in evals[:-1]), name
        assert rec["tok_s_median"] == statistics.median(x["tokens_per_s"] for x in lines[len(lines) // 5:]), name
        assert rec["last_max_vio"] == next((x["max_vio"] for x in reversed(lines) if "max_vio" in x), None), name
    assert summary["runs"]["abl_dense"]["last_max_vio"] is None   # the dense model has no experts


def test_read_runs_drops_a_partial_last_line(tmp_path):
    """A run killed mid-append leaves a partial last metrics line: `read_runs` drops it with a warning naming the
    file and keeps every complete line."""
    (tmp_path / "abl_x").mkdir()
    (tmp_path / "abl_x" / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl"):
        assert read_runs(tmp_path) == {"abl_x": [{"step": 1}, {"step": 2}]}


def test_unpack_keeps_metrics_and_drops_weights(tmp_path):
    """`unpack_results` unpacks metrics, configs and summary under `dest` (the `gpu_train/` prefix removed) and never
    a checkpoint or a .safetensors file."""
    tar = _tar(tmp_path / "g.tar.gz", {"gpu_train/summary.json": b"{}", "gpu_train/main/metrics.jsonl": b'{"step": 1}\n',
                                       "gpu_train/main/ckpt-0000100/state.json": b"{}",
                                       "gpu_train/x.safetensors": b"w", "log.txt": b"log"})
    unpack_results([tar], tmp_path / "out")
    assert _files(tmp_path / "out") == ["log.txt", "main/metrics.jsonl", "summary.json"]


def test_unpack_merges_calls_and_rebuilds_a_cut_off_run(tmp_path):
    """Two calls' tarballs merge into one summary (runs from both, each log kept apart), a run whose process was cut
    off before writing its summary gets one rebuilt from its metrics (final full-split value, best periodic), and the
    ablation plot is drawn."""
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
    merged = unpack_results([a, b], tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s == merged
    assert s["env"] == {"gpu": "x"} and s["steps"] == ["main", "ablations"] and set(s["runs"]) == {"main", "abl_x"}
    x = s["runs"]["abl_x"]
    assert x["rebuilt_from_metrics"] and x["steps"] == 3 and x["tokens"] == 48
    assert x["final_val_bpb"] == 1.8 and x["best_val_bpb"] == 1.5 and x["last_max_vio"] == [0.25]
    assert (tmp_path / "out" / "log-main.txt").read_text() == "main log"
    assert (tmp_path / "out" / "log-abl.txt").read_text() == "abl log"
    assert (tmp_path / "out" / "ablations.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unpack_renames_a_second_main_run(tmp_path):
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
    unpack_results([first, f"{rerun}=main_rerun"], tmp_path / "out")
    s = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert s["runs"] == {"main": {"name": "main"}, "main_rerun": {"name": "main_rerun"}}
    assert (s["main_budget_s"], s["main_rerun_budget_s"], s["samples_from"]) == (520, 425, "main_rerun")
    assert s["steps"] == ["main", "main_rerun"] and s["interrupted"] == {"rerun.tar.gz": "SIGTERM"}
    assert (tmp_path / "out" / "main" / "metrics.jsonl").read_text() == '{"step": 9}\n'
    assert (tmp_path / "out" / "main_rerun" / "metrics.jsonl").read_text() == '{"step": 7}\n'


def test_report_imports_without_matplotlib():
    """matplotlib stays optional: with it unimportable, `dsv3_min.report` imports and reads results, and only a plot
    needs it (ImportError)."""
    code = f"""
import importlib.abc, sys
from pathlib import Path
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("blocked optional package: " + name)
sys.meta_path.insert(0, Block())
from dsv3_min.report import evals, plot_main, read_runs
rows = read_runs(Path({str(RESULTS)!r}), ["abl_base"])["abl_base"]
print(len(evals(rows)) > 0)
try:
    plot_main(rows, 1, 1)
except ImportError as e:
    print("plot:", e)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines() == ["True", "plot: blocked optional package: matplotlib"]


def test_throughput_claims_quote_the_committed_results():
    """Notebook 27's text and docs/reference.md quote `results/train_throughput_bench_step.json` (the bench-step run) as it is (speed-up, MFU and
    tokens/s of the best variant), and none of the superseded run's numbers (2.53x, 43.3%, 431,089) is left."""
    root = RESULTS.parents[1]
    tp = json.loads((root / "results" / "train_throughput_bench_step.json").read_text())
    nb = json.loads((root / "notebooks" / "27_report.ipynb").read_text())
    text = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown")
    reference = (root / "docs" / "reference.md").read_text()
    assert f"{tp['speedup_vs_hf']:.2f}×" in text and f"{tp['mfu']:.1%}" in text
    assert f"{tp['dsv3_min_tokens_per_s']:,.0f} tokens/s" in reference
    assert f"{tp['speedup_vs_hf']:.2f}× transformers" in reference
    for stale in ("2.53×", "43.3%", "431,089", "Both targets are met"):
        assert stale not in text and stale not in reference, stale
