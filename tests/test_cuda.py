"""The GPU paths that a CPU cannot run: the decode step captured in a CUDA graph (and compiled), MTP speculation through
it, and the training step compiled on the GPU. Skipped without a CUDA device (CI has none); run on a GPU with
`python -m pytest tests/test_cuda.py`."""
import pytest
import torch

from conftest import tiny_config
from dsv3_min.infer import generate
from dsv3_min.model import DeepSeekV3, reference_generate
from dsv3_min.optim import make_optimizer
from dsv3_min.step import lm_loss, train_step
from dsv3_min.train import train_config_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

KINDS = [{"mla_impl": "naive"}, {"mla_impl": "absorb"}, {"attention": "gqa", "num_key_value_heads": 2}]


def _left_padded(m, lengths, seed=0):
    "A left-padded batch of random prompts of `lengths` on the GPU, its attention mask, and the prompts alone."
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, m.config.vocab_size, (n,), generator=g) for n in lengths]
    S = max(lengths)
    ids = torch.stack([torch.cat([torch.zeros(S - len(p), dtype=torch.long), p]) for p in prompts])
    mask = (torch.arange(S) >= torch.tensor([S - n for n in lengths])[:, None]).long()
    return ids.cuda(), mask.cuda(), [p.cuda() for p in prompts]


@pytest.mark.parametrize("kw", KINDS)
@pytest.mark.parametrize("draft", [None, "mtp"])
def test_cuda_graph_greedy_equals_the_reference_decoder(kw, draft):
    """On the GPU (fp32), `generate` decodes through a captured CUDA graph by default; its greedy tokens equal the
    reference decoder's for every attention kind, with MTP drafts too, and a left-padded batch equals each row alone."""
    torch.manual_seed(0)
    m = DeepSeekV3(tiny_config(num_nextn_predict_layers=1, **kw)).cuda().eval()
    ids, mask, prompts = _left_padded(m, (9, 4, 6))
    out = generate(m, ids, 24, temperature=0, attention_mask=mask, draft=draft)
    S = ids.shape[1]
    for row, p in zip(out, prompts):
        ref = reference_generate(m, p, 24, temperature=0)
        assert torch.equal(row[S:], ref[len(p):]), (kw, draft)
    graphs = [getattr(e, "_iter", e._step) for e in m._decoders.values() if e.use_graph]
    assert any(g.graph is not None for g in graphs), "no CUDA graph was captured"


def test_compiled_cuda_graph_greedy_equals_the_reference_decoder():
    """`generate(..., compile=True)` (the step compiled, then captured) gives the reference decoder's greedy tokens."""
    torch.manual_seed(1)
    m = DeepSeekV3(tiny_config(mla_impl="absorb")).cuda().eval()
    p = torch.randint(1, m.config.vocab_size, (2, 7), device="cuda")
    assert torch.equal(generate(m, p, 20, temperature=0, compile=True), reference_generate(m, p, 20, temperature=0))


def test_compiled_train_step_equals_eager_on_the_gpu():
    """The package's `train_step` with the loss compiled on the GPU gives the eager step's loss parts (fp32, 1e-5)."""
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        m = DeepSeekV3(tiny_config()).cuda().train()
        tc = train_config_for("test-tiny")
        opt = make_optimizer(m, tc, torch.device("cuda"))
        loss_fn = torch.compile(lm_loss) if compiled else lm_loss
        x = torch.randint(0, m.config.vocab_size, (2, 17), device="cuda")
        parts = [train_step(m, opt, [(x[:, :-1], x[:, 1:])], loss_fn=loss_fn, lr=1e-3, grad_clip=1.0)[0]
                 for _ in range(3)]
        results.append(torch.stack([torch.as_tensor(p).float().cpu() for p in parts]))
    torch.testing.assert_close(results[1], results[0], rtol=1e-5, atol=1e-5)
