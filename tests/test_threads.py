"""CPU threads (dsv3_min.threads): `threads=0` takes the probe's count for the block, probes again after its period,
and restores torch's setting; a fixed count is taken as given; on a GPU device the setting is left alone. (The probe's
speed on a busy machine is measured by bench/threads_busy.py, not here: a benchmark is a script, not a timed test.)"""
import torch

import dsv3_min.threads as th
from dsv3_min.threads import Threads, probe_threads, usable_cores


def test_threads_zero_uses_the_probe_again_after_its_period_and_restores(monkeypatch):
    """`Threads(0)` on the CPU sets the probed count at entry, probes again only once `every` seconds have passed,
    and puts torch's previous count back at exit."""
    answers = iter([1, 2, 1])
    calls = []
    monkeypatch.setattr(th, "probe_threads", lambda: calls.append(1) or next(answers))
    clock = [100.0]
    monkeypatch.setattr(th.time, "perf_counter", lambda: clock[0])
    prev = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with Threads(0, "cpu", every=30) as t:
            assert t.auto and torch.get_num_threads() == 1 and len(calls) == 1
            clock[0] += 29
            t.check()
            assert len(calls) == 1
            clock[0] += 1
            t.check()
            assert len(calls) == 2 and torch.get_num_threads() == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(prev)


def test_a_fixed_count_and_a_gpu_device_do_not_probe(monkeypatch):
    """`Threads(3)` sets 3 threads without probing; `Threads(0, 'cuda')` leaves torch's count alone."""
    monkeypatch.setattr(th, "probe_threads", lambda: (_ for _ in ()).throw(AssertionError("probed")))
    prev = torch.get_num_threads()
    with Threads(3) as t:
        assert not t.auto and torch.get_num_threads() == 3
    with Threads(0, "cuda") as t:
        assert not t.auto and torch.get_num_threads() == prev
    assert torch.get_num_threads() == prev


def test_the_probe_answers_one_of_its_candidates_and_leaves_the_setting():
    """`probe_threads` answers 1, half or all of the usable cores, and leaves torch's thread count as it found it."""
    prev = torch.get_num_threads()
    cores = usable_cores()
    assert probe_threads() in {1, max(1, cores // 2), cores}
    assert torch.get_num_threads() == prev
