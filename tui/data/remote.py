"""Runs on another machine, reached with the system ``ssh``.

Listing needs only a POSIX shell on the remote host, not neurotop: one
``ssh HOST sh -c SCRIPT`` prints every connection file in the remote runtime
directory (``$NEUROTOP_RUNTIME_DIR`` in the remote login environment, else
``~/.local/share/neurotop/runtime``) with whether its process is alive.
Attaching forwards the run's ports to free local ports with one
``ssh -N -L ... -L ...``, kept up by a supervisor thread: when ssh dies the UI is
told, the run is looked up again and the tunnel restarted on the same local ports,
so the client's ZeroMQ sockets reconnect by themselves. ssh always runs with
BatchMode=yes, so it never asks for a password; with ``NEUROTOP_SSH_COMMAND`` (like
git's ``GIT_SSH_COMMAND``) you choose the program and add options.
"""

from __future__ import annotations

import atexit
import json
import os
import shlex
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import IO
from urllib.parse import unquote, urlsplit

from neurotop.protocol import connfile
from neurotop.protocol.connfile import ConnectionInfo
from neurotop.tui.data.children import die_with_parent
from neurotop.tui.data.store import RunStore

SSH_COMMAND_ENV = "NEUROTOP_SSH_COMMAND"
CONNECT_TIMEOUT_S = 10
#: Over ConnectTimeout: authentication and the remote shell also take time.
ANSWER_TIMEOUT_S = CONNECT_TIMEOUT_S + 20
#: First on the command line, so neither ssh_config nor NEUROTOP_SSH_COMMAND undoes them.
#: No connection sharing: a ControlPersist master would outlive neurotop, and a tunnel
#: through another process's master would not be ours to supervise or stop.
_FORCED = ("-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes", "-o", "ControlMaster=no",
           "-o", "ControlPath=none")
#: After the user's own options, which win over these.
_DEFAULTS = ("-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}", "-o", "ServerAliveInterval=5",
             "-o", "ServerAliveCountMax=3")

#: Prints ``dir PATH`` then ``live|ended JSON`` per connection file, JSON on one line.
LIST_SCRIPT = r"""d="${NEUROTOP_RUNTIME_DIR:-$HOME/.local/share/neurotop/runtime}"
printf 'dir %s\n' "$d"
for f in "$d"/run-*.json; do
  [ -f "$f" ] || continue
  pid=$(sed -n 's/.*"pid": *\([0-9][0-9]*\).*/\1/p' "$f" | head -n 1)
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then s=live; else s=ended; fi
  printf '%s ' "$s"; tr -d '\n' < "$f"; echo
done"""

_UNREACHABLE = ("could not resolve hostname", "connection refused", "timed out",
                "no route to host", "network is unreachable", "connection closed",
                "connection reset", "name or service not known")


class SshError(RuntimeError):
    """ssh failed, or the host has no such run. ``reason``: auth, hostkey, unreachable,
    no-runs, ended or failed; ``brief``: a few words for the status bar."""

    def __init__(self, message: str, reason: str = "failed", brief: str = "") -> None:
        super().__init__(message)
        self.reason = reason
        self.brief = brief or message


@dataclass(frozen=True)
class SshTarget:
    """``ssh://[user@]host[:port][/RUN]``; ``run`` is a run id, prefix or suffix."""

    host: str
    user: str = ""
    port: int | None = None
    run: str = ""

    @classmethod
    def parse(cls, url: str) -> SshTarget:
        form = "ssh://[user@]host[:port][/RUN]"
        u = urlsplit(url)
        try:
            port = u.port
        except ValueError:
            raise SshError(f"bad port in {url!r}; expected {form}") from None
        host = u.hostname or ""
        if u.scheme != "ssh" or not host or host.startswith("-"):
            raise SshError(f"{url!r} is not {form}")
        if u.password is not None:
            raise SshError(f"{url!r} holds a password; neurotop never sends passwords: it uses"
                           " your ssh keys (ssh-agent, ~/.ssh/config)")
        run = u.path.strip("/")
        if "/" in run or u.query or u.fragment:
            raise SshError(f"{url!r} is not {form}")
        return cls(host, unquote(u.username or ""), port, run)

    @property
    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        return f"ssh://{self.user + '@' if self.user else ''}{host}{port}"

    def argv(self, *options: str, command: str = "") -> list[str]:
        """The ssh command line: forced options, the user's, defaults, ``options``, host."""
        words = shlex.split(os.environ.get(SSH_COMMAND_ENV) or "ssh")
        port = ("-p", str(self.port)) if self.port else ()
        return [words[0], *_FORCED, *words[1:], *_DEFAULTS, *port, *options, "--",
                self.destination, *([command] if command else [])]


@dataclass
class Listing:
    """The connection files found on a host: live runs (newest first) and ended ones."""

    target: SshTarget
    runtime_dir: str
    live: list[ConnectionInfo]
    ended: list[ConnectionInfo]

    @property
    def where(self) -> str:
        return f"on {self.target} (looked in {self.runtime_dir})"

    def pick(self) -> ConnectionInfo:
        """The run the target names (the newest without one), or an ``SshError`` that says
        whether there is none, no such one, or it has ended."""
        wanted = self.target.run or None
        try:
            return connfile.pick(self.live, wanted, self.where)
        except LookupError as e:
            if wanted:
                try:
                    gone = connfile.pick(self.ended, wanted, self.where)
                except LookupError:
                    pass
                else:
                    raise SshError(f"run {gone.run_id} {self.where} has ended (its process"
                                   f" {gone.pid} is gone)", "ended") from None
            raise SshError(str(e), "no-runs") from None


def list_runs(target: SshTarget, halt: threading.Event | None = None) -> Listing:
    """The runs on ``target``'s host, read over one ssh call (given up when ``halt`` is set)."""
    out = _ssh_output(target, "sh -c " + shlex.quote(LIST_SCRIPT), halt)
    runtime_dir, live, ended = "", [], []
    for line in out.splitlines():
        word, _, rest = line.partition(" ")
        if word == "dir":
            runtime_dir = rest
        elif word in ("live", "ended"):
            try:
                info = ConnectionInfo.from_dict(json.loads(rest))
            except (ValueError, TypeError):
                continue  # half-written or foreign file: not a run we can reach
            (live if word == "live" else ended).append(info)
    live.sort(key=lambda i: i.start_time, reverse=True)
    return Listing(target, runtime_dir or "?", live, ended)


def _ssh_output(target: SshTarget, command: str, halt: threading.Event | None) -> str:
    argv = target.argv(command=command)
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=die_with_parent)
    except FileNotFoundError:
        raise SshError(f"no {argv[0]!r} command: install the OpenSSH client") from None
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while True:
        try:
            out, err = proc.communicate(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            closing = halt is not None and halt.is_set()
            if closing or time.monotonic() > deadline:
                proc.kill()
                proc.communicate()
                if closing:
                    raise SshError("closed while listing runs") from None
                raise SshError(f"{target} did not answer within {ANSWER_TIMEOUT_S} s",
                               "unreachable", "no answer") from None
    if proc.returncode == 255:
        raise ssh_failure(target, err)
    if proc.returncode != 0:
        raise SshError(f"listing runs {target} failed (exit {proc.returncode}):"
                       f" {_last_line(err) or 'no message'}")
    return out


def ssh_failure(target: SshTarget, stderr: str) -> SshError:
    """Turn what ssh printed when it gave up (exit 255) into an error that says what to do."""
    detail = _last_line(stderr).rstrip(".") or "ssh exited with status 255 and said nothing"
    brief = detail.rsplit(": ", 1)[-1]  # "ssh: connect to host h port 22: Connection refused"
    text = stderr.lower()
    dest = target.destination + (f" -p {target.port}" if target.port else "")
    if "permission denied" in text or "too many authentication failures" in text:
        return SshError(
            f"{target}: authentication failed ({detail}). neurotop runs ssh with BatchMode=yes"
            " and never asks for a password: load your key (ssh-add) or install it on the"
            f" host (ssh-copy-id), then check that `ssh {dest} true` runs without a prompt",
            "auth", "authentication failed")
    if "host key verification failed" in text or "host identification has changed" in text:
        return SshError(
            f"{target}: host key verification failed: the host is not in your known_hosts, or"
            f" its key changed. Run `ssh {dest}` once in a terminal to check and accept it",
            "hostkey", "host key verification failed")
    if any(s in text for s in _UNREACHABLE):
        return SshError(f"cannot reach {target}: {detail}", "unreachable", brief)
    return SshError(f"ssh to {target} failed: {detail}", "failed", brief)


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and not ln.startswith("Warning: Permanently added")]
    return lines[-1] if lines else ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _remote_address(endpoint: str) -> tuple[str, int]:
    """Where, seen from the remote host, a run's ``tcp://`` endpoint can be reached; for an
    ``ipc://`` one (a job's node relay), its socket's path and port 0 (OpenSSH >= 6.7
    forwards a local port to a remote Unix socket)."""
    if endpoint.startswith("ipc:///"):
        return endpoint.removeprefix("ipc://"), 0
    u = urlsplit(endpoint)
    if u.scheme != "tcp" or not u.port:
        raise SshError(f"the run's endpoint {endpoint!r} is not tcp://host:port")
    host = u.hostname or "*"
    return {"*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), u.port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def _answers(port: int, timeout: float = 5.0) -> bool:
    """Whether what is behind the tunnel speaks: a ZeroMQ peer sends its greeting at once,
    while ssh closes the connection when the remote port is shut or forwarding forbidden."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            return bool(s.recv(1))
    except OSError:
        return False


class SshLink:
    """``ssh -N -L`` tunnels to one run's ports, kept up while a client uses them.

    One supervisor thread starts every ssh (so PR_SET_PDEATHSIG ties ssh to it), restarts
    it when it dies, and stops it on ``close()``: no ssh outlives the link.
    ``status`` is what the UI shows about the link ("" while all is well).
    """

    RETRY_MAX_S = 8.0
    #: While the run is silent, how often to ask the host whether it still exists.
    CHECK_EVERY_S = 10.0

    def __init__(self, target: SshTarget, info: ConnectionInfo, *, control: bool = True) -> None:
        self.target, self.info = target, info
        # A job: its head node's relay (every rank of that node) and rank 0's control
        relay = info.relays[0] if info.relays and info.relays[0].startswith("ipc:///") else ""
        self.relay = relay  #: the job's relay this link forwards ("": the run's telemetry)
        wanted = [relay or info.telemetry,
                  *([info.job_control or info.control] if control else [])]
        self._remote = [_remote_address(ep) for ep in wanted]
        self._local = [free_port() for _ in self._remote]
        self.proc: subprocess.Popen | None = None
        self.status = ""
        self._log: IO[bytes] | None = None
        self._store: RunStore | None = None
        self._halt = threading.Event()
        self._opened = threading.Event()
        self._open_error: SshError | None = None
        self._thread = threading.Thread(target=self._supervise, name="neurotop-ssh",
                                        daemon=True)

    @property
    def telemetry(self) -> str:
        return f"tcp://127.0.0.1:{self._local[0]}"

    @property
    def control(self) -> str | None:
        return f"tcp://127.0.0.1:{self._local[1]}" if len(self._local) > 1 else None

    def open(self) -> SshLink:
        """Start the tunnel and wait until it forwards; raise ``SshError`` if it cannot."""
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            self._thread.join()
            raise self._open_error
        atexit.register(self.close)
        return self

    def attach(self, store: RunStore) -> None:
        """Report the link's state into ``store``, and read the run's liveness from it."""
        self._store = store
        store.set_link(self.status)

    def close(self) -> None:
        """Stop the tunnel; returns once ssh has exited. Idempotent."""
        self._halt.set()
        if self._thread.is_alive():
            self._thread.join(15)
        atexit.unregister(self.close)

    # -- the supervisor thread --------------------------------------------------------------

    def _supervise(self) -> None:
        try:
            try:
                self._start(initial=True)
            except SshError as e:
                self._open_error = e
                return
            finally:
                self._opened.set()
            self._keep_up()
        finally:
            self._stop_ssh()
            if self._log is not None:
                self._log.close()

    def _start(self, initial: bool = False) -> None:
        """Run ssh and wait until the last local port accepts (all are bound together)."""
        for attempt in range(3):
            self._stop_ssh()
            forwards = [f"-L127.0.0.1:{lp}:{h}" if not rp else  # rp 0: a Unix socket
                        f"-L127.0.0.1:{lp}:{f'[{h}]' if ':' in h else h}:{rp}"
                        for lp, (h, rp) in zip(self._local, self._remote, strict=True)]
            if self._log is not None:
                self._log.close()
            # ssh's stderr: a pipe could fill and block ssh; append mode, so our reads
            # never move where ssh writes.
            self._log = tempfile.TemporaryFile("a+b")
            try:
                self.proc = subprocess.Popen(
                    self.target.argv("-N", *forwards), stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=self._log, preexec_fn=die_with_parent)
            except FileNotFoundError:
                raise SshError(f"no {self.target.argv()[0]!r} command: install the OpenSSH"
                               " client") from None
            deadline = time.monotonic() + ANSWER_TIMEOUT_S
            while self.proc.poll() is None:
                if _accepts(self._local[-1]):
                    if _answers(self._local[0]):
                        return
                    self._halt.wait(0.2)  # for ssh to log why it closed the connection
                    raise SshError(
                        f"the tunnel to {self.target} is up, but the run's port does not"
                        f" answer through it: {_last_line(self._stderr()) or 'no reason given'}"
                        " (has the run just ended? does the host allow TCP forwarding?)",
                        "failed", "the run's port does not answer")
                if time.monotonic() > deadline:
                    raise SshError(f"no tunnel to {self.target} within {ANSWER_TIMEOUT_S} s",
                                   "unreachable", "no answer")
                if self._halt.wait(0.05):
                    raise SshError("closed while connecting")
            stderr = self._stderr()
            # A local port taken between choosing it and ssh binding it: choose again, but
            # only before any client connected to the old ones.
            if initial and "address already in use" in stderr.lower() and attempt < 2:
                self._local = [free_port() for _ in self._remote]
                continue
            raise ssh_failure(self.target, stderr)

    def _keep_up(self) -> None:
        last_check = time.monotonic()
        while not self._halt.wait(0.2):
            state = self._store.connection() if self._store else "waiting"
            if state == "ended":
                self._report(f"the run has ended on {self.target}")
                return
            if self.proc is not None and self.proc.poll() is not None:
                if not self._reconnect():
                    return
            elif state == "stale" and time.monotonic() - last_check > self.CHECK_EVERY_S:
                last_check = time.monotonic()
                if self._run_gone():
                    return

    def _reconnect(self) -> bool:
        """Restart ssh on the same local ports; False when the run has ended (or on close)."""
        why = (_last_line(self._stderr()).rsplit(": ", 1)[-1]
               or f"ssh exited with status {self.proc.returncode}")
        delay, tries = 1.0, 0
        while not self._halt.is_set():
            tries += 1
            self._report(f"ssh tunnel down ({why}); reconnecting, try {tries}")
            try:
                if self._run_gone():
                    return False
                self._start()
                self._report("")
                return True
            except SshError as e:
                why = e.brief
            self._halt.wait(delay)
            delay = min(delay * 2, self.RETRY_MAX_S)
        return False

    def _run_gone(self) -> bool:
        """Ask the host; True (and reported) when the run is no longer live there."""
        try:
            listing = list_runs(self.target, self._halt)
        except SshError:
            return False  # the host, not the run, is the problem: keep trying
        if any(r.run_id == self.info.run_id for r in listing.live):
            return False
        self._report(f"run {self.info.run_id} has ended on {self.target}")
        return True

    def _report(self, text: str) -> None:
        self.status = text
        if self._store is not None:
            self._store.set_link(text)

    def _stderr(self) -> str:
        if self._log is None:
            return ""
        self._log.seek(0)
        return self._log.read()[-4000:].decode(errors="replace")

    def _stop_ssh(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(3)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def connect(target: SshTarget, *, read_only: bool) -> tuple[ConnectionInfo, SshLink]:
    """Find the run ``target`` names on its host and tunnel to it (telemetry only when
    ``read_only``: then no control port is reachable at all)."""
    info = list_runs(target).pick()
    return info, SshLink(target, info, control=not read_only).open()
