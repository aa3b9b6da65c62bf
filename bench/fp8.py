"""FP8 training with DeepSeek-V3's fine-grained scaling (issue 31), one GPU, one call (<= 9 minutes).

Writes `fp8.json`, `fp8_gemm.png` and `fp8_loss.png` under --out:

  gemm               per (M, K, N): BF16 `x @ wᵀ` against the blockwise FP8 GEMM (`fp8.fp8_mm`: `torch._scaled_mm`
                     with 1x128 / 128x128 scales on sm90), quantization included (bench/fp8_gemm.py says how);
                     `gemm_speedup_dsv3_shapes` is the geometric mean at DeepSeek-V3's four expert/dense shapes
  kernel_error       the cuBLAS kernel against `fp8.emulated_mm`, both against float64
  scaling_error      per-tensor against 1x128 tiles on activations with outliers (synthetic; and the trained
                     gpu-small model's `down_proj` input)
  train              the package's `step.train_step` on what `train` builds (fp32 master weights, bf16 autocast,
                     AdamW; eager unless --compile), `fp8.convert(model)` for FP8: tokens/s (median step after
                     --skip) for gpu-small and a wider model (`--wide`), BF16 against FP8 (`train_speedup_widest`);
                     torchao's float8 training (rowwise recipe, nn.Linear only) as the peer where torchao imports
  loss_curves        gpu-small on the carried corpus, the same batches for every run (data seed 0): BF16 and FP8 at
                     model seed 0, BF16 at seed 1 for the seed noise; `loss_rel_diff` = (FP8 - BF16) / BF16 of the
                     mean training loss over the last 20% of steps (and of a validation loss), `seed_rel_diff` likewise

    python bench/fp8.py --corpus .device_carry/plays --out $OUT            # H100/H200, ~8 min (--deadline 520)
    python bench/fp8.py --quick --out /tmp/fp8                             # CPU smoke test, emulated, seconds
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from fp8_gemm import gemm_section, kernel_error, outlier_errors  # noqa: E402
from fp8_train import loss_section, plot, throughput_section  # noqa: E402

from dsv3_min.files import write_json  # noqa: E402


def finite(obj):
    "`obj` with every NaN or infinite float replaced by None (write_json refuses them; a diverged run is a result)."
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return None if isinstance(obj, float) and not math.isfinite(obj) else obj


def guarded(name: str, fn) -> dict:
    "`fn()`, or `{name_error: message}` with the traceback printed: one failing section keeps the others' results."
    try:
        return fn() or {}
    except Exception as e:  # noqa: BLE001  a GPU run must come back with what it measured
        traceback.print_exc()
        return {f"{name}_error": f"{type(e).__name__}: {e}"[:2000]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.environ.get("OUT", "results"))
    ap.add_argument("--quick", action="store_true", help="CPU, tiny shapes, emulated FP8: a smoke test")
    ap.add_argument("--corpus", default=".device_carry/plays", help="a folder of text files (the loss curves)")
    ap.add_argument("--deadline", type=float, default=520.0, help="seconds; later sections are skipped past it")
    ap.add_argument("--loss-steps", type=int, default=400, help="optimizer steps per loss curve")
    ap.add_argument("--wide", default="4096", help="hidden sizes of the wider models, widest first (comma-separated)")
    ap.add_argument("--compile", action="store_true", help="compile the loss function (both runs; FP8's per-expert "
                    "row counts recompile: slow to start)")
    a = ap.parse_args()
    a.deadline = min(a.deadline, 400.0) if a.quick else a.deadline
    t0 = time.time()
    left = lambda: a.deadline - (time.time() - t0)  # noqa: E731
    device = torch.device("cpu" if a.quick else "cuda")
    out = Path(a.out)
    res = {"quick": a.quick, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else
           f"CPU ({platform.machine()}), FP8 emulated", "versions": {"torch": torch.__version__,
           "cuda": torch.version.cuda, "python": platform.python_version()}, "scale": "power of two (exact)"}

    def save(part: dict) -> None:
        res.update(part)
        res["wall_s"] = time.time() - t0
        write_json(out / "fp8.json", finite(res))

    save(guarded("gemm", lambda: gemm_section(a.quick, device, left)))
    save(guarded("kernel_error", lambda: {"kernel_error": kernel_error(a.quick, device)}))
    print("kernel vs emulation:", res.get("kernel_error"), flush=True)
    losses = guarded("loss", lambda: loss_section(a, device, left))
    acts = losses.pop("_acts", None)
    save(losses)
    save(guarded("scaling_error", lambda: {"scaling_error": outlier_errors(a.quick, device, acts)}))
    save(guarded("train_wide", lambda: throughput_section(a, device, left)))
    guarded("plot", lambda: plot(res, out))
    save({})
    print({k: res.get(k) for k in ("gemm_speedup_dsv3_shapes", "train_speedup_widest", "loss_rel_diff",
                                   "seed_rel_diff", "wall_s")}, flush=True)


if __name__ == "__main__":
    main()
