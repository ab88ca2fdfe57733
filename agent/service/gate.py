"""The authentication gate: which control messages are requests the run should act on.

A request must be signed with the run's key (HMAC-SHA256), be shaped as a request, and be
fresh: its nonce never seen before, its timestamp within ``NONCE_WINDOW_S`` of this
machine's clock. Everything else is refused with the reason and counted; refusals are
logged and shown to every viewer, at most ``REFUSALS_SHOWN_PER_S`` a second so a flood of
garbage cannot flood the log or the stream. Runs on the agent thread; imports no torch.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from neurotop.protocol import wire

log = logging.getLogger("neurotop.agent")

NONCE_WINDOW_S = 120.0
#: Refused control messages are logged (and published as events) at most this often per
#: second; the rest are only counted, so a flood cannot flood the log or the stream.
REFUSALS_SHOWN_PER_S = 5


@dataclass(frozen=True)
class Request:
    """An authentic, fresh request; ``sender`` is what it claims (at most 200 chars)."""

    ident: bytes  # the ROUTER identity of the client that sent it
    id: str
    cmd: str
    args: dict[str, Any]
    sender: str


@dataclass(frozen=True)
class Refusal:
    """A refused message: the ``reply`` for its sender only, and the ``refused`` event for
    every viewer (``None`` when refusals are flooding in: then it is only counted)."""

    ident: bytes
    reply: dict[str, Any]
    event: dict[str, Any] | None


class Gate:
    """Admits signed, well-formed, fresh requests; counts everything the run rejects."""

    def __init__(self, key: bytes) -> None:
        self._key = key
        #: Control messages the run rejected: refused here, or refused after the gate
        #: (``count_rejected``). Heartbeats carry it.
        self.rejected = 0
        self._nonces: dict[str, float] = {}  # nonce -> when it was accepted (time.time())
        self._shown = (0, 0)  # (second, refusals shown in it)

    def admit(self, frames: list[bytes]) -> Request | Refusal | None:
        """What to do with one ROUTER message; ``None``: too short to answer (counted)."""
        if len(frames) < 2:
            self.rejected += 1
            return None
        ident, body = frames[0], frames[1:]
        try:
            req, signed = wire.decode_signed(body, self._key)
        except wire.WireError as e:
            return self._refuse(ident, {}, f"malformed: {e}")
        rid, cmd, args = req.get("id"), req.get("cmd"), req.get("args", {})
        if not signed:
            error = "not signed with this run's key"
        elif req.get("kind") != "request":
            error = f"a {req.get('kind')!r} message is not a request"
        elif not isinstance(cmd, str) or not isinstance(args, dict) or not isinstance(rid, str):
            error = "a request needs a string 'id', a string 'cmd' and a map 'args'"
        else:
            error = self._staleness(req)
        if error:
            return self._refuse(ident, req, error)
        return Request(ident, rid, cmd, args, str(req.get("sender", ""))[:200])

    def count_rejected(self) -> None:
        """Count an authentic request refused after the gate (bad arguments, or a failure
        while handling it)."""
        self.rejected += 1

    def seal(self, payload: dict[str, Any]) -> list[bytes]:
        """A reply's frames, signed with the run's key."""
        return wire.encode_signed(self._key, payload)

    def _refuse(self, ident: bytes, req: dict[str, Any], error: str) -> Refusal:
        """Count a refusal and say it to the sender; log it and make its event unless
        refusals are flooding in. ``sender`` is what the request claims, unverified."""
        self.rejected += 1
        rid, cmd, sender = (req.get(k) for k in ("id", "cmd", "sender"))
        rid = rid if isinstance(rid, str) else None
        cmd = cmd[:200] if isinstance(cmd, str) else None
        sender = sender[:200] if isinstance(sender, str) else ""
        reply = {"id": rid, "cmd": cmd, "ok": False, "error": error}
        sec, shown = self._shown
        now = int(time.monotonic())
        if now != sec:
            sec, shown = now, 0
        event = None
        if shown < REFUSALS_SHOWN_PER_S:
            log.warning("refused control request %r from %r: %s", cmd, sender or "?", error)
            event = {"event": "refused", "id": rid, "cmd": cmd, "error": error,
                     "sender": sender, "client": ident.hex(), "rejected": self.rejected}
        self._shown = (sec, shown + 1)
        return Refusal(ident, reply, event)

    def _staleness(self, req: dict[str, Any]) -> str | None:
        """Why a request is not fresh (None if it is): a nonce is accepted once, and only
        within NONCE_WINDOW_S of this machine's clock, so remembered nonces stay few."""
        nonce, ts = req.get("nonce"), req.get("ts")
        now = time.time()
        if not isinstance(nonce, str) or not isinstance(ts, (int, float)) \
                or not math.isfinite(ts):
            return "a request needs a string 'nonce' and a finite number 'ts'"
        if nonce in self._nonces:
            return "replayed request (its nonce was seen before)"
        if abs(now - ts) > NONCE_WINDOW_S:
            return (f"stale request: its timestamp is {now - ts:+.0f} s off the run's clock"
                    f" (allowed: {NONCE_WINDOW_S:.0f} s; are both machines' clocks right?)")
        self._nonces = {n: t for n, t in self._nonces.items() if now - t <= NONCE_WINDOW_S}
        self._nonces[nonce] = now
        return None
