"""Tests of dsv3_min.monitor: signals as a flag, the progress bar in seconds or steps, named phases."""
import io
import os
import signal

from dsv3_min.monitor import Signals, phase, progress_bar


def test_signals_become_a_flag_and_the_old_handlers_come_back():
    """SIGTERM and SIGINT sent to this process inside `Signals` set `received` to their name and do not stop it; on
    exit both handlers are the ones from before."""
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for sig in (signal.SIGTERM, signal.SIGINT):
        with Signals() as sigs:
            assert sigs.received is None
            os.kill(os.getpid(), sig)
            assert sigs.received == sig.name
    assert {s: signal.getsignal(s) for s in before} == before


def test_progress_bar_counts_seconds_under_a_time_budget_and_names_a_phase():
    """With a time budget the bar's total is the budget and a resumed run starts at its elapsed seconds (capped);
    without one it counts steps from `start`. A phase names itself on the bar only while it runs."""
    with progress_bar(True, 100, 30.0, 5, 40.0) as bar:
        bar.fp = io.StringIO()
        assert (bar.total, bar.n) == (30.0, 30.0) and "s of training" in bar.bar_format
        with phase(bar, "writing checkpoint 7"):
            assert bar.desc == "writing checkpoint 7"
        assert bar.desc == ""
    with progress_bar(False, 100, 0.0, 5, 40.0) as bar:
        assert (bar.total, bar.n) == (100, 5)
