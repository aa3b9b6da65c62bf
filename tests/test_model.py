"""The assembled model: shapes, MTP loss, heads, init, generation with caches."""
import math

import pytest
import torch

from conftest import tiny_config
from dsv3_min.config import count_params
from dsv3_min.model import (
    Block,
    DeepNormBlock,
    DeepNormMTPLayer,
    DeepSeekV3,
    DeepSeekV3ForSequenceClassification,
    MTPLayer,
    linear_cross_entropy,
    reference_generate,
    sample_from,
)
from dsv3_min.moe import max_vio
from dsv3_min.norm import rms_norm
from dsv3_min.rope import RotaryEmbedding


def test_logits_shape_and_param_count(tiny):
    """model(input_ids (B,S)) returns (B,S,vocab), and count_params equals the real numel (total and MTP)."""
    m = DeepSeekV3(tiny)
    x = torch.randint(0, tiny.vocab_size, (3, 7))
    assert m(x).shape == (3, 7, tiny.vocab_size)
    mtp = sum(p.numel() for p in m.mtp.parameters()) + sum(
        b.numel() for k, b in m.mtp.named_buffers() if k.endswith("e_score_correction_bias"))
    total = sum(p.numel() for p in m.parameters()) + sum(
        b.numel() for k, b in m.named_buffers() if k.endswith("e_score_correction_bias")) - mtp
    pc = count_params(tiny)
    assert (pc.total, pc.mtp) == (total, mtp)


@pytest.mark.parametrize("kw", [{}, {"tie_word_embeddings": True}, {"attention": "gqa", "num_key_value_heads": 2},
                                {"gated_attention": True}, {"norm_scheme": "deepnorm"}, {"q_lora_rank": None},
                                {"first_k_dense_replace": 0}, {"attention_bias": True}, {"first_k_dense_replace": 3},
                                {"attention": "gqa", "num_key_value_heads": 1, "attention_bias": True}])
def test_param_count_formula_matches_modules(kw):
    """count_params matches the instantiated modules for every structural switch."""
    cfg = tiny_config(**kw)
    m = DeepSeekV3(cfg)
    n = sum(p.numel() for p in m.parameters()) + sum(
        b.numel() for k, b in m.named_buffers() if k.endswith("e_score_correction_bias"))
    pc = count_params(cfg)
    assert pc.total + pc.mtp == n


def test_mtp_loss_is_combined_with_lambda():
    """loss = main + λ·mean_k CE_k + balance, and each MTP depth predicts the token k+1 ahead of its position."""
    cfg = tiny_config(num_nextn_predict_layers=2, mtp_loss_weight=0.5, aux_loss_alpha=0.01)
    m = DeepSeekV3(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    parts = m.loss(x[:, :-1], x[:, 1:])
    torch.testing.assert_close(parts.loss, parts.main + 0.5 * parts.mtp + parts.balance)
    assert parts.balance > 0 and parts.mtp > 0
    # the main loss equals plain cross-entropy of forward()'s logits
    logits = m(x[:, :-1])
    ref = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten())
    torch.testing.assert_close(parts.main, ref)
    # depth-1 MTP, recomputed by hand: position i sees emb(t_{i+1}) and predicts t_{i+2}
    inp, tgt = x[:, :-1], x[:, 1:]
    h = m.hidden_states(inp)
    cos, sin = m.rotary(torch.arange(15))
    h1 = m.mtp[0](h[:, :15], m.embed_tokens(tgt[:, 0:15]), cos, sin)
    ce1 = torch.nn.functional.cross_entropy(m.lm_head(m.mtp[0].shared_head.norm(h1)).flatten(0, 1), tgt[:, 1:16].flatten())
    h2 = m.mtp[1](h1[:, :14], m.embed_tokens(tgt[:, 1:15]), *m.rotary(torch.arange(14)))
    ce2 = torch.nn.functional.cross_entropy(m.lm_head(m.mtp[1].shared_head.norm(h2)).flatten(0, 1), tgt[:, 2:16].flatten())
    torch.testing.assert_close(parts.mtp, (ce1 + ce2) / 2)


def test_linear_cross_entropy_equals_cross_entropy_of_the_logits(monkeypatch):
    """`linear_cross_entropy(h, W, y)` is `F.cross_entropy(h @ Wᵀ, y, ignore_index=-100)`: its value and both
    gradients, over chunks that do not divide the rows (gradcheck in float64; fp32 within 1e-6 of the full logits'
    loss, measured 4e-7 relative on the gradients), ignored rows included; all rows ignored gives NaN as torch does; a
    frozen weight (a LoRA base) gets no gradient and h the same one."""
    import dsv3_min.model as model_module
    monkeypatch.setattr(model_module, "CE_CHUNK", 50 * 7)  # 7 rows per chunk of a 50-piece vocabulary
    torch.manual_seed(0)
    y = torch.randint(0, 50, (40,))
    y[::5] = -100
    h, w = torch.randn(40, 16, dtype=torch.float64), torch.randn(50, 16, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: linear_cross_entropy(a, b, y), (h.requires_grad_(), w.requires_grad_()))
    h, w = h.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    ref = torch.nn.functional.cross_entropy(h @ w.t(), y, ignore_index=-100)
    got = linear_cross_entropy(h, w, y)
    for a, b in zip(torch.autograd.grad(3 * got, [h, w]), torch.autograd.grad(3 * ref, [h, w])):
        err = float((a - b).abs().max() / b.abs().max())
        assert err < 1e-6, err
    assert abs(float(got.detach() - ref.detach())) < 1e-6 * float(ref.detach())
    assert torch.isnan(linear_cross_entropy(h, w, torch.full((40,), -100)))
    frozen = w.detach()  # a frozen head (LoRA): no dW made, dh the same
    (dh,) = torch.autograd.grad(3 * linear_cross_entropy(h, frozen, y), [h])
    (want,) = torch.autograd.grad(3 * torch.nn.functional.cross_entropy(h @ frozen.t(), y, ignore_index=-100), [h])
    torch.testing.assert_close(dh, want, rtol=0, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_training_loss_equals_the_full_one(tied):
    """`ce_impl="chunked"` changes how the training loss is computed, not what: on the same weights every part of
    `loss` (main, MTP, total; 1e-6 relative, measured 1e-7) and every gradient (2e-6, measured 8e-7) equal the full
    logits'; without gradients it takes the plain path."""
    cfg = tiny_config(tie_word_embeddings=tied)
    torch.manual_seed(0)
    full = DeepSeekV3(cfg)
    chunked = DeepSeekV3(cfg.replace(ce_impl="chunked"))
    chunked.load_state_dict(full.state_dict())
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    y = x[:, 1:].clone()
    y[0, :4] = -100
    parts = [m.loss(x[:, :-1], y) for m in (full, chunked)]
    for a, b in zip(*parts):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=0)
    parts[0].loss.backward()
    parts[1].loss.backward()
    for (name, a), b in zip(full.named_parameters(), chunked.parameters()):
        if a.grad is not None:
            err = float((b.grad - a.grad).abs().max() / a.grad.abs().max().clamp(min=1e-12))
            assert err < 2e-6, (name, err)
    with torch.no_grad():
        torch.testing.assert_close(chunked.loss(x[:, :-1], y).main, parts[0].main.detach(), rtol=0, atol=0)


def test_untrained_loss_near_log_vocab(tiny):
    """At init (normal 0.02) the logits are nearly uniform, so the main loss is close to ln(vocab)."""
    m = DeepSeekV3(tiny)
    x = torch.randint(0, tiny.vocab_size, (4, 32))
    assert abs(m.loss(x[:, :-1], x[:, 1:]).main.item() - math.log(tiny.vocab_size)) < 0.1


def test_tied_head_shares_storage():
    """tie_word_embeddings=True makes lm_head use the embedding matrix itself."""
    m = DeepSeekV3(tiny_config(tie_word_embeddings=True))
    assert m.lm_head.weight.data_ptr() == m.embed_tokens.weight.data_ptr()


def test_deepnorm_init_scales_value_and_ffn_weights():
    """DeepNorm init gives the FFN/value/output weights a smaller scale than the q/k weights of the same block."""
    cfg = tiny_config(norm_scheme="deepnorm", num_hidden_layers=12, hidden_size=128, attention="gqa",
                      num_key_value_heads=4, intermediate_size=256)
    m = DeepSeekV3(cfg)
    blk = m.layers[0]
    assert blk.self_attn.v_proj.weight.std() < blk.self_attn.q_proj.weight.std()
    assert blk.mlp.down_proj.weight.std() < blk.self_attn.q_proj.weight.std()


@pytest.mark.parametrize("kw", [{"mla_impl": "naive"}, {"mla_impl": "absorb"},
                                {"attention": "gqa", "num_key_value_heads": 2},
                                {"mla_impl": "absorb", "gated_attention": True, "q_lora_rank": None}])
def test_cached_greedy_equals_recompute(kw):
    """Greedy generation through the KV/latent cache equals recomputing the full sequence at every step."""
    torch.manual_seed(0)
    m = DeepSeekV3(tiny_config(**kw)).eval()
    prompt = torch.randint(0, m.config.vocab_size, (2, 5))
    ids = prompt
    with torch.no_grad():
        for _ in range(10):
            ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
    out = reference_generate(m, prompt, 10, temperature=0)
    assert torch.equal(out, ids)
    assert torch.equal(out[:, :5], prompt)


def test_sampling_is_seeded_and_respects_top_k():
    """The same seed gives the same sample; top_k=1 is greedy whatever the temperature."""
    m = DeepSeekV3(tiny_config()).eval()
    p = torch.randint(0, m.config.vocab_size, (1, 4))
    a = reference_generate(m, p, 8, temperature=1.0, seed=3)
    b = reference_generate(m, p, 8, temperature=1.0, seed=3)
    assert torch.equal(a, b)
    assert torch.equal(reference_generate(m, p, 8, temperature=5.0, top_k=1, seed=1), reference_generate(m, p, 8, temperature=0))
    assert torch.equal(reference_generate(m, p, 8, temperature=0.7, top_p=1e-6, seed=5), reference_generate(m, p, 8, temperature=0))


def test_bad_inputs_raise_clear_errors(tiny):
    """Unknown token ids, too-long prompts and bad sampling settings are refused with a ValueError."""
    m = DeepSeekV3(tiny).eval()
    with pytest.raises(ValueError, match="outside the vocabulary"):
        m(torch.tensor([[0, tiny.vocab_size]]))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        reference_generate(m, torch.zeros(1, tiny.max_position_embeddings - 2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match="top_p"):
        reference_generate(m, torch.zeros(1, 3, dtype=torch.long), 2, top_p=1.5)
    with pytest.raises(ValueError, match="shape"):
        m(torch.zeros(4, dtype=torch.long))


def test_classification_head_pools_last_real_token(tiny):
    """The classification logits read the last non-pad token: padding after it does not change them."""
    clf = DeepSeekV3ForSequenceClassification(tiny, num_labels=3).eval()
    x = torch.randint(0, tiny.vocab_size, (1, 6))
    padded = torch.cat([x, torch.zeros(1, 4, dtype=torch.long)], dim=1)
    mask = torch.tensor([[1] * 6 + [0] * 4])
    torch.testing.assert_close(clf(x), clf(padded, mask))
    assert clf(x).shape == (1, 3)
    loss = clf.loss(padded, torch.tensor([2]), mask)
    loss.backward()
    assert clf.score.weight.grad is not None


def test_router_bias_update_and_stats(tiny):
    """After a training forward, update_router_biases moves biases, and moe_stats then reports, per MoE layer, the
    load that update used (what the training loop logs: `expert_load`) and its MaxVio."""
    m = DeepSeekV3(tiny_config(bias_update_speed=0.01)).train()
    assert m.moe_stats() == {"max_vio": [0.0] * 3, "expert_load": [[0] * 8] * 3}  # nothing routed yet
    x = torch.randint(0, tiny.vocab_size, (4, 16))
    m.loss(x[:, :-1], x[:, 1:]).loss.backward()
    loads = [mm.load.clone() for mm in m.moe_layers()]  # what the loop copied before the update resets them
    before = [mm.gate.e_score_correction_bias.clone() for mm in m.moe_layers()]
    m.update_router_biases()
    assert any(not torch.equal(b, mm.gate.e_score_correction_bias) for b, mm in zip(before, m.moe_layers()))
    stats = m.moe_stats()
    assert len(stats["expert_load"]) == len(m.moe_layers()) == 3  # 2 MoE main layers + the MoE MTP block
    assert stats["expert_load"] == [ld.tolist() for ld in loads]
    k = tiny.num_experts_per_tok  # every routed token counted k times; the MTP block sees one position fewer
    assert [sum(ld) for ld in stats["expert_load"]] == [4 * 15 * k, 4 * 15 * k, 4 * 14 * k]
    assert stats["max_vio"] == [max_vio(ld) for ld in loads] and any(v > 0 for v in stats["max_vio"])
    assert DeepSeekV3(tiny_config(first_k_dense_replace=3, num_nextn_predict_layers=0)).moe_stats() == {}


@pytest.mark.parametrize("scheme", ["prenorm", "deepnorm"])
def test_block_reads_like_the_paper_and_deepnorm_is_its_own_block(scheme):
    """A pre-norm Block is x + attn(norm1(x)), then h + ffn(norm2(h)); DeepNorm is its own class (DeepNormBlock, and
    DeepNormMTPLayer for MTP) computing norm1(a*x + attn(x)), then norm2(a*h + ffn(h)) with a = (2N)^(1/4); both keep
    transformers' norm names, so the checkpoint keys do not depend on the scheme."""
    cfg = tiny_config(norm_scheme=scheme, num_hidden_layers=8, first_k_dense_replace=8)
    model = DeepSeekV3(cfg)
    blk = model.layers[0]
    block_cls, mtp_cls = (Block, MTPLayer) if scheme == "prenorm" else (DeepNormBlock, DeepNormMTPLayer)
    assert type(blk) is block_cls and type(model.mtp[0]) is mtp_cls
    with torch.no_grad():
        for p in (blk.input_layernorm.weight, blk.post_attention_layernorm.weight):
            p.normal_()
    x = torch.randn(2, 5, cfg.hidden_size)
    cos, sin = RotaryEmbedding.from_config(cfg)(torch.arange(5))
    n1 = lambda t: rms_norm(t, blk.input_layernorm.weight, cfg.rms_norm_eps)
    n2 = lambda t: rms_norm(t, blk.post_attention_layernorm.weight, cfg.rms_norm_eps)
    attn = lambda t: blk.self_attn(t, cos, sin)
    if scheme == "prenorm":
        h = x + attn(n1(x))
        want = h + blk.mlp(n2(h))
    else:
        a = 16 ** 0.25
        h = n1(a * x + attn(x))
        want = n2(a * h + blk.mlp(h))
    torch.testing.assert_close(blk(x, cos, sin), want, atol=0, rtol=0)
    assert {k for k in blk.state_dict() if "layernorm" in k and not k.startswith("self_attn.")} == {
        "input_layernorm.weight", "post_attention_layernorm.weight"}
    mtp_keys = {k for k in model.mtp[0].state_dict() if not k.startswith(("self_attn.", "mlp."))}
    assert mtp_keys == {"input_layernorm.weight", "post_attention_layernorm.weight", "enorm.weight", "hnorm.weight",
                        "eh_proj.weight", "shared_head.norm.weight"}


def test_mtp_input_is_embedding_then_hidden_state():
    """MTP depth k computes h'_i = eh_proj([enorm(Emb(t_{i+k})); hnorm(h_i)]) and then its block, as DeepSeek-V3's
    inference/model.py and transformers order the concatenation (the paper's Eq. 21 writes the two halves the other
    way round; the released weights follow the code): the first d columns of eh_proj multiply the normed embedding,
    the last d the normed hidden state. Computed here by hand, column block by column block; swapping the order of
    the concatenation in MTPLayer fails this test."""
    cfg = tiny_config()
    m = DeepSeekV3(cfg).eval()
    layer, d = m.mtp[0], cfg.hidden_size
    with torch.no_grad():
        for norm in (layer.enorm, layer.hnorm):
            norm.weight.normal_()  # distinct gains: the two halves cannot be confused by symmetry
    h, emb = torch.randn(2, 6, d), m.embed_tokens(torch.randint(0, cfg.vocab_size, (2, 6)))
    cos, sin = m.rotary(torch.arange(6))
    w_emb, w_h = layer.eh_proj.weight[:, :d], layer.eh_proj.weight[:, d:]
    x = rms_norm(emb, layer.enorm.weight, cfg.rms_norm_eps) @ w_emb.T + rms_norm(h, layer.hnorm.weight,
                                                                                   cfg.rms_norm_eps) @ w_h.T
    with torch.no_grad():
        torch.testing.assert_close(layer(h, emb, cos, sin), Block.forward(layer, x, cos, sin), atol=1e-6, rtol=1e-5)


def test_new_cache_holds_one_cache_per_layer_and_mtp_depth(tiny):
    """new_cache gives one cache per main layer (and per MTP depth with mtp=True) sharing one write slot and one
    left-padding start; a prefill then a decode step advance each layer's length, and the cached logits equal the
    uncached ones."""
    m = DeepSeekV3(tiny).eval()
    cache = m.new_cache(2, 10, mtp=True)
    assert len(cache.layers) == tiny.num_hidden_layers and len(cache.mtp) == tiny.num_nextn_predict_layers
    assert all(c.pos is cache.pos and c.start is cache.start for c in [*cache.layers, *cache.mtp])
    x = torch.randint(0, tiny.vocab_size, (2, 7))
    with torch.no_grad():
        m(x[:, :6], cache=cache)
        last = m(x[:, 6:], cache=cache)
        torch.testing.assert_close(last[:, -1], m(x)[:, -1])
    assert [c.length for c in cache.layers] == [7] * tiny.num_hidden_layers
    assert len(m.new_cache(2, 10).mtp) == 0


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kw", [{"mla_impl": "naive"}, {"mla_impl": "absorb"},
                                {"attention": "gqa", "num_key_value_heads": 2}])
def test_decode_logits_equal_recompute_with_offsets_and_left_padding(kw, static):
    """Logits (not just argmax) of a prefill plus 4 one-token decode steps through a cache equal a recomputation of
    the whole sequence without a cache within 1e-5 of the largest logit, (a) with explicit positions, an offset of 5
    and a gap of 4 after the third token, given to both (RoPE is relative, so the gap is what makes positions matter:
    the default 0..n-1 gives other logits) and (b) with a ragged batch: row 1 is left-padded by 3 slots and each row
    gets its own positions (static cache: start_b hides the padding and the default positions are slot - start_b;
    dynamic cache: explicit per-row positions, compared on row 0)."""
    torch.manual_seed(0)
    m = DeepSeekV3(tiny_config(**kw)).eval()
    V, n, S = m.config.vocab_size, 9, 5
    ids = torch.randint(0, V, (2, n))
    tol = lambda ref: dict(atol=1e-5 * ref.abs().max().item(), rtol=0)
    with torch.no_grad():
        pos = 5 + torch.arange(n) + 4 * (torch.arange(n) >= 3)  # (a) an offset and a gap
        cache = m.new_cache(2, n, static=static)
        steps = [m(ids[:, :S], pos[:S], cache)]
        for t in range(S, n):
            if static:
                cache.pos.fill_(t)
            steps.append(m(ids[:, t : t + 1], pos[t : t + 1], cache))
        ref = m(ids, pos)
        torch.testing.assert_close(torch.cat(steps, 1), ref, **tol(ref))
        assert (m(ids) - ref).abs().max() > 1e-3
        pad = 3  # (b) row 1: 3 padding slots, then its own tokens at positions 0..n-pad-1
        rows = torch.stack([ids[0], torch.cat([torch.zeros(pad, dtype=torch.long), ids[1, : n - pad]])])
        per_row = torch.stack([torch.arange(n), (torch.arange(n) - pad).clamp(min=0)])
        cache = m.new_cache(2, n, static=static)
        cache.start.copy_(torch.tensor([0, pad]))
        steps = [m(rows[:, :S], None if static else per_row[:, :S], cache)]
        for t in range(S, n):
            if static:
                cache.pos.fill_(t)
            steps.append(m(rows[:, t : t + 1], None if static else per_row[:, t : t + 1], cache))
        got = torch.cat(steps, 1)
        ref0, ref1 = m(ids[:1]), m(ids[1:, : n - pad])
        torch.testing.assert_close(got[0], ref0[0], **tol(ref0))
        if static:  # the dynamic cache has no padding mask: row 1 would see its padding
            torch.testing.assert_close(got[1, pad:], ref1[0], **tol(ref1))


def test_sample_from_matches_multinomial():
    """The sync-free exponential race draws the same token as torch.multinomial from the same generator state."""
    w = torch.rand(6, 50) ** 4
    a = sample_from(w, torch.Generator().manual_seed(5))
    b = torch.multinomial(w / w.sum(-1, keepdim=True), 1, generator=torch.Generator().manual_seed(5))[:, 0]
    assert torch.equal(a, b)
