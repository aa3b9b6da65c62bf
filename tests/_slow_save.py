"""Test-only launcher: `python tests/_slow_save.py SECONDS ARGS...` runs the command line (`dsv3_min.__main__.main`)
with every checkpoint write slowed by SECONDS inside its temporary folder, so that a crash test can SIGKILL a real
process (or a torchrun) in the middle of a write. The runtime has no flag or callback for this: the test patches
`files.atomic_dir` as the checkpoint module sees it."""
import contextlib
import sys
import time

import dsv3_min.checkpoint as ck


def slow_saves(seconds: float) -> None:
    "Make every checkpoint write wait `seconds` after its files are written, before its folder gets its real name."
    real = ck.atomic_dir

    @contextlib.contextmanager
    def slow(*args, **kwargs):
        with real(*args, **kwargs) as tmp:
            yield tmp
            time.sleep(seconds)

    ck.atomic_dir = slow


if __name__ == "__main__":
    slow_saves(float(sys.argv[1]))
    from dsv3_min.__main__ import main
    sys.exit(main(sys.argv[2:]))
