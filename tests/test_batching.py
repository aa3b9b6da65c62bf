"""dsv3_min.batching: continuous batching over one static cache gives every request exactly the tokens the package's
own decoder (`infer.generate`) gives it alone, whenever it joins, through the cache's shifts; routing hooks."""
import threading

import torch

from conftest import tiny_config
from dsv3_min.batching import Engine, RoutingRecorder, Seq, moe_layer_ids
from dsv3_min.infer import generate
from dsv3_min.model import DeepSeekV3

CTX = 32  # a short context: the 64-slot cache shifts left and right within a few requests


def _model():
    torch.manual_seed(0)
    return DeepSeekV3(tiny_config(max_position_embeddings=CTX)).eval()


class Req:
    """A request's events: its tokens, its end reason; `on_token(n, fn)` runs `fn` in the engine's thread at token n."""

    def __init__(self, ids, max_new, hooks=None):
        self.ids, self.tokens, self.end, self.done, self.hooks = ids, [], None, threading.Event(), hooks or {}
        self.seq = Seq(ids, max_new, self.emit, temperature=0.0)

    def emit(self, ev):
        if ev[0] == "token":
            self.tokens.append(ev[1])
            if fn := self.hooks.get(len(self.tokens)):
                fn()
        elif ev[0] == "end":
            self.end = ev[1]
            self.done.set()


def test_requests_joining_mid_generation_decode_as_alone():
    """A (1-token prompt) runs alone; B (25-token prompt) joins at A's 3rd token (the rows shift right); C joins at
    A's 25th and runs past the cache's end (the rows shift left). Each gets exactly `generate`'s greedy tokens."""
    model = _model()
    eng = Engine(model, max_batch=3)
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
        want = generate(model, torch.tensor(r.ids), r.seq.max_new, temperature=0)[len(r.ids):].tolist()
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
