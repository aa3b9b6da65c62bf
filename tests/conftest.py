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
