"""Remote attach through a real OpenSSH server on 127.0.0.1 (the same machine plays the
remote host). The user's own ~/.ssh is never read or written: every ssh call uses this
test's config, key and known_hosts, through ``NEUROTOP_SSH_COMMAND``."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import zmq

from neurotop.protocol import connfile
from neurotop.tui.data.client import CommandError, Endpoints, LiveClient
from neurotop.tui.data.remote import ANSWER_TIMEOUT_S, SshTarget, connect, free_port
from neurotop.tui.data.targets import resolve
from neurotop.tui.screens.app import HelpScreen, NeurotopApp
from tests.helpers.cli import neurotop
from tests.helpers.pilot import status_text, until
from tests.helpers.waiting import wait_until

SSHD = Path("/usr/sbin/sshd")

pytestmark = [pytest.mark.slow, pytest.mark.skipif(  # a real sshd, and training processes
    not (SSHD.exists() and shutil.which("ssh") and shutil.which("ssh-keygen"))
    and not os.environ.get("CI"),
    reason="OpenSSH is not installed (.ci/run installs it, so CI never skips this)")]


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path


def pids() -> list[Path]:
    return [d for d in Path("/proc").iterdir() if d.name.isdigit()]


def ssh_clients(root: Path) -> list[int]:
    """Live ssh clients (tunnels, listings) started with this test's configs."""
    text, found = str(root / "ssh_config"), []
    for d in pids():
        try:
            cmdline = (d / "cmdline").read_bytes().decode(errors="replace")
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z" and int(d.name) != os.getpid():
            found.append(int(d.name))
    return found


def descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in pids():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = set(), [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.add(c)
            todo.append(c)
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


class Sshd:
    """OpenSSH's sshd in the foreground (-D -e) on a free loopback port, key auth only."""

    def __init__(self, root: Path, runtime_dir: Path) -> None:
        root.mkdir()
        self.root, self.port, self.user = root, free_port(), getpass.getuser()
        host_key, user_key, other_key = (keygen(root / n) for n in
                                         ("host_key", "user_key", "other_key"))
        (root / "authorized_keys").write_text((root / "user_key.pub").read_text())
        (root / "known_hosts").write_text(
            f"[127.0.0.1]:{self.port} {(root / 'host_key.pub').read_text()}")
        self.config = root / "sshd_config"
        self.config.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {host_key}",
            f"PidFile {root / 'sshd.pid'}", f"AuthorizedKeysFile {root / 'authorized_keys'}",
            "StrictModes no", "UsePAM no", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            # The "remote" login environment names the runtime dir the test's runs use.
            f"SetEnv NEUROTOP_RUNTIME_DIR={runtime_dir}", ""]))
        for name, key in (("ssh_config", user_key), ("ssh_config_wrong_key", other_key)):
            (root / name).write_text("\n".join([
                "Host *", f"  IdentityFile {key}", "  IdentitiesOnly yes", "  IdentityAgent none",
                f"  UserKnownHostsFile {root / 'known_hosts'}", "  GlobalKnownHostsFile /dev/null",
                "  StrictHostKeyChecking yes", "  UpdateHostKeys no", ""]))
        self.proc: subprocess.Popen | None = None
        self.sessions: set[int] = set()

    def url(self, run: str = "") -> str:
        return f"ssh://{self.user}@127.0.0.1:{self.port}" + (f"/{run}" if run else "")

    def ssh_command(self, wrong_key: bool = False) -> str:
        return f"ssh -F {self.root / ('ssh_config_wrong_key' if wrong_key else 'ssh_config')}"

    def start(self) -> None:
        log = open(self.root / "sshd.log", "ab")  # noqa: SIM115 - sshd's stderr, kept open
        self.proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(self.config)],
                                     stdin=subprocess.DEVNULL, stderr=log)
        log.close()
        wait_until(lambda: "Server listening" in (self.root / "sshd.log").read_text()
                   or self.proc.poll() is not None, what="sshd to listen")
        assert self.proc.poll() is None, (self.root / "sshd.log").read_text()

    def stop(self) -> None:
        """Stop the listener (sessions it started end when their clients go)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.sessions |= descendants(self.proc.pid)
            finally:
                self.proc.terminate()
                self.proc.wait(10)


@pytest.fixture
def sshd(tmp_path: Path, runtime_dir: Path, monkeypatch: pytest.MonkeyPatch):
    if not Path("/run/sshd").is_dir():  # sshd's privilege-separation directory
        if os.geteuid() != 0:
            pytest.skip("sshd needs /run/sshd, and only root can create it")
        Path("/run/sshd").mkdir(mode=0o755)
    server = Sshd(tmp_path / "sshd", runtime_dir)
    monkeypatch.setenv("NEUROTOP_SSH_COMMAND", server.ssh_command())
    server.start()
    try:
        yield server
    finally:
        server.stop()
        # Nothing left behind: no ssh client (tunnel or listing) using this test's config,
        # no sshd session. Clients were closed by the test; give their sessions a moment.
        wait_until(lambda: not ssh_clients(server.root)
                   and not [p for p in server.sessions if alive(p)],
                   timeout=10, what="ssh clients and sshd sessions to exit")


def test_ls_and_ctl_over_ssh_and_only_the_key_holder_can_pause(sshd, start_run):
    run = start_run("--step-sleep", "0.02")
    out = neurotop("ls", sshd.url())
    assert out.returncode == 0, out.stderr
    assert run.info.run_id in out.stdout and "test-loop" in out.stdout
    listed = json.loads(neurotop("ls", sshd.url(), "--json").stdout)
    assert [r["run_id"] for r in listed] == [run.info.run_id] and "key" not in listed[0]

    out = neurotop("ctl", sshd.url(run.info.run_id[-4:]), "pause")
    assert out.returncode == 0, out.stderr
    ack = json.loads(out.stdout)
    assert ack["ok"] and ack["new"] == "paused"
    out = neurotop("ctl", sshd.url(), "resume")
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["step"] == ack["step"]

    # Through the same kind of tunnel, a client that lacks the run's key cannot pause.
    info, link = connect(SshTarget.parse(sshd.url()), read_only=False)
    intruder = LiveClient(Endpoints(link.telemetry, link.control, os.urandom(32),
                                    link=link)).start()
    owner = LiveClient(resolve(sshd.url())).start()
    try:
        assert len(ssh_clients(sshd.root)) == 2, "two ssh tunnels, one per client"
        with pytest.raises(CommandError, match="not signed with this run's key"):
            intruder.command("pause").result(10)
        wait_until(lambda: owner.store.status.rejected >= 1, what="the refusal counted")
        s = owner.store.status.step
        wait_until(lambda: owner.store.status.step > s + 5, what="training going on")
        assert owner.store.status.state == "running"
        assert intruder.store.status.step > 0, "telemetry still flows to the intruder"
    finally:
        intruder.close()
        owner.close()
    # A read-only attach does not even forward the control port.
    watcher = resolve(sshd.url(), read_only=True)
    try:
        assert watcher.control is None and watcher.key is None
    finally:
        watcher.link.close()


def failing(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``neurotop ARGS``, expected to fail at once with the cause: quick means it never waits
    for its own answer timeout (a hang is killed there), and says what failed, not that
    something timed out."""
    out = neurotop(*args, env=env, timeout=ANSWER_TIMEOUT_S)
    assert out.returncode == 2, (out.stdout, out.stderr)
    timeouts = (f"within {ANSWER_TIMEOUT_S} s", "timed out")  # neurotop's own, and ssh's
    assert not any(t in out.stderr for t in timeouts), out.stderr
    return out


def test_ssh_errors_are_clear_and_quick(sshd, runtime_dir):
    wrong = {"NEUROTOP_SSH_COMMAND": sshd.ssh_command(wrong_key=True)}
    for args in (("ls", sshd.url()), ("attach", sshd.url()), ("ctl", sshd.url(), "pause")):
        out = failing(*args, env=wrong)
        assert "authentication failed" in out.stderr, out.stderr
        assert "never asks for a password" in out.stderr

    out = neurotop("ls", sshd.url())
    assert out.returncode == 0 and f"no live runs on {sshd.url()}" in out.stdout
    out = failing("attach", sshd.url())
    assert f"no live neurotop run on {sshd.url()}" in out.stderr

    dead = connfile.ConnectionInfo(run_id="20200101-000000-dead", name="x", pid=2**22 + 7,
                                   start_time=0, telemetry="tcp://127.0.0.1:1",
                                   control="tcp://127.0.0.1:2", key="00")
    connfile.write(dead)
    out = failing("attach", sshd.url("dead"))
    assert "run 20200101-000000-dead" in out.stderr
    assert "has ended" in out.stderr

    # Listed live, but its port is shut (it ended between listing and tunnel): said so.
    connfile.write(connfile.ConnectionInfo(
        run_id="20200101-000000-shut", name="x", pid=os.getpid(), start_time=time.time(),
        telemetry=f"tcp://127.0.0.1:{free_port()}", control=f"tcp://127.0.0.1:{free_port()}",
        key="00"))
    out = failing("attach", sshd.url("shut"))
    assert "the run's port does not answer" in out.stderr, out.stderr
    assert "Connection refused" in out.stderr

    out = failing("ls", f"ssh://127.0.0.1:{free_port()}")
    assert "cannot reach" in out.stderr and "refused" in out.stderr
    out = failing("attach", "ssh://user:secret@host")
    assert "never sends passwords" in out.stderr


async def test_attach_over_ssh_pause_resume_survive_a_drop_and_see_the_end(sshd, start_run):
    run = start_run("--step-sleep", "0.02")
    client = LiveClient(resolve(sshd.url())).start()
    link = client.endpoints.link
    app = NeurotopApp(client)
    try:
        async with app.run_test(size=(160, 40)) as pilot:
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE over ssh")
            first = client.store.status.step
            await until(pilot, lambda: client.store.status.step > first + 10, what="steps")

            await pilot.press("space")
            await until(pilot, lambda: "PAUSED" in status_text(app), what="PAUSED")
            held = client.store.status.step
            await asyncio.sleep(1.0)
            assert client.store.status.step == held
            await pilot.press("space")
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE again")

            # The connection drops (the host's sshd goes away and the tunnel dies): the UI
            # says so and keeps trying; when sshd is back, the view goes live again.
            sshd.stop()
            link.proc.send_signal(signal.SIGKILL)
            await until(pilot, lambda: "tunnel" in status_text(app)
                        and "reconnecting" in status_text(app), what="the drop shown")
            sshd.start()
            await until(pilot, lambda: "LIVE" in status_text(app) and not client.store.status.link,
                        timeout=30, what="LIVE after the reconnect")
            after = client.store.status.step
            await until(pilot, lambda: client.store.status.step > after + 10,
                        what="steps after the reconnect")

            run.stop()  # the run ends: the UI says so and the tunnel goes
            await until(pilot, lambda: "ENDED" in status_text(app), what="ENDED")
            await until(pilot, lambda: "has ended" in status_text(app), what="the end shown")
            await until(pilot, lambda: link.proc.poll() is not None, what="the tunnel closed")
            await pilot.press("q")
    finally:
        client.close()
    assert run.proc.poll() is not None


async def test_read_only_attach_over_ssh_hides_control(sshd, start_run):
    start_run("--step-sleep", "0.02")
    client = LiveClient(resolve(sshd.url(), read_only=True)).start()
    app = NeurotopApp(client, read_only=True)
    try:
        async with app.run_test(size=(120, 30)) as pilot:
            await until(pilot, lambda: "LIVE" in status_text(app), what="LIVE")
            assert "read-only" in status_text(app)
            shown = {b.binding.action for b in app.active_bindings.values()}  # the footer's
            assert "toggle_pause" not in shown and "help" in shown
            await pilot.press("space")
            await pilot.pause(1.0)
            assert client.store.status.state == "running" and not app.pending
            await pilot.press("question_mark")
            await pilot.pause(0.2)
            assert isinstance(app.screen, HelpScreen)
            assert "pause" not in str(app.screen.query_one("Static").render())
    finally:
        client.close()


def test_a_killed_viewer_takes_its_tunnel_down(sshd):
    """Even SIGKILLed, a viewer leaves no ssh behind (the tunnel dies with its parent)."""
    ctx = zmq.Context.instance()
    pub, router = ctx.socket(zmq.XPUB), ctx.socket(zmq.ROUTER)  # stand-ins for a run's
    ports = [s.bind_to_random_port("tcp://127.0.0.1") for s in (pub, router)]
    connfile.write(connfile.ConnectionInfo(
        run_id="20200101-000000-live", name="x", pid=os.getpid(), start_time=time.time(),
        telemetry=f"tcp://127.0.0.1:{ports[0]}", control=f"tcp://127.0.0.1:{ports[1]}",
        key="00"))
    code = ("import sys, time; from neurotop.tui.data.targets import resolve; resolve(sys.argv[1]);"
            " print('up', flush=True); time.sleep(120)")
    viewer = subprocess.Popen([sys.executable, "-c", code, sshd.url()], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert viewer.stdout.readline().strip() == "up"
        assert len(ssh_clients(sshd.root)) == 1
    finally:
        viewer.kill()
        viewer.wait()
        pub.close(0)
        router.close(0)
    wait_until(lambda: not ssh_clients(sshd.root), what="the tunnel to die with its viewer")
