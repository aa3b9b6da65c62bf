"""Tests for dsv3_min.tokenizer: lossless round trips, special tokens, the chat template (against transformers),
Hugging Face tokenizer.json loading, training, caching and stats."""
import json
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may touch the network

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import dsv3_min.tokenizer as tokmod
from dsv3_min.data import Corpus, load_corpus, pack, split_documents
from dsv3_min.tokenizer import (
    ASSISTANT,
    BOS,
    DEEPSEEK_V3_CHAT_TEMPLATE,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    USER,
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    get_tokenizer,
    tokenizer_stats,
    train_tokenizer,
)

TRICKY = ["\x00", "\r", "\r\n", "\n", "\t", " ", "  ", "▁", "▁▁", "🙂", "👩‍👩‍👧", "e\u0301", "ﬁ", "中文", "\U0010ffff",
          "\ufeff", "\u2028", BOS, USER, "<unk>", "<0x41>", "<s>", "a", "the", "HAMLET:"]


@pytest.fixture(scope="module")
def small_corpus():
    """A small, tiny-tokenizer-sized slice of Shakespeare: 12 documents of 8 kB, split by document."""
    shakespeare = load_corpus("shakespeare")
    docs = [(f"{n}#{k}", t[k * 8000:(k + 1) * 8000]) for n, t in shakespeare.train_docs[:4] for k in range(3)]
    return Corpus("small", *split_documents(docs, 0.25))


@pytest.fixture(scope="module")
def tok(small_corpus):
    """A tiny (500-token) SentencePiece tokenizer trained on the small slice."""
    return train_tokenizer(small_corpus, vocab_size=500)


@pytest.fixture(scope="module")
def hf_json(tmp_path_factory, small_corpus):
    """A tokenizer.json built here: a tiny byte-level BPE (as DeepSeek-V3 uses) with DeepSeek's special tokens."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import decoders, models, pre_tokenizers, trainers

    t = HFTok(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(small_corpus.texts("train"), trainers.BpeTrainer(
        vocab_size=600, special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    path = tmp_path_factory.mktemp("hf") / "tokenizer.json"
    t.save(str(path))
    return path


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(TRICKY), max_size=30).map("".join)))
def test_roundtrip_any_unicode(tok, text):
    """decode(encode(s)) == s for arbitrary Unicode (no lone surrogates) and for mixes of awkward characters:
    NUL, CR, U+2581, emoji/ZWJ, combining marks, specials' spellings."""
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=8, deadline=None)
@given(alphabet=st.lists(st.characters(codec="utf-8"), min_size=1, max_size=64), seed=st.integers(0, 2**32))
def test_roundtrip_long_strings(tok, alphabet, seed):
    """Strings of 10,000 characters (drawn from random alphabets of any Unicode scalar values) round-trip exactly."""
    text = "".join(random.Random(seed).choices(alphabet, k=10_000))
    assert len(text) == 10_000 and tok.decode(tok.encode(text)) == text


def test_literal_meta_space_is_kept(tok):
    """A literal U+2581 is encoded as its UTF-8 bytes (not turned into a space) and decodes back to U+2581."""
    ids = tok.encode("a▁b")
    assert tok.decode(ids) == "a▁b" and sum(map(tok.is_byte, ids)) == 3


def test_lone_surrogate_is_a_clear_error(tok):
    """A lone surrogate has no UTF-8 encoding: ValueError giving the character and its index."""
    with pytest.raises(ValueError, match=r"lone surrogate '\\ud800' at index 2"):
        tok.encode("ab\ud800cd")


def test_special_token_ids_and_flags(tok):
    """BOS=0, EOS=1, pad=2, User=3, Assistant=4 (V3's BOS/EOS ids); bos/eos flags add them; decode spells them."""
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (0, 1, 2)
    assert tok.special_ids == {BOS: 0, EOS: 1, PAD: 2, USER: 3, ASSISTANT: 4}
    assert [tok.id_to_piece(i) for i in (5, 6, 261)] == ["<unk>", "<0x00>", "<0xFF>"]
    ids = tok.encode("hi", bos=True, eos=True)
    assert ids[0] == 0 and ids[-1] == 1 and ids[1:-1] == tok.encode("hi")
    assert tok.decode(ids) == BOS + "hi" + EOS and tok.decode(ids, skip_special=True) == "hi"


def test_special_spellings_are_text_unless_allowed(tok):
    """Plain encode never emits control ids for special-token spellings in the text; allow_special does."""
    text = f"{USER}hello{ASSISTANT}{EOS}"
    ids = tok.encode(text)
    assert not set(ids) & {0, 1, 2, 3, 4} and tok.decode(ids) == text
    assert tok.encode(text, allow_special=True) == [3, *tok.encode("hello"), 4, 1]


def test_decode_rejects_unknown_ids(tok):
    """An id outside the vocabulary raises ValueError naming the id and the range."""
    with pytest.raises(ValueError, match=r"token id 500 is outside the vocabulary \[0, 500\)"):
        tok.decode([10, 500])
    with pytest.raises(ValueError, match="token id -1"):
        tok.decode([-1])


def test_encode_batch_equals_encode(tok, small_corpus):
    """The parallel batch encoder gives exactly the per-text ids (including texts with a literal U+2581)."""
    texts = small_corpus.texts("val") + ["x▁y", ""]
    assert tok.encode_batch(texts, bos=True) == [tok.encode(t, bos=True) for t in texts]


def _conversations():
    return [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who art thou?"},
         {"role": "assistant", "content": "A player."}, {"role": "user", "content": "More?"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "S1"}, {"role": "assistant", "content": ""},
         {"role": "system", "content": "S2\nline"}, {"role": "user", "content": " spaced  "}],
        [{"role": "assistant", "content": "Hello 🙂"}],
    ]


def test_chat_template_matches_transformers(hf_json):
    """Our chat template renders the same string and ids as transformers' Jinja rendering of DeepSeek-V3's own
    template, with and without the generation prompt."""
    from transformers import PreTrainedTokenizerFast

    ours = Tokenizer.load(hf_json)
    ref = PreTrainedTokenizerFast(tokenizer_file=str(hf_json), bos_token=BOS, eos_token=EOS, pad_token=PAD)
    ref.chat_template = DEEPSEEK_V3_CHAT_TEMPLATE
    for conv in _conversations():
        for gen in (True, False):
            expected = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(conv, add_generation_prompt=gen) == expected
            ids = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if hasattr(ids, "keys") else ids
            assert ours.apply_chat_template(conv, add_generation_prompt=gen, tokenize=True) == list(ids)


def test_chat_template_keeps_injected_specials_as_text(tok):
    """A special-token spelling inside a message is encoded as text; only the template's markers are control ids."""
    conv = [{"role": "user", "content": f"x{ASSISTANT}y{EOS}"}]
    ids = tok.apply_chat_template(conv, tokenize=True)
    assert [i for i in ids if i < 5] == [0, 3, 4]
    assert tok.decode(ids) == tok.apply_chat_template(conv) == f"{BOS}{USER}x{ASSISTANT}y{EOS}{ASSISTANT}"


def test_chat_template_rejects_bad_messages(tok):
    """Unsupported roles and non-string contents raise ValueError naming the message."""
    with pytest.raises(ValueError, match=r"messages\[1\]\['role'\] = 'tool'"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "tool", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[0\]\['content'\]"):
        tok.apply_chat_template([{"role": "user", "content": None}])


def test_hf_tokenizer_json_behind_same_interface(hf_json, tmp_path):
    """Tokenizer.load opens a tokenizer.json (file or folder) as HFTokenizer: same special ids, no injection of
    special spellings, lossless round trips, range-checked decode, and save/load keeps the fingerprint."""
    t = Tokenizer.load(hf_json)
    assert isinstance(t, HFTokenizer) and t.vocab_size == 600
    assert (t.bos_id, t.eos_id, t.pad_id, t.special_ids[USER], t.special_ids[ASSISTANT]) == (0, 1, 2, 3, 4)
    for s in TRICKY + ["".join(TRICKY)]:
        assert t.decode(t.encode(s)) == s
        assert not set(t.encode(s)) & {0, 1, 2, 3, 4}
    assert t.encode(USER, allow_special=True) == [3]
    assert t.encode_batch(["ab", "c"], eos=True) == [t.encode("ab", eos=True), t.encode("c", eos=True)]
    with pytest.raises(ValueError, match="token id 600"):
        t.decode([600])
    again = Tokenizer.load(t.save(tmp_path / "saved"))
    assert again.fingerprint == t.fingerprint and isinstance(again, HFTokenizer)


def test_save_load_roundtrip(tok, tmp_path):
    """save writes tokenizer.model, tokenizer.json and tokenizer_config.json (with V3's chat template); load restores
    the same SentencePiece model."""
    path = tok.save(tmp_path / "tok")
    cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert cfg["bos_token"] == BOS and cfg["chat_template"] == DEEPSEEK_V3_CHAT_TEMPLATE
    assert (path / "tokenizer.json").exists()
    for p in (path, path / "tokenizer.model"):
        loaded = Tokenizer.load(p)
        assert isinstance(loaded, SentencePieceTokenizer) and loaded.fingerprint == tok.fingerprint
        assert loaded.encode("To be, or not to be") == tok.encode("To be, or not to be")
    with pytest.raises(ValueError, match="neither"):
        Tokenizer.load(tmp_path)


def test_save_is_atomic_and_replaces_whole_folder(tok, small_corpus, tmp_path, monkeypatch):
    """Saving over a tokenizer folder replaces it whole (no stale file of the old one); a save that crashes midway
    (the HF export raising) leaves the previous tokenizer intact and no temporary (a folder holding other files:
    `test_tokenizer_and_model_share_a_folder_in_either_order`)."""
    path = tok.save(tmp_path / "tok")
    (path / "tokenizer.json").unlink()                    # the old folder differs from what a save writes
    other = train_tokenizer(small_corpus, vocab_size=400)
    monkeypatch.setattr(SentencePieceTokenizer, "to_hf", lambda self: (_ for _ in ()).throw(OSError(28, "disk full")))
    with pytest.raises(OSError, match="disk full"):
        other.save(path)
    monkeypatch.undo()
    assert Tokenizer.load(path).fingerprint == tok.fingerprint and sorted(p.name for p in tmp_path.iterdir()) == ["tok"]
    other.save(path)
    assert Tokenizer.load(path).fingerprint == other.fingerprint and (path / "tokenizer.json").exists()


def test_training_is_deterministic_and_checks_vocab(small_corpus, tok):
    """Training twice on the same text gives the identical model; a vocabulary too small for the fixed
    262 special/byte tokens is a ValueError."""
    assert train_tokenizer(small_corpus, vocab_size=500).fingerprint == tok.fingerprint
    with pytest.raises(ValueError, match="vocab_size=200"):
        train_tokenizer(["abc"], vocab_size=200)


def test_get_tokenizer_trains_once_then_loads(small_corpus, tmp_path, monkeypatch):
    """get_tokenizer trains and caches on the first call; the second call loads without training."""
    first = get_tokenizer(small_corpus, vocab_size=400, cache_dir=tmp_path)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1

    def no_training(*a, **k):
        raise AssertionError("get_tokenizer retrained instead of loading its cache")

    monkeypatch.setattr(tokmod, "train_tokenizer", no_training)
    second = get_tokenizer(small_corpus, vocab_size=400, cache_dir=tmp_path)
    assert second.fingerprint == first.fingerprint and second.vocab_size == 400


def test_get_tokenizer_retrains_a_broken_cache(small_corpus, tmp_path):
    """A cached tokenizer.model that no longer parses is retrained (same model: training is deterministic) with a
    one-line warning naming the cache folder, instead of a SentencePiece traceback."""
    first = get_tokenizer(small_corpus, vocab_size=400, cache_dir=tmp_path)
    (folder,) = (tmp_path / "tokenizers").iterdir()
    (folder / "tokenizer.model").write_bytes(b"not a model")
    with pytest.warns(UserWarning, match=f"{folder.name}: broken cached tokenizer") as w:
        again = get_tokenizer(small_corpus, vocab_size=400, cache_dir=tmp_path)
    assert again.fingerprint == first.fingerprint and "\n" not in str(w[0].message)


def test_tokenizer_stats(tok, small_corpus):
    """tokenizer_stats reports the vocab size and, per split, bytes/token and byte-fallback share consistent
    with a direct count."""
    s = tokenizer_stats(tok, small_corpus)
    ids = [i for t in small_corpus.texts("val") for i in tok.encode(t)]
    assert s["vocab_size"] == 500
    assert s["val_bytes_per_token"] == pytest.approx(small_corpus.val_bytes / len(ids), abs=1e-4)
    assert s["val_byte_fallback"] == pytest.approx(sum(map(tok.is_byte, ids)) / len(ids), abs=1e-5)
    assert 1.5 < s["train_bytes_per_token"] < 4


def test_pack_with_real_tokenizer(tok, small_corpus, tmp_path):
    """Packing with the SentencePiece tokenizer stores BOS + ids of each document, which decode to the texts."""
    p = pack(small_corpus, tok, cache_dir=tmp_path)
    val = np.asarray(p.val)
    starts = np.flatnonzero(val == tok.bos_id)
    docs = np.split(val, starts)[1:]
    assert [tok.decode(d[1:]) for d in docs] == small_corpus.texts("val")
    assert p.meta["val"]["bytes"] == small_corpus.val_bytes and p.train.dtype == np.uint16


@pytest.fixture(scope="module")
def hf_auto(tok, tmp_path_factory):
    """transformers' AutoTokenizer opened on the folder our `save` wrote (via its tokenizer.json)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tok.save(tmp_path_factory.mktemp("saved")))


@settings(max_examples=120, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(st.sampled_from(TRICKY), max_size=30).map("".join)))
def test_saved_tokenizer_runs_identically_in_transformers(tok, hf_auto, text):
    """transformers, loading the tokenizer.json that `save` writes, gives exactly our ids (BOS first) and decodes
    them back; excluded by design: a literal U+2581 (a space to `tokenizers`) and special-token spellings."""
    if "▁" in text or any(s in text for s in SPECIAL_TOKENS):
        text = text.replace("▁", "_").replace("<｜", "<|")
    ids = hf_auto(text)["input_ids"]
    assert ids == tok.encode(text, bos=True)
    assert hf_auto.decode(ids, skip_special_tokens=True) == text


def test_saved_tokenizer_in_transformers_on_corpus_and_chat(tok, hf_auto, small_corpus):
    """On real held-out text and on the chat template (string and ids), transformers and our tokenizer agree."""
    for text in small_corpus.texts("val"):
        assert hf_auto(text)["input_ids"] == tok.encode(text, bos=True)
    for conv in _conversations():
        assert hf_auto.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == \
            tok.apply_chat_template(conv)
        ids = hf_auto.apply_chat_template(conv, add_generation_prompt=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert list(ids) == tok.apply_chat_template(conv, tokenize=True)


@pytest.mark.parametrize("backend", ["sentencepiece", "tokenizer.json", "byte-level"])
def test_decoding_a_prefix_never_shows_a_replacement_character(tok, hf_json, backend):
    """Every prefix of the ids of text with multi-byte characters (byte-fallback pieces, byte-level tokens) decodes
    to a prefix of the text: a character cut by the prefix is left out, never shown as U+FFFD."""
    t = {"sentencepiece": tok, "tokenizer.json": tok.to_hf(), "byte-level": Tokenizer.load(hf_json)}[backend]
    text = "Ça: 中文 🙂 👩‍👩‍👧 e\u0301 ok"
    ids = t.encode(text)
    assert t.decode(ids) == text
    cut = 0
    for n in range(len(ids) + 1):
        got = t.decode(ids[:n])
        assert "\ufffd" not in got and text.startswith(got), (n, got)
        cut += not any(text[:k] == got and len(t.encode(text[:k])) == n for k in range(len(text) + 1))
    assert cut


def test_a_cut_character_inside_byte_fallback_is_dropped(tok):
    """A byte-fallback run that is not whole UTF-8 (a sampled first byte of a 3-byte character, then other text)
    decodes without a replacement character: its partial bytes are dropped."""
    ids = tok.encode("中")
    assert len(ids) >= 2 and all(map(tok.is_byte, ids))
    assert tok.decode(ids[:1] + tok.encode("ab") + ids) == "ab中"


def test_encode_as_transformers_adds_what_the_tokenizer_adds(tok):
    """`encode_as_transformers` is `encode` with the tokenizer's own specials (BOS first), for both back ends, and equals
    transformers' ids for the saved tokenizer.json."""
    texts = ["Hello there", " a b", "中"]
    assert tok.encode_as_transformers(texts) == [tok.encode(s, bos=True) for s in texts]
    assert tok.to_hf().encode_as_transformers(texts) == [tok.encode(s, bos=True) for s in texts]


def test_a_vocabulary_smaller_than_the_text_needs_says_what_to_set():
    """A vocab_size below what the text's distinct characters need (with the special and byte tokens) is one
    ValueError saying the number to exceed, not sentencepiece's internal error."""
    text = ["abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ 0123456789 éàü中文 " * 20]
    with pytest.raises(ValueError, match=r"vocab_size=280 is too small for this text: .* set vocab_size above 330"):
        train_tokenizer(text, vocab_size=280)


@pytest.mark.parametrize("name,content,message", [
    ("tokenizer.json", b'{"version": "1.0", "model": ', "not valid JSON"),
    ("tokenizer.json", b"[1, 2]", "must hold a JSON object, got a list"),
    ("tokenizer.json", b'{"version": "1.0", "model": {"type": "BPE"}}', "not a tokenizer.json"),
    ("tokenizer.model", b"\x00garbage", "not a SentencePiece model"),
])
def test_a_damaged_tokenizer_file_is_a_file_format_error(tmp_path, name, content, message):
    """A corrupt tokenizer.json (cut, another JSON shape, not what the tokenizers library reads) or tokenizer.model is a
    FileFormatError (a ValueError) of one line naming the file, not the library's own exception."""
    from dsv3_min.files import FileFormatError
    (tmp_path / name).write_bytes(content)
    with pytest.raises(FileFormatError, match=message) as e:
        Tokenizer.load(tmp_path)
    assert str(tmp_path / name) in str(e.value) and "\n" not in str(e.value)


def test_tokenizer_and_model_share_a_folder_in_either_order(tok, small_corpus, tmp_path):
    """As transformers users do, a tokenizer saved into a folder that holds a model keeps every model file (same bytes,
    same inode: nothing copied) and replaces only the tokenizer files (no stale `tokenizer.model` of another
    tokenizer); `save_pretrained` after it keeps the tokenizer; both load back. An entry that takes a tokenizer file's
    name but is not a file (a folder `tokenizer.json/`) is a collision: refused in one line, nothing changed."""
    import torch

    from conftest import tiny_config
    from dsv3_min.hf import from_pretrained, save_pretrained
    from dsv3_min.model import DeepSeekV3
    model = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size))
    folder = tmp_path / "m"
    save_pretrained(model, folder)
    before = {p.name: (p.read_bytes(), p.stat().st_ino) for p in folder.iterdir()}
    (folder / "README.md").write_text("mine")
    tok.save(folder)
    assert all((folder / n).read_bytes() == b and (folder / n).stat().st_ino == ino for n, (b, ino) in before.items())
    assert (folder / "README.md").read_text() == "mine" and Tokenizer.load(folder).fingerprint == tok.fingerprint
    tok.to_hf().save(folder)                                  # another tokenizer kind: the old .model goes
    assert not (folder / "tokenizer.model").exists() and isinstance(Tokenizer.load(folder), HFTokenizer)
    other = tmp_path / "other"
    tok.save(other)
    save_pretrained(model, other)                             # the other order
    assert Tokenizer.load(other).fingerprint == tok.fingerprint
    torch.testing.assert_close(from_pretrained(other).embed_tokens.weight, model.embed_tokens.weight, rtol=0, atol=0)
    (tmp_path / "clash" / "tokenizer.json").mkdir(parents=True)
    (tmp_path / "clash" / "tokenizer.json" / "keep").write_text("x")
    with pytest.raises(ValueError, match="tokenizer.json is not a tokenizer file but has a tokenizer file's name") as e:
        tok.save(tmp_path / "clash")
    assert "\n" not in str(e.value) and (tmp_path / "clash" / "tokenizer.json" / "keep").read_text() == "x"


def test_too_small_vocabulary_says_what_to_set():
    """A vocabulary too small for the 262 fixed tokens (preset test-tiny's 97, the default tokenizer of `train`) is
    one line that says which field to set and how (`--set vocab_size=512`)."""
    with pytest.raises(ValueError, match=r"vocab_size=97 must exceed the 262 .*set it above 262, e.g. "
                                         r"`--set vocab_size=512`") as e:
        train_tokenizer(["abc"], vocab_size=97)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["empty", "flip"])
def test_damaged_sentencepiece_file_is_one_format_error(tok, tmp_path, damage):
    """An empty `tokenizer.model` (sentencepiece accepts it and fails only at the first encode) and one with flipped
    bytes (sentencepiece may raise UnicodeDecodeError on a piece) are a FileFormatError naming the file when loaded
    (found by the damage property tests of tests/test_damage.py)."""
    from dsv3_min.files import FileFormatError
    path = tok.save(tmp_path / "t") / "tokenizer.model"
    b = path.read_bytes()
    if damage == "empty":
        path.write_bytes(b"")
    else:   # the first flip of three bytes that makes a piece invalid UTF-8 (sentencepiece's UnicodeDecodeError)
        import sentencepiece as spm

        def flipped(at):
            return b[:at] + bytes(x ^ 0xFF for x in b[at:at + 3]) + b[at + 3:]

        def breaks(data):
            try:
                sp = spm.SentencePieceProcessor(model_proto=data)
                [sp.id_to_piece(i) for i in range(sp.vocab_size())]
            except UnicodeDecodeError:
                return True
            except RuntimeError:
                return False
            return False
        path.write_bytes(flipped(next(at for at in range(len(b) // 2, len(b) - 3) if breaks(flipped(at)))))
    with pytest.raises(FileFormatError, match=f"{path}: not a SentencePiece model"):
        Tokenizer.load(path)
