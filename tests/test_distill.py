"""Distillation (notebook 37): the KD loss against its formula, its conventions, online vs offline teacher, top-K."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_config
from dsv3_min.config import count_params, get_preset
from dsv3_min.data import get_batch
from dsv3_min.distill import (
    DistillConfig,
    DistillLoss,
    OnlineTeacher,
    TeacherCache,
    distill,
    init_from_teacher,
    kd_full,
    kd_loss,
    kd_topk,
    student_config,
    teacher_topk,
    write_teacher_cache,
)
from dsv3_min.model import DeepSeekV3
from dsv3_min.train import TrainConfig, TrainData, read_metrics


def _direct(s, t, y, T, alpha):
    "α·T²·mean_pos Σ_v p(log p − log q) + (1−α)·mean_pos(−log q¹_y), one position at a time in float64."
    total, n = 0.0, 0
    for pos in np.ndindex(*y.shape):
        p = torch.softmax(t[pos].double() / T, 0)
        q = torch.softmax(s[pos].double() / T, 0)
        q1 = torch.softmax(s[pos].double(), 0)
        total += alpha * T * T * float((p * (p.log() - q.log())).sum()) - (1 - alpha) * float(q1[y[pos]].log())
        n += 1
    return total / n


@pytest.mark.parametrize("T,alpha", [(1.0, 0.5), (2.0, 0.3), (4.0, 1.0), (0.5, 0.9)])
def test_kd_loss_equals_its_formula(T, alpha):
    """kd_loss (full vocabulary) equals α·T²·KL(softmax(t/T) || softmax(s/T)) + (1−α)·CE computed directly."""
    s, t = torch.randn(2, 6, 13) * 3, torch.randn(2, 6, 13) * 3
    y = torch.randint(0, 13, (2, 6))
    assert float(kd_loss(s, y, t, T, alpha).loss) == pytest.approx(_direct(s, t, y, T, alpha), rel=1e-5, abs=1e-6)


def test_topk_bucket_equals_its_formula():
    """Top-K KD is the KL over the teacher's K largest probabilities plus one rest bucket (its remaining mass),
    the student folded the same way (its mass outside those K ids), × T², computed directly here."""
    s, t, T, K = torch.randn(3, 17) * 2, torch.randn(3, 17) * 2, 1.5, 4
    want = 0.0
    for i in range(3):
        p, q = torch.softmax(t[i].double() / T, 0), torch.softmax(s[i].double() / T, 0)
        top = p.argsort(descending=True)[:K]
        pk = torch.cat([p[top], (1 - p[top].sum())[None]])
        qk = torch.cat([q[top], (1 - q[top].sum())[None]])
        want += T * T * float((pk * (pk / qk).log()).sum()) / 3
    ids, logp = teacher_topk(t, K, T)
    assert logp.shape == (3, K + 1) and float(logp.exp().sum(-1).sub(1).abs().max()) < 1e-6
    assert float(kd_topk(s, ids, logp, T)) == pytest.approx(want, rel=1e-5)


def test_alpha_zero_is_plain_ce():
    """Convention: kd_alpha weighs the KD term, so kd_alpha=0 is exactly the plain hard-label CE, and DistillLoss
    on a dense student then equals the student's own training loss (`model.loss`)."""
    s, t, y = torch.randn(2, 5, 11), torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
    assert torch.equal(kd_loss(s, y, t, 2.0, 0.0).loss, F.cross_entropy(s.flatten(0, 1), y.flatten()))
    cfg = student_config(tiny_config())
    student = DeepSeekV3(cfg)
    x, yy = torch.randint(0, cfg.vocab_size, (2, 8)), torch.randint(0, cfg.vocab_size, (2, 8))
    never = lambda x, i: pytest.fail("the teacher must not run at kd_alpha=0")  # noqa: E731
    got = DistillLoss(never, DistillConfig(kd_alpha=0.0))(student, x, yy).loss
    assert torch.allclose(got, student.loss(x, yy).loss, atol=1e-6)
    assert not torch.allclose(kd_loss(s, y, t, 2.0, 0.5).loss, got)  # the mix is not CE


def test_student_equal_to_teacher_at_T1_has_zero_kd():
    """With T=1, a student whose logits equal the teacher's has KD loss 0 (full and top-K); a different one does not."""
    t, y = torch.randn(2, 7, 19) * 4, torch.randint(0, 19, (2, 7))
    assert abs(float(kd_loss(t, y, t, 1.0, 1.0).kd)) < 1e-6
    assert abs(float(kd_topk(t, *teacher_topk(t, 5, 1.0), 1.0))) < 1e-6
    assert float(kd_loss(t + torch.randn_like(t), y, t, 1.0, 1.0).kd) > 1e-2


def test_topk_with_k_equal_vocab_is_the_full_kl():
    """Top-K with K = vocab equals the full KL (the rest bucket is empty), at several temperatures; K < V is smaller."""
    s, t = torch.randn(3, 4, 23) * 3, torch.randn(3, 4, 23) * 3
    for T in (0.7, 1.0, 2.0):
        full = kd_full(s, t, T)
        assert float(kd_topk(s, *teacher_topk(t, 23, T), T)) == pytest.approx(float(full), rel=1e-5)
        assert float(kd_topk(s, *teacher_topk(t, 5, T), T)) < float(full)


def _pair(**student_overrides):
    torch.manual_seed(0)
    teacher = DeepSeekV3(tiny_config()).eval()
    student = DeepSeekV3(student_config(teacher.config, **student_overrides))
    tokens = np.random.default_rng(0).integers(0, teacher.config.vocab_size, 3000).astype(np.uint16)
    return teacher, student, tokens


def test_online_and_offline_teacher_give_the_same_loss(tmp_path):
    """The offline cache (float32 log-probs) gives the same KD loss as the online teacher, micro-batch by micro-batch,
    and refuses a batch it was not written for."""
    teacher, student, tokens = _pair()
    dc = DistillConfig(kd_topk=8, kd_temperature=2.0, kd_alpha=0.7)
    write_teacher_cache(teacher, tokens, tmp_path / "c", 4, 2, 16, seed=3, k=8, temperature=2.0,
                        logp_dtype="float32", progress=False)
    online = DistillLoss(OnlineTeacher(teacher, 8, 2.0), dc, start_index=1)
    offline = DistillLoss(TeacherCache(tmp_path / "c"), dc, start_index=1)
    for i in range(1, 4):
        x, y = get_batch(tokens, i, 2, 16, 3)
        a, b = online(student, x, y), offline(student, x, y)
        assert float(a.mtp.detach()) > 0 and torch.allclose(a.loss, b.loss, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="differs from the cached inputs"):
        TeacherCache(tmp_path / "c")(get_batch(tokens, 2, 2, 16, 3)[0], 1)


def test_truncated_cache_is_refused(tmp_path):
    """A cache file of the wrong size is a one-line ValueError naming it."""
    teacher, _, tokens = _pair()
    write_teacher_cache(teacher, tokens, tmp_path / "c", 2, 2, 8, 0, 4, progress=False)
    f = tmp_path / "c" / "logp.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"logp\.bin.*expected"):
        TeacherCache(tmp_path / "c")


def _data(tokens):
    return TrainData(None, tokens[:2500], tokens[2500:], 0.5)


def test_distill_runs_online_and_offline_alike_and_resumes(tmp_path):
    """Through the training loop: online and offline (float32 cache) runs log the same losses step by step, and a run
    stopped at step 2 then resumed logs the same losses as one uninterrupted run (the cache index follows)."""
    teacher, _, tokens = _pair()
    tc = TrainConfig(max_steps=4, batch_size=2, seq_len=16, grad_accum=2, warmup=1, eval_every=2, eval_batches=1,
                     final_eval_batches=1, threads=1, device="cpu", seed=1)
    dc = DistillConfig(kd_topk=8, kd_temperature=2.0, kd_alpha=0.5)
    write_teacher_cache(teacher, _data(tokens).train, tmp_path / "c", 8, 2, 16, 1, 8, 2.0, "float32", progress=False)
    scfg = student_config(teacher.config)
    run = lambda out, **kw: distill(teacher, scfg, kw.pop("tc", tc), dc, tmp_path / out, data=_data(tokens),  # noqa
                                    progress=False, log=lambda *a: None, **kw)
    run("on")
    run("off", cache=tmp_path / "c")
    run("part", cache=tmp_path / "c", tc=TrainConfig(**{**tc.__dict__, "stop_at": 2}))
    run("part", cache=tmp_path / "c", resume=True)
    on, off, part = ([r["loss"] for r in read_metrics(tmp_path / d)] for d in ("on", "off", "part"))
    assert len(on) == 4 and np.allclose(on, off, atol=1e-5, rtol=0)
    assert np.allclose(part, off, atol=1e-6, rtol=0)
    assert on[-1] < on[0]


def test_student_config_is_dense_small_and_shares_the_vocab():
    """The default student of gpu-small is dense GQA+SwiGLU without MTP, ≤ 1/4 of the teacher's parameters, same vocab;
    the truncated-copy init copies leading slices of same-named tensors."""
    t = get_preset("gpu-small")
    s = student_config(t)
    assert s.attention == "gqa" and s.first_k_dense_replace == s.num_hidden_layers and s.num_nextn_predict_layers == 0
    assert s.vocab_size == t.vocab_size and count_params(s).total <= count_params(t).total / 4
    teacher, student, _ = _pair()
    names = init_from_teacher(student, teacher)
    assert "embed_tokens.weight" in names
    w = teacher.embed_tokens.weight
    assert torch.equal(student.embed_tokens.weight, w[:, : student.config.hidden_size])
    assert math.isclose(float(student.layers[0].mlp.down_proj.weight[0, 0]),
                        float(teacher.layers[0].mlp.down_proj.weight[0, 0]))


def test_bad_settings_are_refused():
    """Bad KD settings and a vocabulary mismatch are one-line ValueErrors naming the field."""
    with pytest.raises(ValueError, match="kd_alpha"):
        DistillConfig(kd_alpha=1.5)
    with pytest.raises(ValueError, match="kd_temperature"):
        DistillConfig(kd_temperature=0.0)
    with pytest.raises(ValueError, match="kd_topk"):
        teacher_topk(torch.randn(2, 5), 6, 1.0)
    teacher, _, tokens = _pair()
    tc = TrainConfig(max_steps=1, batch_size=2, seq_len=8, device="cpu")
    with pytest.raises(ValueError, match="vocab_size"):
        distill(teacher, student_config(teacher.config, vocab_size=50), tc, DistillConfig(), "/nonexistent/x",
                data=_data(tokens), progress=False)


def test_command_line_configs():
    """`distill` arguments: --set splits into ModelConfig/TrainConfig/DistillConfig fields, 'auto' derives the student,
    --cache without kd_topk and unknown fields are one-line ValueErrors."""
    import argparse

    from dsv3_min.__main__ import add_distill_arguments, distill_configs
    p = add_distill_arguments(argparse.ArgumentParser())
    t = tiny_config()
    a = p.parse_args(["--teacher", "t", "--out", "o", "--max-steps", "7", "--set", "kd_topk=4", "kd_alpha=1",
                      "num_hidden_layers=1", "lr=0.01"])
    cfg, tc, dc = distill_configs(a, t)
    assert (dc.kd_topk, dc.kd_alpha, cfg.num_hidden_layers, cfg.hidden_size, tc.lr, tc.max_steps) == (
        4, 1.0, 1, student_config(t).hidden_size, 0.01, 7)
    with pytest.raises(ValueError, match="kd_topk"):
        distill_configs(p.parse_args(["--teacher", "t", "--out", "o", "--cache", "c"]), t)
    with pytest.raises(ValueError, match="did you mean .kd_alpha."):
        distill_configs(p.parse_args(["--teacher", "t", "--out", "o", "--set", "kd_alhpa=1"]), t)


def test_a_folder_that_is_not_a_cache_is_never_replaced(tmp_path, capsys):
    """`write_teacher_cache` into a non-empty folder without a cache's header refuses and leaves its files; the
    `distill --cache` command refuses it (and an --out that holds no run) before the teacher loads."""
    from dsv3_min.__main__ import main
    teacher, _, tokens = _pair()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="holds no teacher cache"):
        write_teacher_cache(teacher, tokens, mine, 2, 2, 8, 0, 4, progress=False)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "keep me"
    no_teacher = str(tmp_path / "no-such-teacher")  # refused before this is looked at
    argv = ["distill", "--teacher", no_teacher, "--out", str(tmp_path / "o"), "--cache", str(mine), "--set",
            "kd_topk=4"]
    assert main(argv) == 2 and "holds no teacher cache" in capsys.readouterr().err
    assert main(["distill", "--teacher", no_teacher, "--out", str(mine)]) == 2
    assert "holds no run" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_a_cache_shorter_than_the_run_is_one_line_before_training(tmp_path):
    """A teacher cache of 2 micro-batches for a run of 4 steps x 2 micro-batches is a ValueError saying how many it
    holds and needs, raised before the first step (no metrics written)."""
    teacher, _, tokens = _pair()
    write_teacher_cache(teacher, _data(tokens).train, tmp_path / "c", 2, 2, 16, 1, 8, 2.0, progress=False)
    tc = TrainConfig(max_steps=4, batch_size=2, seq_len=16, grad_accum=2, warmup=1, threads=1, device="cpu", seed=1)
    with pytest.raises(ValueError, match="holds 2 micro-batches, this run needs 8"):
        distill(teacher, student_config(teacher.config), tc, DistillConfig(kd_topk=8, kd_temperature=2.0),
                tmp_path / "run", data=_data(tokens), cache=tmp_path / "c", progress=False, log=lambda *a: None)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_two_distills_started_at_once_one_writes_the_other_is_refused_before_writing(tmp_path, monkeypatch):
    """Two `distill` runs into the same new --out, held until both have passed their checks: the one that takes the
    run lock writes; the other is refused (`being written by another process`) without having written any file."""
    from test_finetune import _race

    import dsv3_min.distill as dm
    import dsv3_min.train as tr
    teacher, _, tokens = _pair()
    tc = TrainConfig(max_steps=2, batch_size=2, seq_len=16, warmup=1, eval_every=2, eval_batches=1,
                     final_eval_batches=1, threads=1, device="cpu", seed=1)
    go = lambda: distill(teacher, student_config(teacher.config), tc, DistillConfig(kd_topk=8), tmp_path / "run",  # noqa
                         data=_data(tokens), progress=False, log=lambda *a: None)
    outcome, wrote = _race({"a": go, "b": go}, (dm, "resolve_device"),
                           [(dm, "write_json"), (tr, "write_json"), (tr, "append_jsonl")], monkeypatch)
    errors = {n: e for n, e in outcome.items() if e is not None}
    assert len(errors) == 1, outcome
    (loser, e), = errors.items()
    assert isinstance(e, FileExistsError) and "being written by another process" in str(e)
    assert wrote == {"a", "b"} - {loser}, wrote
