"""A viewer that starts before its run listens (``neurotop demo``): the UI draws at once
with what it waits for, then connects and controls the run; a run that never starts
closes it with the reason."""

from __future__ import annotations

import pytest

from neurotop.tui.data.client import LiveClient, RunGone
from neurotop.tui.data.targets import resolve
from neurotop.tui.screens.app import NeurotopApp
from tests.helpers.pilot import status_text, until

pytestmark = pytest.mark.slow  # starts a training process


async def test_the_ui_draws_while_waiting_then_connects_and_controls(start_run):
    polls: list[int] = []
    run = None

    def find():
        polls.append(1)
        return resolve(run.info.run_id) if run is not None else None

    client = LiveClient.pending(find, "starting the demo (importing torch)…").start()
    app = NeurotopApp(client)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: "STARTING" in status_text(app), what="STARTING")
            assert "starting the demo" in status_text(app)
            assert "conn: waiting" in status_text(app)
            await until(pilot, lambda: len(polls) >= 3, what="the client polling")
            run = start_run("--step-sleep", "0.01")  # now the run listens
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE")
            assert "starting the demo" not in status_text(app)
            await pilot.press("space")
            await until(pilot, lambda: "PAUSED" in status_text(app), what="PAUSED")
    finally:
        client.close()


async def test_a_run_that_never_starts_closes_the_ui_with_why():
    def find():
        raise RunGone("the demo exited with code 3 before it started")

    client = LiveClient.pending(find, "starting the demo (importing torch)…").start()
    app = NeurotopApp(client)
    try:
        async with app.run_test(size=(80, 24)) as pilot:
            await until(pilot, lambda: not app.is_running, what="the UI to close")
    finally:
        client.close()
    assert client.gone == "the demo exited with code 3 before it started"
    assert client.store.status.starting == client.gone
