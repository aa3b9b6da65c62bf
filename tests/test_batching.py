"""dsv3_min.batching: continuous batching over one static cache gives every request exactly the tokens the package's
own decoder (`infer.generate`) gives it alone, whenever it joins, through the cache's shifts; routing hooks."""
import threading

import pytest
import torch

from conftest import tiny_config
from dsv3_min.attention import KVCache
from dsv3_min.batching import Engine, RoutingRecorder, Seq, moe_layer_ids
from dsv3_min.infer import generate
from dsv3_min.mla import LatentCache
from dsv3_min.model import DeepSeekV3

CTX = 32  # a short context: the 64-slot cache shifts left and right within a few requests


def _model():
    torch.manual_seed(0)
    return DeepSeekV3(tiny_config(max_position_embeddings=CTX)).eval()


class Req:
    """A request's events: its tokens (and draft flags), its end reason; `on_token(n, fn)` runs `fn` in the engine's
    thread at token n."""

    def __init__(self, ids, max_new, hooks=None):
        self.ids, self.tokens, self.end, self.done, self.hooks = ids, [], None, threading.Event(), hooks or {}
        self.flags = []  # per token: an accepted MTP draft (True), a rejected one's replacement (False), else None
        self.seq = Seq(ids, max_new, self.emit, temperature=0.0)

    def emit(self, ev):
        if ev[0] == "token":
            self.tokens.append(ev[1])
            self.flags.append(ev[6])
            if fn := self.hooks.get(len(self.tokens)):
                fn()
        elif ev[0] == "end":
            self.end = ev[1]
            self.done.set()


@pytest.mark.parametrize("mla_impl", ["absorb", "naive"])
def test_requests_joining_mid_generation_decode_as_alone(mla_impl):
    """A (1-token prompt) runs alone; B (25-token prompt) joins at A's 3rd token (the rows shift right); C joins at
    A's 25th and runs past the cache's end (the rows shift left). Each gets exactly `generate`'s greedy tokens with
    the same MLA cache (the engine's default, the latent one, and the per-head K/V one)."""
    model = _model()
    eng = Engine(model, max_batch=3, **({} if mla_impl == "absorb" else {"mla_impl": mla_impl}))
    assert isinstance(eng.cache.layers[0], LatentCache if mla_impl == "absorb" else KVCache)  # latent by default
    g = torch.Generator().manual_seed(1)
    prompt = lambda n: torch.randint(0, model.config.vocab_size, (n,), generator=g).tolist()
    b, c = Req(prompt(25), 6), Req(prompt(10), 22)
    a = Req(prompt(1), 31, {3: lambda: eng.submit(b.seq), 25: lambda: eng.submit(c.seq)})
    try:
        eng.submit(a.seq)
        for r in (a, b, c):
            assert r.done.wait(60)
    finally:
        eng.close()
    assert eng.stats["shifts"] >= 2 and eng.busy == 0
    for r in (a, b, c):
        want = generate(model, torch.tensor(r.ids), r.seq.max_new, temperature=0, mla_impl=eng.mla_impl)[len(r.ids):]
        want = want.tolist()
        assert (r.tokens, r.end) == (want, "length")


def test_cancelled_request_leaves_its_row():
    """A request cancelled mid-generation ends 'cancelled' at the next step and frees its row; the other goes on."""
    model = _model()
    eng = Engine(model, max_batch=2)
    long_ = Req([1, 2, 3], 28)
    other = Req([4, 5], 20)
    long_.hooks[4] = lambda: setattr(long_.seq, "cancelled", True)
    try:
        eng.submit(long_.seq)
        eng.submit(other.seq)
        assert long_.done.wait(60) and other.done.wait(60)
    finally:
        eng.close()
    assert long_.end == "cancelled" and len(long_.tokens) == 4 and eng.stats["cancelled"] == 1
    assert other.end == "length" and len(other.tokens) == 20


def test_engine_step_attends_over_its_rows_span_only(monkeypatch):
    """The cache holds 2 x context = 64 slots, but each decode step attends over the slots its rows span (from the
    smallest `start` to the new token), not all 64: a 1-token prompt's prefill reads 1 slot, its k-th step k + 1."""
    import dsv3_min.mla as mla
    widths, attend = [], mla.latent_attention
    monkeypatch.setattr(mla, "latent_attention", lambda q, qp, latent, *a, **k: widths.append(latent.shape[1])
                        or attend(q, qp, latent, *a, **k))
    model = _model()
    eng = Engine(model, max_batch=2)
    r = Req([5], 8)
    try:
        eng.submit(r.seq)
        assert r.done.wait(60)
    finally:
        eng.close()
    assert eng.cache.layers[0].max_len == 2 * CTX and len(r.tokens) == 8
    assert widths[::model.config.num_hidden_layers] == list(range(1, 9)), widths  # prefill, then 7 steps


def test_routing_recorder_hooks_the_routers_and_removes_them():
    """The recorder keeps each MoE router's top-k ids and weights of the last forward, (T, layers, k) in (b s) order,
    as the router computes them; leaving the `with` block removes every hook."""
    model = _model()
    gates = [model.layers[i].mlp.gate for i in moe_layer_ids(model)]
    seen = []
    handles = [g.register_forward_hook(lambda m, a, out: seen.append(out)) for g in gates]
    x = torch.randint(0, model.config.vocab_size, (2, 5))
    with torch.no_grad(), RoutingRecorder(model) as rec:
        model(x)
        idx, w = rec.take()
    for h in handles:
        h.remove()
    assert idx.shape == (10, len(gates), model.config.num_experts_per_tok)
    for j, (weights, ids, _) in enumerate(seen):
        assert torch.equal(idx[:, j], ids) and torch.equal(w[:, j], weights.float())
    assert all(not g._forward_hooks for g in gates)



def _mirroring(cfg):
    """test_infer's agreeing model, its MTP block keeping the main block's attention: MTP's draft is nearly the main
    model's next prediction, and it depends on MTP's own cache (a draft from a misplaced MTP cache is rejected)."""
    from test_infer import _agreeing
    m = _agreeing(cfg, attn_scale=0.3)
    with torch.no_grad():
        m.mtp[0].self_attn.o_proj.weight.copy_(m.layers[0].self_attn.o_proj.weight)
    return m


def mtp_greedy(model, ids, n):
    """Greedy `generate(draft='mtp')` alone (token for token plain greedy's, test_infer): the new tokens, and per new
    token True an accepted draft, False the replacement of a rejected one, None otherwise (first token, bonus token)."""
    stats = {}
    out = generate(model, torch.tensor(ids), n, temperature=0, draft="mtp", stats=stats, mla_impl="absorb")
    out = out[len(ids):].tolist()
    flags = [None]
    for ok in stats["accept"][:, 0].tolist():
        flags += [True, None] if ok else [False]
    return out, flags[:n]


def test_mtp_drafting_engine_decodes_each_request_as_generate():
    """`Engine(draft="mtp")`, 3 rows, 5 requests joining mid-generation through the cache's shifts, on a random model
    (drafts mostly rejected) and on one whose MTP mirrors it (rows of one step accept different numbers of drafts, so
    rejected rows move): greedy requests get exactly the tokens of `generate(draft='mtp')` alone (plain greedy's) and
    the same drafts accepted and rejected; a seeded sampled one (row 0 throughout) exactly `generate(draft='mtp', seed=7)`'s."""
    torch.manual_seed(0)
    cfg = tiny_config(max_position_embeddings=CTX)
    for m in [DeepSeekV3(cfg).eval(), _mirroring(cfg)]:
        eng = Engine(m, max_batch=3, draft="mtp")
        g = torch.Generator().manual_seed(1)
        reqs = [Req(torch.randint(0, m.config.vocab_size, (n,), generator=g).tolist(), k)
                for n, k in [(1, 31), (25, 6), (10, 22), (5, 20), (3, 20)]]
        reqs[0].seq.temperature, reqs[0].seq.seed = 1.0, 7
        try:
            for r in reqs:
                eng.submit(r.seq)
            assert all(r.done.wait(60) for r in reqs)
        finally:
            eng.close()
        assert eng.stats["shifts"] >= 2 and all(r.end == "length" for r in reqs)
        assert reqs[0].tokens == generate(m, torch.tensor(reqs[0].ids), 31, temperature=1.0, seed=7,
                                          draft="mtp", mla_impl="absorb")[len(reqs[0].ids):].tolist()
        for r in reqs[1:]:
            assert (r.tokens, r.flags) == mtp_greedy(m, r.ids, r.seq.max_new)
    accepted = [r.flags.count(True) for r in reqs]
    assert len(set(accepted)) > 1 and any(False in r.flags for r in reqs), accepted  # per-row verdicts taken
