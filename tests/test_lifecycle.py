"""The daemons' shutdown helper (shared/ops/lifecycle.py): a signal stops the daemon whatever the main thread holds.

Each case runs in an interpreter of its own (it signals itself), killed if it does not end in time: the
failure these tests guard against is a process that waits for itself for ever.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from conftest import REPO_ROOT

PRELUDE = """
import os, signal, threading
from shared.ops.lifecycle import Shutdown

def signal_self():
    os.kill(os.getpid(), signal.SIGTERM)
    sum(range(1000))  # the handler runs at one of these bytecodes, in this frame
"""


def _run(body: str, timeout_s: float = 30.0) -> subprocess.CompletedProcess:
    code = PRELUDE + textwrap.dedent(body)
    try:
        return subprocess.run(
            [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout_s
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it (SIGKILL: SIGTERM would be handled)
        raise AssertionError(f"the process did not end within {timeout_s:.0f} s; it wrote: {exc.stdout!r}") from exc


def test_a_signal_while_the_main_thread_holds_the_stop_events_lock_still_stops():
    # inside Event.wait the main thread holds the event's lock for a few bytecodes; a handler that set the event
    # itself would wait for that lock for ever (this case hung before the handler stopped taking locks)
    done = _run(
        """
        with Shutdown() as shutdown:
            with shutdown.event._cond:  # what Event.wait holds around its wait (CPython's threading)
                signal_self()
            print("set", shutdown.event.wait(10), "signal", shutdown.signum, flush=True)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["set", "True", "signal", str(15)]


def test_interrupt_unwinds_the_main_thread_and_callbacks_run_once_for_two_signals():
    done = _run(
        """
        class Stopped(Exception):
            pass

        calls = []
        with Shutdown(interrupt=Stopped) as shutdown:
            shutdown.on_stop(lambda: calls.append("stop"))
            for _ in range(2):
                try:
                    signal_self()
                    print("not interrupted", flush=True)
                except Stopped:
                    print("interrupted", flush=True)
            watchers = [t for t in threading.enumerate() if t.name == "shutdown"]
            print("set", shutdown.event.wait(10), "watchers", len(watchers), flush=True)
        for t in watchers:  # leaving the block ends the watcher, once it has run the callbacks
            t.join(10)
        print("watcher ended", not any(t.is_alive() for t in watchers), "calls", calls, flush=True)
        print("handler restored", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, flush=True)
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "interrupted",
        "interrupted",
        "set True watchers 1",
        "watcher ended True calls ['stop']",
        "handler restored True",
    ]
