"""The authentication gate: which control messages are requests the run should act on.

A request must be at most ``wire.MAX_REQUEST_BYTES``, signed with the run's key
(HMAC-SHA256 over its raw bytes, checked before anything decodes them, as Jupyter does),
shaped as a request, and fresh: its nonce never seen before, its timestamp within
``NONCE_WINDOW_S`` of this machine's clock. Everything else is refused and counted, at a
bounded cost: nothing unsigned is decoded, a peer (a ROUTER identity) gets at most
``PEER_REFUSALS_PER_S`` refusal replies a second (all peers together
``REFUSALS_PER_S``; beyond that, messages are only counted), and refusals become one
``refused`` event per reason per second carrying a count and one bounded example, so a
flood can neither stall training nor fill the log, the stream or the session file.
Runs on the agent thread; imports no torch.
"""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from neurotop.protocol import wire

log = logging.getLogger("neurotop.agent")

#: How far a request's timestamp may be from this machine's clock, either way: the clock
#: skew tolerated between the viewer's machine and the run's, plus transit. A nonce is
#: remembered until its timestamp has left this window, so it can never be accepted twice.
NONCE_WINDOW_S = 120.0
#: Refusal replies one peer (ROUTER identity) gets per second, after a burst of
#: ``PEER_REFUSAL_BURST``; beyond them its refused messages are counted, not answered.
PEER_REFUSALS_PER_S = 5.0
PEER_REFUSAL_BURST = 20.0
#: The same bound over all peers together: many connections cannot buy more work.
REFUSALS_PER_S = 100.0
#: Peers whose refusal budget is remembered; the oldest are forgotten past this.
MAX_PEERS = 1024
#: Longest ``id`` (and ``nonce``) an authentic request may carry; ``sender`` is cut to
#: ``MAX_SENDER_CHARS``. Refusal events cut every peer-provided field to these too.
MAX_ID_CHARS = 64
MAX_SENDER_CHARS = 200
MAX_CMD_CHARS = 64


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
    """A refused message and the ``reply`` for its sender only (``None`` when that peer,
    or all of them, exceeded their refusal budget: then it is only counted)."""

    ident: bytes
    reply: dict[str, Any] | None


class _Bucket:
    """A token bucket: ``take()`` is True while the rate (with its burst) is not exceeded."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.t = rate, burst, burst, now

    def take(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


class Gate:
    """Admits signed, well-formed, fresh requests; counts everything the run rejects.

    ``clock``: this machine's wall clock, which request timestamps are checked against
    (injectable, so freshness can be tested without waiting minutes)."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.time) -> None:
        self._key = key
        self._clock = clock
        #: Control messages the run rejected: refused here, or refused after the gate
        #: (``count_rejected``). Heartbeats carry it.
        self.rejected = 0
        self._nonces: set[str] = set()
        self._expiry: list[tuple[float, str]] = []  # heap: (when a nonce's ts goes stale)
        self._peers: dict[bytes, _Bucket] = {}
        self._all = _Bucket(REFUSALS_PER_S, REFUSALS_PER_S, time.monotonic())
        self._tally: dict[str, dict[str, Any]] = {}  # reason -> this second's event so far

    def admit(self, frames: list[Any]) -> Request | Refusal | None:
        """What to do with one ROUTER message (its frames: bytes or buffers); ``None``: too
        short to answer (counted). Work on what is not authentic stays bounded: sizes are
        checked, then the signature over the raw bytes; only then is the body decoded."""
        if len(frames) < 2:
            self.rejected += 1
            return None
        ident, body = bytes(frames[0]), frames[1:]
        if len(body) != 2:
            return self._refuse(ident, "malformed",
                                f"malformed: control message has {len(body)} frames, expected 2")
        payload, signature = body
        if len(payload) > wire.MAX_REQUEST_BYTES:
            return self._refuse(ident, "oversized", f"request of {len(payload)} bytes exceeds"
                                                    f" {wire.MAX_REQUEST_BYTES}")
        if not wire.verify(self._key, payload, signature):  # named, if that is cheap
            claimed = wire.peek_strings(payload, ("id", "cmd"), MAX_ID_CHARS)
            return self._refuse(ident, "unsigned", "not signed with this run's key", claimed)
        try:
            req = wire.decode_header(payload)
        except wire.WireError as e:
            return self._refuse(ident, "malformed", f"malformed: {e}")
        rid, cmd, args = req.get("id"), req.get("cmd"), req.get("args", {})
        if req.get("kind") != "request":
            return self._refuse(ident, "not a request",
                                f"a {_cut(req.get('kind'), MAX_CMD_CHARS)!r} message is not"
                                " a request", req)
        if not isinstance(cmd, str) or not isinstance(args, dict) or not isinstance(rid, str):
            return self._refuse(ident, "bad fields", "a request needs a string 'id', a string"
                                " 'cmd' and a map 'args'", req)
        if len(rid) > MAX_ID_CHARS:
            return self._refuse(ident, "bad fields", f"a request's id is longer than"
                                f" {MAX_ID_CHARS} characters", req)
        reason, error = self._staleness(req)
        if error:
            return self._refuse(ident, reason, error, req)
        return Request(ident, rid, cmd, args, str(req.get("sender", ""))[:MAX_SENDER_CHARS])

    def count_rejected(self) -> None:
        """Count an authentic request refused after the gate (bad arguments, or a failure
        while handling it)."""
        self.rejected += 1

    def seal(self, payload: dict[str, Any]) -> list[bytes]:
        """A reply's frames, signed with the run's key."""
        return wire.encode_signed(self._key, payload)

    def refusal_events(self, final: bool = False) -> list[dict[str, Any]]:
        """The ``refused`` events of the seconds that have ended (``final``: of this one
        too): one per reason, with its count and its first example; each is logged."""
        sec = int(time.monotonic())
        done = [r for r, ev in self._tally.items() if final or ev["_second"] != sec]
        events = []
        for reason in done:
            ev = self._tally.pop(reason)
            del ev["_second"]
            log.warning("refused %d control message(s) in a second (%s), e.g. %r from %r: %s",
                        ev["count"], reason, ev["cmd"], ev["sender"] or "?", ev["error"])
            if ev["count"] > 1:  # what the UI shows of it
                ev["error"] += f" (and {ev['count'] - 1} more refused so that second)"
            events.append(ev)
        return events

    def _refuse(self, ident: bytes, reason: str, error: str,
                req: dict[str, Any] | None = None) -> Refusal:
        """Count a refusal under ``reason``, and answer it if the peer's and everyone's
        budgets allow. ``req``: what the request claims (decoded only when signed with the
        key; else the fields ``wire.peek_strings`` could read), cut to bounds all the same."""
        self.rejected += 1
        req = req or {}
        rid, cmd = _cut(req.get("id"), MAX_ID_CHARS), _cut(req.get("cmd"), MAX_CMD_CHARS)
        ev = self._tally.get(reason)
        if ev is None:
            self._tally[reason] = {
                "event": "refused", "refusal": reason, "count": 1, "error": error, "id": rid,
                "cmd": cmd, "sender": _cut(req.get("sender"), MAX_SENDER_CHARS) or "",
                "client": ident[:32].hex(), "rejected": self.rejected,
                "_second": int(time.monotonic())}
        else:
            ev["count"] += 1
            ev["rejected"] = self.rejected
        if not self._budget(ident):
            return Refusal(ident, None)
        return Refusal(ident, {"id": rid, "cmd": cmd, "ok": False, "error": error})

    def _budget(self, ident: bytes) -> bool:
        """Whether a refusal to ``ident`` may still be answered (one token each, from the
        peer's bucket and from everyone's)."""
        now = time.monotonic()
        bucket = self._peers.pop(ident, None)  # re-inserted last: the dict is oldest-first
        if bucket is None:
            if len(self._peers) >= MAX_PEERS:
                del self._peers[next(iter(self._peers))]
            bucket = _Bucket(PEER_REFUSALS_PER_S, PEER_REFUSAL_BURST, now)
        self._peers[ident] = bucket
        return bucket.take(now) and self._all.take(now)

    def _staleness(self, req: dict[str, Any]) -> tuple[str, str | None]:
        """Why a request is not fresh, as ``(reason, error)`` (error None if it is fresh).
        A nonce is accepted once, and only within NONCE_WINDOW_S of this machine's clock;
        it is remembered until its timestamp has left that window (a request stamped in
        the future is remembered longer), so no resend is ever fresh and remembered nonces
        stay few."""
        nonce, ts = req.get("nonce"), req.get("ts")
        now = self._clock()
        if not isinstance(nonce, str) or len(nonce) > MAX_ID_CHARS \
                or not isinstance(ts, (int, float)) or isinstance(ts, bool) \
                or not math.isfinite(ts):
            return "bad fields", (f"a request needs a string 'nonce' (at most {MAX_ID_CHARS}"
                                  " characters) and a finite number 'ts'")
        while self._expiry and self._expiry[0][0] < now:
            self._nonces.discard(heapq.heappop(self._expiry)[1])
        if nonce in self._nonces:
            return "replayed", "replayed request (its nonce was seen before)"
        if abs(now - ts) > NONCE_WINDOW_S:
            return "stale", (f"stale request: its timestamp is {now - ts:+.0f} s off the run's"
                             f" clock (allowed: {NONCE_WINDOW_S:.0f} s; are both machines'"
                             " clocks right?)")
        self._nonces.add(nonce)
        heapq.heappush(self._expiry, (ts + NONCE_WINDOW_S, nonce))
        return "", None


def _cut(value: Any, limit: int) -> str | None:
    """A peer-provided string cut to ``limit`` characters; ``None`` if it is no string."""
    return value[:limit] if isinstance(value, str) else None
