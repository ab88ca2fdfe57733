"""SIGTERM and SIGHUP, as schedulers and dropped SSH sessions send them, end a real
training process with an END record in its session file, no connection file left, and
the exit status the signal gives (or the one the user's own handler chose)."""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import neurotop
from neurotop.protocol import connfile, runs
from neurotop.protocol.sessionfile import MESSAGE, SessionReader
from neurotop.tui.data.client import Endpoints, LiveClient
from tests.helpers.training import TRAIN, Run, start_training, watch_options
from tests.helpers.waiting import wait_until

pytestmark = pytest.mark.slow

SCRIPT_WITH_HANDLER = TRAIN.with_name("train_user_handler.py")


def signalled(sig: signal.Signals, *args: str, script: Path = TRAIN,
              before: Callable[[Run], None] | None = None) -> tuple[Run, list[str]]:
    """A training process sent ``sig`` once it is training (and ``before(run)`` is done);
    its stdout lines."""
    run = start_training("--step-sleep", "0.01", *args, script=script)
    try:
        lines = []
        while not lines or not lines[-1].startswith("READY"):  # watch() has returned
            line = run.proc.stdout.readline().decode()
            assert line, f"training exited early: {run.proc.stderr.read().decode()[-3000:]}"
            lines.append(line.strip())
        if before is not None:
            before(run)
        run.proc.send_signal(sig)
        out, err = run.proc.communicate(timeout=60)
    except BaseException:
        run.proc.kill()
        run.proc.wait()
        raise
    return run, lines + out.decode().splitlines()


def connection_file(run: Run) -> Path:
    return connfile.conn_path(run.info.run_id)


def session_of(run: Run) -> SessionReader:
    return SessionReader(Path(run.info.run_dir) / runs.SESSION_FILE)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_a_signal_ends_the_session_and_the_exit_status_is_the_signals(sig):
    run, _ = signalled(sig)
    assert run.proc.returncode == -sig  # killed by the signal, as without neurotop
    assert not connection_file(run).exists()
    with session_of(run) as r:
        assert r.end is not None, r.problems
        assert r.problems == []
        assert (r.index["type"] == MESSAGE).sum() > 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)
def test_the_users_own_handler_is_still_called(sig):
    run, lines = signalled(sig, script=SCRIPT_WITH_HANDLER)
    assert f"USER HANDLER {int(sig)}" in lines
    assert run.proc.returncode == 7  # the handler's sys.exit(7)
    assert not connection_file(run).exists()
    with session_of(run) as r:
        assert r.end is not None, r.problems


def test_a_paused_run_ends_cleanly_too():
    """A run held at a pause (or an auto-pause nobody answered) when the job is ended."""
    def pause(run: Run) -> None:
        c = LiveClient(Endpoints(run.info.telemetry, run.info.control,
                                 run.info.key_bytes)).start()
        try:
            assert c.command("pause").result(30)["ok"]
            wait_until(lambda: c.store.status.state == "paused", 30, what="the run paused")
        finally:
            c.close()

    run, _ = signalled(signal.SIGTERM, before=pause)
    assert run.proc.returncode == -signal.SIGTERM
    assert not connection_file(run).exists()
    with session_of(run) as r:
        assert r.end is not None, r.problems


def test_opting_out_leaves_the_signal_alone():
    run, _ = signalled(signal.SIGTERM, *watch_options(handle_signals=False))
    assert run.proc.returncode == -signal.SIGTERM
    assert connection_file(run).exists()  # what neurotop ls cleans up later
    with session_of(run) as r:
        assert r.end is None


def test_handlers_installed_on_the_main_thread_only_and_restored_on_close(caplog):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    before = signal.getsignal(signal.SIGTERM)
    mon = neurotop.watch(model, torch.optim.SGD(model.parameters(), lr=0.1), record=False)
    try:
        assert signal.getsignal(signal.SIGTERM) != before
    finally:
        mon.close()
    assert signal.getsignal(signal.SIGTERM) == before

    caplog.set_level("DEBUG", logger="neurotop.signals")
    errors: list[BaseException] = []

    def off_main() -> None:
        try:
            neurotop.watch(model, record=False).close()
        except BaseException as e:  # re-raised below, on the test's thread
            errors.append(e)

    t = threading.Thread(target=off_main)
    t.start()
    t.join(60)
    assert not errors and not t.is_alive()
    assert signal.getsignal(signal.SIGTERM) == before
    assert "off the main thread" in caplog.text
