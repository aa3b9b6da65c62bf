"""`python bench/attention.py --package`: the flash_attn package (FlashAttention-4 or 2) through
`dsv3_min.attention.flash_attn_package`: its correctness against fp32 eager attention, its training-shape timings
next to every other method, and one decode step's attention at gpu-small's naive MLA shapes.
Writes DIR/attention_flash_attn.json after each section and prints the table last."""
import json
from functools import partial
from pathlib import Path

import torch
from attention_common import SHAPES, bench_ms, bench_point, case_inputs, errors_vs_eager, log, rel_err, table

from dsv3_min.attention import attend, flash_attn_func, flash_attn_package


def package_check(b, h, sq, sk, dqk, dv, causal, seed):
    """The flash_attn package through `flash_attn_package` vs fp32 eager attention: output and the three gradients."""
    q, k, v, do = case_inputs(b, h, h, sq, sk, dqk, dv, torch.bfloat16, seed)
    errs = errors_vs_eager(lambda q, k, v: flash_attn_package(q, k, v, causal), q, k, v, do, causal)
    row = dict(b=b, h=h, sq=sq, sk=sk, dqk=dqk, dv=dv, causal=causal, err_o=errs[0], err_dq=errs[1], err_dk=errs[2],
               err_dv=errs[3], tol=1e-2, ok=max(errs) <= 1e-2)
    log("package check", row)
    return row


def decode_point(b, h, t, dqk, dv):
    """One decode step's attention (1 query row against t cached keys, bf16): the package, SDPA and eager, in us."""
    g = torch.Generator(device="cuda").manual_seed(t)
    q = torch.randn(b, h, 1, dqk, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(b, h, t, dqk, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(b, h, t, dv, device="cuda", generator=g, dtype=torch.bfloat16)
    row = dict(batch=b, heads=h, cached=t, dqk=dqk, dv=dv, bytes_read=2 * b * h * t * (dqk + dv))
    ref = attend(q.float(), k.float(), v.float(), False)  # one query row sees every cached key: no mask needed
    for backend in ("flash_attn", "sdpa", "eager"):
        fn = partial(attend, q, k, v, False, backend=backend)
        row[f"err_{backend}"] = rel_err(fn().float(), ref)
        row[f"us_{backend}"] = 1e3 * bench_ms(fn)
        row[f"tb_s_{backend}"] = row["bytes_read"] / row[f"us_{backend}"] / 1e6
    log("decode", row)
    return row


def package_main(a):
    """--package: is the flash_attn package installed and right, and how fast, for training and decode shapes."""
    out = dict(env=dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda))
    Path(a.out).mkdir(parents=True, exist_ok=True)
    save = lambda: (Path(a.out) / "attention_flash_attn.json").write_text(json.dumps(out, indent=1, default=str))  # noqa: E731
    try:
        out["package"] = flash_attn_func()[0]
        import importlib.metadata as md

        out["versions"] = {n: md.version(n) for n in ("flash-attn-4", "flash-attn", "nvidia-cutlass-dsl-libs-core")
                           if n in {d.metadata["Name"] for d in md.distributions()}}
    except ImportError as e:
        out["error"] = str(e)
    if "package" in out:
        out["correctness"] = []
        for i, (b, h, sq, sk, dqk, dv, causal) in enumerate([
                (2, 4, 1000, 1000, 192, 128, True), (2, 4, 1000, 1000, 192, 128, False), (1, 8, 17, 17, 192, 128, True),
                (1, 4, 2048, 2048, 128, 128, True), (2, 16, 1, 384, 96, 64, True), (2, 16, 7, 384, 96, 64, True)]):
            try:
                out["correctness"].append(package_check(b, h, sq, sk, dqk, dv, causal, i))
            except Exception as e:  # a shape the package refuses
                out["correctness"].append(dict(b=b, h=h, sq=sq, sk=sk, dqk=dqk, dv=dv, causal=causal, error=repr(e)[:300]))
                log("package check failed", out["correctness"][-1])
        save()  # after each section: a timeout keeps what was measured
        out["bench"] = [r for name, (dqk, dv) in SHAPES.items() for s in (1024, 4096, 16384)
                        for r in bench_point(name, dqk, dv, s, None, a.budget)]
        save()
        out["decode"] = []
        for b, t in ((1, 384), (32, 384), (1, 4096), (32, 4096)):  # gpu-small's naive MLA decode: 16 heads, 96/64
            try:
                out["decode"].append(decode_point(b, 16, t, 96, 64))
            except Exception as e:
                out["decode"].append(dict(batch=b, cached=t, error=repr(e)[:300]))
            save()
    save()
    if out.get("bench"):
        print(table(out))
