"""The GPU corpus (dsv3_min.gpu_mix, notebook 26): extracting the Debian texts and reading the packed tokens back;
and the GPU bench scripts are plain command lines on a CPU machine."""
import json
import lzma
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsv3_min import gpu_mix

_BENCH = Path(__file__).resolve().parents[1] / "bench"

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
    docs = gpu_mix.gcide_docs(DICTD, doc_chars=10**6)
    assert len(docs) == 1 and docs[0][0] == "gcide-0000.txt"
    text = docs[0][1]
    assert text.startswith("A \\A\\ (named") and "licence" not in text and "00-database" not in text
    assert "[1913 Webster]" not in text and "[WordNet" not in text
    assert "Therefore came I to them aback. --Chaucer." in text and text.rstrip().endswith("malt beverage.")
    small = gpu_mix.gcide_docs(DICTD, doc_chars=1)
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
    big = gpu_mix.MAX_PY_BYTES + 1
    root = _touch(tmp_path, {"usr/lib/python3/dist-packages/sympy/core/basic.py": 10,
                             "usr/lib/python3/dist-packages/sympy/core/tests/test_basic.py": 10,
                             "usr/lib/python3/dist-packages/sympy/integrals/rubi/rules/sine.py": 10,
                             "usr/lib/python3/dist-packages/sympy/polys/benchmarks/bench_solvers.py": 10,
                             "usr/lib/python3/dist-packages/sympy/physics/huge_table.py": big,
                             "usr/lib/python3/dist-packages/sympy/core/data.json": 10,
                             "usr/share/doc/python3-sympy/copyright": 10})
    got = [name for name, _ in gpu_mix._python_sources(root)]
    assert got == ["sympy/core/basic.py", "sympy/core/tests/test_basic.py"]


def test_globbed_and_sphinx_rules_name_documents_below_their_folder(tmp_path):
    """`_globbed` names each match by its path below the pattern's fixed prefix; `_sphinx_sources` takes the reST
    sources of a Sphinx build, drops `.txt` and skips translations."""
    root = _touch(tmp_path, {"usr/share/perl/5.36.0/pod/perlre.pod": 5, "usr/share/perl/5.36.0/pod/x.html": 5,
                             "usr/share/doc/linux-doc/html/_sources/admin/index.rst.txt": 5,
                             "usr/share/doc/linux-doc/html/_sources/translations/it/index.rst.txt": 5})
    assert [n for n, _ in gpu_mix._globbed("usr/share/perl/*/pod/*.pod")(root)] == ["5.36.0/pod/perlre.pod"]
    assert [n for n, _ in gpu_mix._sphinx_sources(root)] == ["admin/index.rst"]


def test_every_listed_package_has_a_rule_and_unknown_ones_are_refused(tmp_path):
    """Each package of `DEBS` maps to a part of the mix (GCIDE has its own reader), and a .deb of any other package
    raises `ValueError` naming it before anything is unpacked."""
    parts = set(gpu_mix.PART_NAMES)
    for deb in gpu_mix.DEBS:
        rule = next((r for prefix, r in gpu_mix.DEB_RULES.items() if deb.startswith(prefix)), None)
        assert deb == "dict-gcide" or (rule is not None and rule[0].split("/")[0] in parts), deb
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "mine.txt").write_text("a user's file")
    with pytest.raises(ValueError, match="python-django-doc_3.2_all.deb"):
        gpu_mix.extract_debs([str(tmp_path / "dict-gcide_1.deb"), str(tmp_path / "python-django-doc_3.2_all.deb")],
                             tmp_path / "docs")
    assert (tmp_path / "docs" / "mine.txt").exists()   # refused before anything is unpacked or removed


def test_load_mix_reads_packed_tokens(tmp_path):
    """`load_mix` maps the carried uint16 splits, with the tokenizer and the sidecar's counts."""
    from dsv3_min.tokenizer import train_tokenizer
    tok = train_tokenizer(["to be or not to be, that is the question\n" * 50], vocab_size=300)
    tok.save(tmp_path / "tokenizer")
    ids = {"train": np.arange(100, dtype=np.uint16), "val": np.arange(40, dtype=np.uint16)}
    for s, a in ids.items():
        a.tofile(tmp_path / f"{s}.bin")
    meta = {"dtype": "uint16", "train": {"tokens": 100, "bytes": 350}, "val": {"tokens": 40, "bytes": 160}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    t, train, val, m = gpu_mix.load_mix(tmp_path, tmp_path / "unused")
    assert m == meta and np.array_equal(train, ids["train"]) and np.array_equal(val, ids["val"])
    assert t.vocab_size == tok.vocab_size
    assert not (tmp_path / "unused").exists()
    for s in ids:  # the carried form: xz-compressed splits, unpacked once into unzip_dir
        with open(tmp_path / f"{s}.bin", "rb") as src, lzma.open(tmp_path / f"{s}.bin.xz", "wb") as dst:
            dst.write(src.read())
        (tmp_path / f"{s}.bin").unlink()
    _, train, val, _ = gpu_mix.load_mix(tmp_path, tmp_path / "raw")
    assert np.array_equal(train, ids["train"]) and np.array_equal(val, ids["val"])
    assert (tmp_path / "raw" / "train.bin").stat().st_size == 200


@pytest.mark.parametrize("script", ["gpu_runs.py", "train_throughput.py", "eval_gpu.py"])
def test_bench_script_help_runs_on_cpu(script):
    """Each bench script is a plain command line that imports `dsv3_min` only: `--help` works on a CPU machine, run
    from any folder (no path set up for it)."""
    out = subprocess.run([sys.executable, str(_BENCH / script), "--help"], capture_output=True, text=True, cwd="/")
    assert out.returncode == 0 and out.stdout.startswith("usage:"), out.stderr[-2000:]
