"""Run a script in Triton's CPU interpreter: TRITON_INTERPRET is read when kernels are decorated (at import), so a
test's cases run in one subprocess that has it set, and print their results as one `RESULT<json>` line."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None


def interpreter_run(script: str, timeout: int = 300) -> dict:
    "The JSON after `RESULT` in `script`'s output, run with TRITON_INTERPRET=1; skip where triton is not installed."
    if not HAS_TRITON:
        pytest.skip("triton not installed")
    env = dict(os.environ, TRITON_INTERPRET="1")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("RESULT", 1)[1])
