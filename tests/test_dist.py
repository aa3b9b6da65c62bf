"""Tests of dsv3_min.dist in one process: every helper is the plain single-process operation (the distributed
behaviour is proven against the single-process run in tests/test_parallel.py and tests/test_torchrun.py)."""
import torch
import torch.distributed as dist

from dsv3_min import dist as dd


def test_helpers_are_the_plain_operations_in_one_process():
    """Without a process group: rank 0 of 1, all rows kept, the mean and the sum over ranks are the value itself,
    the max over ranks returns the values, `rank0_first` just calls, and the clip equals
    `torch.nn.utils.clip_grad_norm_` bit for bit (norm and clipped gradients)."""
    assert not dist.is_initialized()
    assert (dd.rank(), dd.world_size(), dd.is_rank0()) == (0, 1, True)
    x = torch.arange(12.0).reshape(6, 2)
    assert torch.equal(dd.my_rows(x), x) and torch.equal(dd.global_mean(x), x)
    assert torch.equal(dd.sum_over_ranks_(x.clone()), x) and dd.max_over_ranks(3, 2.5) == (3.0, 2.5)
    assert dd.rank0_first(lambda: 7) == 7
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 8), torch.nn.Linear(4, 8)
    b.load_state_dict(a.state_dict())
    inp = torch.randn(16, 4)
    for m in (a, b):
        m(inp).square().sum().backward()
    ours, ref = dd.clip_grad_norm_(a.parameters(), 0.5), torch.nn.utils.clip_grad_norm_(b.parameters(), 0.5)
    assert float(ref) > 0.5 and torch.equal(ours, ref)
    assert all(torch.equal(p.grad, q.grad) for p, q in zip(a.parameters(), b.parameters()))


def test_optimizer_state_by_name_round_trips_and_is_empty_before_a_step():
    """The optimizer state keyed by parameter name loads into a fresh optimizer over a twin model (every tensor
    equal); before any step it is empty, so nothing (not even a step count) is carried over."""
    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(a.parameters())
    assert dd.optimizer_state_by_name(a, opt) == {}
    a(torch.randn(5, 4)).sum().backward()
    opt.step()
    state = dd.optimizer_state_by_name(a, opt)
    assert sorted(state["state"]) == ["bias", "weight"]
    opt2 = torch.optim.AdamW(b.parameters())
    dd.load_optimizer_state(b, opt2, state)
    for p, q in zip(a.parameters(), b.parameters()):
        assert all(torch.equal(opt.state[p][k], opt2.state[q][k]) for k in opt.state[p])
