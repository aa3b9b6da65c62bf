"""The decode engine (`dsv3_min.infer`): static caches, left padding, EOS, MTP self-speculation (TINY configs)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_config
from dsv3_min.infer import generate, left_padding_starts
from dsv3_min.model import DeepSeekV3, reference_generate

KINDS = [{"mla_impl": "naive"}, {"mla_impl": "absorb"}, {"attention": "gqa", "num_key_value_heads": 2}]


def _recompute_greedy(m, prompt, n):
    "Greedy continuation by re-running the whole sequence at every step (no cache at all)."
    ids = prompt
    with torch.no_grad():
        for _ in range(n):
            ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return ids


@pytest.mark.parametrize("kw", KINDS)
def test_greedy_equals_plain_path_and_recompute(kw):
    """Greedy tokens from the static-cache engine equal reference_generate and recomputation without a cache."""
    torch.manual_seed(0)
    m = DeepSeekV3(tiny_config(**kw)).eval()
    prompt = torch.randint(0, m.config.vocab_size, (2, 5))
    ref = _recompute_greedy(m, prompt, 12)
    assert torch.equal(reference_generate(m, prompt, 12, temperature=0), ref)
    assert torch.equal(generate(m, prompt, 12, temperature=0), ref)
    if "mla_impl" in kw:  # the cache layout can be chosen at generate time, whatever the config says
        other = "absorb" if kw["mla_impl"] == "naive" else "naive"
        assert torch.equal(generate(m, prompt, 12, temperature=0, mla_impl=other), ref)


def test_seeded_sampling_reproduces_model_generate():
    """Seeded samples (temperature, top-k, top-p) are the same tokens as reference_generate's with the same seed."""
    m = DeepSeekV3(tiny_config()).eval()
    p = torch.randint(0, m.config.vocab_size, (3, 4))
    for kw in [dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)]:
        assert torch.equal(generate(m, p, 10, seed=11, **kw), reference_generate(m, p, 10, seed=11, **kw))
    assert not torch.equal(generate(m, p, 10, seed=1), generate(m, p, 10, seed=2))


@pytest.mark.parametrize("kw", KINDS)
@pytest.mark.parametrize("draft", [None, "mtp"])
def test_ragged_left_padded_batch_equals_single_runs(kw, draft):
    """Prompts of different lengths, left-padded in one batch, continue exactly as each prompt alone."""
    torch.manual_seed(1)
    m = DeepSeekV3(tiny_config(**kw)).eval()
    prompts = [torch.randint(1, m.config.vocab_size, (n,)) for n in (7, 3, 5)]
    S = max(len(p) for p in prompts)
    ids = torch.stack([torch.cat([torch.zeros(S - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(S) >= torch.tensor([S - len(p) for p in prompts])[:, None]).long()
    out = generate(m, ids, 9, temperature=0, attention_mask=mask, draft=draft)
    for row, p in zip(out, prompts):
        assert torch.equal(row[S:], generate(m, p, 9, temperature=0)[len(p):])


@pytest.mark.parametrize("draft", [None, "mtp"])
def test_eos_is_handled_per_sequence(draft):
    """A row that emits EOS keeps emitting EOS while the others go on; the output equals reference_generate's."""
    torch.manual_seed(0)
    m = DeepSeekV3(tiny_config()).eval()
    p = torch.randint(0, m.config.vocab_size, (2, 4))
    free = generate(m, p, 12, temperature=0)
    eos = int(free[0, 4 + 3])  # row 0's 4th new token becomes the EOS id
    assert eos not in free[1, 4:].tolist(), "pick a seed where row 1 never emits this token"
    out = generate(m, p, 12, temperature=0, eos_token_id=eos, draft=draft, check_every=3)
    first = free[0, 4:].tolist().index(eos)
    assert out[0, 4 + first:].eq(eos).all() and torch.equal(out[1], free[1])
    assert torch.equal(out, reference_generate(m, p, 12, temperature=0, eos_token_id=eos))
    one = generate(m, p[:1], 12, temperature=0, eos_token_id=eos, draft=draft)  # all rows done: stop early
    assert torch.equal(one, reference_generate(m, p[:1], 12, temperature=0, eos_token_id=eos))
    assert one.shape[1] == 4 + first + 1


def _agreeing(cfg, attn_scale=0.0):
    """A one-layer model whose MTP module is a copy of its block, so the draft for t+2 is the main model's own
    prediction at t+1 when attention is off (`attn_scale=0`); a small `attn_scale` adds some disagreement."""
    m = DeepSeekV3(cfg.replace(num_hidden_layers=1, first_k_dense_replace=0, initializer_range=0.3)).eval()
    with torch.no_grad():
        w = m.embed_tokens.weight
        w.copy_(w / w.pow(2).mean(-1, keepdim=True).sqrt())  # unit RMS rows: enorm(emb) == emb
        for blk in [m.layers[0], *m.mtp]:
            blk.load_state_dict(m.layers[0].state_dict(), strict=False)
            blk.self_attn.o_proj.weight.mul_(attn_scale if blk is m.layers[0] else 0.0)
            if hasattr(blk, "eh_proj"):  # eh_proj([emb; h]) = emb
                blk.eh_proj.weight.copy_(torch.cat([torch.eye(cfg.hidden_size), torch.zeros(cfg.hidden_size,
                                                                                             cfg.hidden_size)], 1))
    return m


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("kw", KINDS)
def test_mtp_draft_greedy_equals_plain_greedy(depth, kw):
    """Self-speculative greedy decoding gives token for token the non-speculative greedy output (1 and 2 MTP
    depths), both with a random MTP (drafts mostly rejected) and a mostly agreeing one (accept-both path taken)."""
    torch.manual_seed(2)
    cfg = tiny_config(num_nextn_predict_layers=depth, **kw)
    for m in [DeepSeekV3(cfg).eval(), _agreeing(cfg, attn_scale=0.01)]:
        p = torch.randint(0, m.config.vocab_size, (2, 6))
        stats = {}
        out = generate(m, p, 30, temperature=0, draft="mtp", stats=stats)
        assert torch.equal(out, generate(m, p, 30, temperature=0))
        n_all = stats["accept"].all(dim=1).long()
        assert 1 + (n_all + 1).sum() >= 30 and 0 <= stats["acceptance"] <= 1
    assert n_all.float().mean() > 0.3, "the agreeing MTP must take the accept-both path often"


@pytest.mark.parametrize("kw", KINDS)
def test_mtp_draft_depth_2_greedy_equals_plain_greedy(kw):
    """Drafting two tokens per iteration (the MTP module chained on its own output) gives token for token the plain
    greedy output of a left-padded batch, with a random MTP (drafts mostly rejected) and an agreeing one, which keeps
    both drafts (three tokens from one forward) often: measured in 43-67% of its iterations, 2.1-2.5 tokens/forward."""
    torch.manual_seed(2)
    cfg = tiny_config(**kw)
    p = torch.randint(1, cfg.vocab_size, (2, 6))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
    for m in [DeepSeekV3(cfg).eval(), _agreeing(cfg, attn_scale=0.01)]:
        stats = {}
        out = generate(m, p, 30, temperature=0, attention_mask=mask, draft="mtp", draft_depth=2, stats=stats)
        assert torch.equal(out, generate(m, p, 30, temperature=0, attention_mask=mask))
    kept = stats["accept"].amin(dim=1)  # drafts kept per iteration (the agreeing model's)
    assert (kept == 2).float().mean() > 0.25 and stats["tokens_per_forward"] > 1.8, stats["accept"].tolist()


def test_draft_depth_is_checked():
    """`draft_depth` is 1 or 2: anything else is one clear error."""
    m = DeepSeekV3(tiny_config()).eval()
    p = torch.randint(0, m.config.vocab_size, (1, 4))
    for bad in (0, 3):
        with pytest.raises(ValueError, match=f"draft_depth must be 1 or 2, got {bad}"):
            generate(m, p, 4, temperature=0, draft="mtp", draft_depth=bad)


def _exact_marginals(m, prompt, n):
    "Exact distributions of new tokens 1..n after `prompt (S,)` at temperature 1, by enumerating every continuation."
    V = m.config.vocab_size
    seqs, weight, out = prompt[None], torch.ones(1, dtype=torch.float64), []
    with torch.no_grad():
        for _ in range(n):
            joint = weight[:, None] * m(seqs)[:, -1].double().softmax(-1)  # (continuations, V)
            out.append(joint.sum(0))
            seqs = torch.cat([seqs.repeat_interleave(V, 0), torch.arange(V).repeat(len(seqs))[:, None]], 1)
            weight = joint.reshape(-1)
    return out


def _chi2_pvalue(tokens, expected_probs):
    "Chi-square goodness of fit of sampled `tokens` to `expected_probs`; bins expecting < 5 counts are merged."
    n, V = len(tokens), len(expected_probs)
    counts = torch.bincount(tokens, minlength=V).double()
    exp = expected_probs * n
    small = exp < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([exp[~small], exp[small].sum()[None]]) if small.any() else exp
    stat = ((obs - exp) ** 2 / exp).sum()
    return torch.special.gammaincc(torch.tensor((len(obs) - 1) / 2, dtype=torch.float64), stat / 2).item()  # chi2 sf


@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("agree", [False, True])
def test_speculative_sampling_keeps_the_target_distribution(agree, depth):
    """Speculative sampling with the MTP drafts (accept each with prob min(1, p/q) until the first rejection, which is
    resampled from (p - q)+, plus the bonus token after all accepted) gives new tokens with exactly the target model's
    distribution, with one draft and with two chained ones: chi-square test of 2,000 samples of tokens 1-3 against the
    enumerated distribution, failing below p = 0.001. `agree=False`: a random MTP, most drafts rejected (tests the
    residual); `agree=True`: an MTP that agrees with the model, so the bonus path is taken."""
    torch.manual_seed(3)
    cfg = tiny_config(vocab_size=16, initializer_range=0.3)
    m = _agreeing(cfg) if agree else DeepSeekV3(cfg).eval()
    prompt = torch.tensor([3, 1, 4, 1, 5])
    stats = {}
    out = generate(m, prompt.expand(2000, -1), 3, temperature=1.0, seed=0, draft="mtp", draft_depth=depth,
                   stats=stats)
    for i, probs in enumerate(_exact_marginals(m, prompt, 3)):
        assert _chi2_pvalue(out[:, 5 + i], probs) > 1e-3, f"new token {i + 1} does not follow the target"
    assert (stats["acceptance"] > 0.95) if agree else (stats["acceptance"] < 0.5)


def test_bad_inputs_raise_clear_errors():
    """A mask that is not left padding, an unknown draft or cache layout, and MTP drafting without MTP are refused."""
    m = DeepSeekV3(tiny_config()).eval()
    ids = torch.randint(0, m.config.vocab_size, (2, 4))
    with pytest.raises(ValueError, match="left padding"):
        generate(m, ids, 3, attention_mask=torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="left padding"):
        generate(m, ids, 3, attention_mask=torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]]))
    with pytest.raises(ValueError, match="shape"):
        left_padding_starts(torch.ones(2, 3), ids)
    with pytest.raises(ValueError, match="draft"):
        generate(m, ids, 3, draft="medusa")
    with pytest.raises(ValueError, match="mla_impl"):
        generate(m, ids, 3, mla_impl="flash")
    with pytest.raises(ValueError, match="MTP"):
        generate(DeepSeekV3(tiny_config(num_nextn_predict_layers=0)).eval(), ids, 3, draft="mtp")
    with pytest.raises(ValueError, match="max_position_embeddings"):
        generate(m, ids, m.config.max_position_embeddings)


@pytest.mark.parametrize("kw", KINDS)
def test_decode_step_bytes_matches_a_hand_count_of_model_and_cache(kw):
    """`decode_step_bytes` at batch 1 equals a hand count over the model's own tensors: every parameter a step reads
    once in bf16 (k of E routed experts, the router and its bias in fp32, no embedding table, no MTP), and the cache
    term equals the bytes of the `model.new_cache` buffers that hold that context; at batch B the experts hit follow
    E(1 - (1 - k/E)^B), from k at B=1 towards E."""
    from dsv3_min.infer import decode_step_bytes, experts_touched
    cfg = tiny_config(**kw)
    m = DeepSeekV3(cfg)
    E, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    hand = 0.0
    for name, t in [*m.named_parameters(), *m.named_buffers()]:
        if name.startswith("mtp.") or (name.startswith("embed_tokens.") and not cfg.tie_word_embeddings):
            continue
        if ".experts." in name:              # routed experts: k of E per token
            hand += 2 * t.numel() * k / E
        elif ".gate." in name and ".mlp." in name:  # the router: weight and correction bias, fp32
            hand += 4 * t.numel()
        elif t.is_floating_point() and "rotary" not in name:
            hand += 2 * t.numel()
    got = decode_step_bytes(cfg, 1, 10)
    assert got.weights == pytest.approx(hand)
    cache = m.new_cache(3, 10, static=True)
    held = sum(buf.numel() * 2 for c in cache.layers for buf in c.buffers.values())
    assert decode_step_bytes(cfg, 3, 10).cache == held
    assert experts_touched(cfg, 1) == pytest.approx(k)
    assert experts_touched(cfg, 2) == pytest.approx(2 * k - k * k / E)   # inclusion-exclusion for two tokens
    assert k < experts_touched(cfg, 64) < E


def test_free_decoders_drops_the_cached_engines_and_generate_rebuilds_them():
    """`generate` keeps its decoder (static caches, graph) on the model; `free_decoders` drops it, and the next call
    builds a fresh one that decodes the same tokens."""
    from dsv3_min.infer import free_decoders
    torch.manual_seed(0)
    m = DeepSeekV3(tiny_config()).eval()
    prompt = torch.randint(0, m.config.vocab_size, (1, 4))
    first = generate(m, prompt, 5, temperature=0)
    assert m.__dict__.get("_decoders")
    free_decoders(m)
    assert not m.__dict__.get("_decoders")
    assert torch.equal(generate(m, prompt, 5, temperature=0), first)


def test_decode_bench_quick_runs_on_the_cpu_and_reports_bandwidth_use(tmp_path):
    """`bench/decode.py --quick` (the lead's GPU benchmark, as a CPU smoke) still runs against this package: it writes
    decode.json with our engine, the reference decoder and transformers, each with tok/s, and decode.png; every entry
    of ours carries its engine's compile_s and mbu = bytes_per_step / step_s / copy_bandwidth with bytes_per_step
    from `decode_step_bytes` (fp32: 4 bytes a number), and `mbu_b1` / `compile_s_b1` are those of the b1 entry that
    gives `ours_b1_tok_s`."""
    from dsv3_min.config import get_preset
    from dsv3_min.infer import decode_step_bytes
    script = Path(__file__).resolve().parents[1] / "bench" / "decode.py"
    r = subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path)], capture_output=True,
                       text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads((tmp_path / "decode.json").read_text())
    for name in ("ours_absorb", "ours_naive", "dsv3_plain", "hf_eager"):
        assert out[name]["1"]["tok_s"] > 0, name
    cfg, bw = get_preset("cpu-tiny"), out["copy_bandwidth"]
    for name in ("ours_absorb", "ours_naive"):
        for b in ("1", "8"):
            e = out[name][b]
            assert e["compile_s"] > 0 and e["compiled"] is False
            nbytes = decode_step_bytes(cfg, int(b), 8 + 4 / 2, name.removeprefix("ours_"), 4).total
            assert e["bytes_per_step"] == pytest.approx(nbytes)
            assert e["mbu"] == pytest.approx(nbytes * e["decode_tok_s"] / int(b) / bw)
    best = max(("ours_absorb", "ours_naive"), key=lambda n: out[n]["1"]["tok_s"])
    assert out["mbu_b1"] == out[best]["1"]["mbu"] and out["ours_b1_tok_s"] == out[best]["1"]["tok_s"]
    assert out["compile_s_b1"] == out[best]["1"]["compile_s"]
    assert (tmp_path / "decode.png").exists()


@pytest.mark.parametrize("backend", ["sentencepiece", "tokenizers"])
def test_sampled_text_never_shows_a_replacement_character(backend):
    """`sample_text` from a model that samples uniformly over the vocabulary (its 256 byte-fallback pieces included)
    cuts multi-byte characters everywhere, in the middle and at the end (max_new_tokens): the text never shows U+FFFD
    for them, with our sentencepiece tokenizer and its Hugging Face `tokenizers` form alike. The test counts the cut
    characters it produced, so that it cannot pass without exercising them."""
    from dsv3_min.infer import sample_text
    from dsv3_min.tokenizer import train_tokenizer
    tok = train_tokenizer(["Grüße aus Köln — naïve café, Ελληνικά, 日本語 テキスト."] * 40, vocab_size=320)
    tok = tok.to_hf() if backend == "tokenizers" else tok
    m = DeepSeekV3(tiny_config(vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        m.lm_head.weight.zero_()   # logits 0: every id equally likely
    cut = 0
    for seed in range(3):
        text = sample_text(m, tok, "Köln", 16, temperature=1.0, seed=seed)
        ids = generate(m, torch.tensor(tok.encode("Köln", bos=True)), 16, temperature=1.0, seed=seed,
                       eos_token_id=tok.eos_id)[len(tok.encode("Köln", bos=True)):].tolist()
        runs, run = [], []
        for i in ids + [None]:
            if i is not None and tok.is_byte(i):
                run.append(int(tok.id_to_piece(i)[3:5], 16))
            elif run:
                runs, run = runs + [bytes(run)], []
        cut += sum(1 for r in runs if r.decode("utf-8", "replace").count("\ufffd"))
        assert text.startswith("Köln") and "\ufffd" not in text, (seed, text)
    assert cut >= 3, cut


def test_fast_settings_are_the_default_on_cuda_only_and_an_explicit_value_wins():
    """`decode_defaults` (what `generate` and `sample` get when they name nothing): a CUDA graph and torch.compile on
    CUDA, neither on the CPU or MPS; an explicit `compile=` wins everywhere, and a graph is never asked of a CPU."""
    from dsv3_min.infer import decode_defaults
    assert decode_defaults("cuda") == (True, True)
    assert decode_defaults(torch.device("cuda", 0)) == (True, True)
    assert decode_defaults("cpu") == (False, False)
    assert decode_defaults(torch.device("mps")) == (False, False)
    assert decode_defaults("cuda", compile=False) == (True, False)
    assert decode_defaults("cuda", cuda_graph=False) == (False, True)
    assert decode_defaults("cpu", compile=True) == (False, True)
    assert decode_defaults("cpu", cuda_graph=True) == (False, False)


def test_generate_builds_one_engine_per_shape_and_reuses_it():
    """`generate` builds its engine (caches, compiled step, graph) once per shape and reuses the same object: a second
    call with a prompt one token longer (same rounded length) and a call spelling the defaults out (`compile=False`
    on the CPU) get it back with its first-call seconds; another batch size builds a second engine."""
    torch.manual_seed(0)
    m = DeepSeekV3(tiny_config()).eval()
    p = torch.randint(0, m.config.vocab_size, (1, 5))
    first, again, spelled, other = {}, {}, {}, {}
    generate(m, p, 4, temperature=0, stats=first)
    assert first["new_engine"] and not first["compiled"] and not first["cuda_graph"] and first["compile_s"] > 0
    (eng,) = m._decoders.values()
    generate(m, torch.cat([p, p[:, :1]], dim=1), 4, temperature=0, stats=again)
    generate(m, p, 4, temperature=0, compile=False, cuda_graph=False, stats=spelled)
    assert not again["new_engine"] and not spelled["new_engine"]
    assert list(m._decoders.values()) == [eng] and list(m._decoders.values())[0] is eng
    assert again["compile_s"] == spelled["compile_s"] == first["compile_s"]
    generate(m, p.expand(2, -1), 4, temperature=0, stats=other)
    assert other["new_engine"] and len(m._decoders) == 2


@pytest.mark.parametrize("exponential", [False, True])
def test_noise_with_a_generator_per_row_draws_what_each_row_draws_alone(exponential):
    """`model.noise` given a list of generators draws row i from the i-th: exactly the numbers of a batch-1 call with
    that generator (what lets the serving engine draw rows of different seeds in one call)."""
    from dsv3_min.model import noise
    rows = noise((3, 2, 5), "cpu", [torch.Generator().manual_seed(s) for s in (1, 2, 3)], exponential)
    alone = [noise((1, 2, 5), "cpu", torch.Generator().manual_seed(s), exponential)[0] for s in (1, 2, 3)]
    assert rows.shape == (3, 2, 5) and torch.equal(rows, torch.stack(alone))
    assert not torch.equal(rows[0], rows[1])
