"""The wire protocol shared by the agent and the UI.

Imports neither torch nor textual: the UI reads it on a laptop without PyTorch.
A message is a ZeroMQ multipart: one msgpack header, then one raw little-endian
frame per array, described in the header's ``arrays`` list as ``[dtype, shape]``.
No pickle anywhere: a header is plain data and an array is plain bytes.
Control messages add a trailing HMAC-SHA256 signature frame made with the
run's key (see ``sign`` / ``verify``).
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

PROTOCOL_VERSION = 1

#: Telemetry kinds published on PUB.
SCHEMA, STATS, HEARTBEAT, EVENT = "schema", "stats", "heartbeat", "event"
#: Per-parameter statistics, after each report's stats: one ``[params x param_stats]``
#: array (names in the schema).
PARAMS = "params"
#: Histograms, every ``hist_every`` reports: ``[hist_layers x bins]`` of activations, then
#: of gradients dL/dh, in the bins of the schema's ``hist_edges``.
HIST = "hist"
TELEMETRY_KINDS = frozenset({SCHEMA, STATS, HEARTBEAT, EVENT, PARAMS, HIST})

#: Largest header or array frame we will decode; anything bigger is refused unread.
MAX_HEADER_BYTES = 1 << 20
MAX_ARRAY_BYTES = 256 << 20
#: Largest control request body the agent checks. The largest valid request (a ``set``
#: whose knob name and every string field are at their limits) packs to under 2 KiB; 16
#: KiB leaves room for that to grow, while a crafted body this big, if it were ever
#: decoded, costs milliseconds, not the 0.5 s a 1 MiB one does. A body's signature is
#: checked over its raw bytes before anything decodes it: an unsigned one never is.
MAX_REQUEST_BYTES = 16 << 10
#: A signature frame: HMAC-SHA256, hex-encoded.
SIGNATURE_BYTES = 64
_ALLOWED_DTYPES = frozenset({"<f4", "<f8", "<i4", "<i8", "|u1", "<u4", "<u8", "|b1"})


class WireError(ValueError):
    """A frame that cannot be decoded; the message says exactly why."""


@dataclass
class Message:
    """A decoded message: its header and its arrays, in order."""

    header: dict[str, Any]
    arrays: list[np.ndarray] = field(default_factory=list)

    @property
    def kind(self) -> str:
        return self.header["kind"]


def encode(header: dict[str, Any], arrays: list[np.ndarray] | tuple = ()) -> list[bytes]:
    """Frames for ``header`` and ``arrays``; the protocol version is stamped in."""
    frames_arrays = []
    described = []
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        dt = a.dtype.str
        if dt not in _ALLOWED_DTYPES:
            raise WireError(f"dtype {dt} cannot be sent")
        described.append([dt, list(a.shape)])
        frames_arrays.append(a.tobytes())
    h = dict(header)
    h["v"] = PROTOCOL_VERSION
    h["arrays"] = described
    return [msgpack.packb(h, use_bin_type=True), *frames_arrays]


def decode_header(frame: bytes) -> dict[str, Any]:
    """Parse and check one header frame; raise ``WireError`` on anything odd."""
    if len(frame) > MAX_HEADER_BYTES:
        raise WireError(f"header of {len(frame)} bytes exceeds {MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(frame, raw=False, strict_map_key=True, max_bin_len=MAX_HEADER_BYTES)
    except Exception as e:  # msgpack raises several unrelated types
        raise WireError(f"header is not msgpack: {e.__class__.__name__}") from None
    if not isinstance(h, dict):
        raise WireError(f"header is a {type(h).__name__}, not a map")
    v = h.get("v")
    if not isinstance(v, int):
        raise WireError("header has no protocol version 'v'")
    if v > PROTOCOL_VERSION:
        raise WireError(
            f"protocol version {v} is newer than this neurotop understands ({PROTOCOL_VERSION});"
            " upgrade neurotop"
        )
    if not isinstance(h.get("kind"), str):
        raise WireError("header has no 'kind'")
    return h


def decode(frames: list[bytes]) -> Message:
    """Decode a multipart telemetry message, checking every array frame's size."""
    if not frames:
        raise WireError("empty message")
    h = decode_header(frames[0])
    desc = h.get("arrays", [])
    if not isinstance(desc, list) or len(desc) != len(frames) - 1:
        raise WireError(f"header names {len(desc) if isinstance(desc, list) else '?'} arrays,"
                        f" message carries {len(frames) - 1}")
    arrays = []
    for i, (d, raw) in enumerate(zip(desc, frames[1:], strict=True)):
        if not (isinstance(d, list) and len(d) == 2 and d[0] in _ALLOWED_DTYPES
                and isinstance(d[1], list) and all(isinstance(n, int) and n >= 0 for n in d[1])):
            raise WireError(f"array {i} has a bad description {d!r}")
        dt = np.dtype(d[0])
        n = int(np.prod(d[1], dtype=np.int64)) * dt.itemsize
        if n > MAX_ARRAY_BYTES:
            raise WireError(f"array {i} of {n} bytes exceeds {MAX_ARRAY_BYTES}")
        if len(raw) != n:
            raise WireError(f"array {i} should hold {n} bytes, frame has {len(raw)}")
        arrays.append(np.frombuffer(raw, dtype=dt).reshape(d[1]))
    return Message(h, arrays)


# --- control: signed requests and replies -------------------------------------------------

def sign(key: bytes, payload: bytes) -> bytes:
    """HMAC-SHA256 of ``payload`` under the run's key, hex-encoded."""
    return hmac.new(key, payload, hashlib.sha256).hexdigest().encode()


def verify(key: bytes | None, payload: bytes, signature: bytes) -> bool:
    """Whether ``signature`` is ``payload``'s under ``key``: computed over the raw bytes,
    before anything decodes them, and compared in constant time."""
    if not key or len(signature) != SIGNATURE_BYTES:
        return False
    return hmac.compare_digest(sign(key, payload), bytes(signature))


def new_request(cmd: str, args: dict[str, Any] | None = None, *, sender: str = "",
                req_id: str | None = None) -> dict[str, Any]:
    """A control request; the nonce and timestamp let the agent refuse replays."""
    return {
        "v": PROTOCOL_VERSION,
        "kind": "request",
        "id": req_id or os.urandom(6).hex(),
        "cmd": cmd,
        "args": args or {},
        "nonce": os.urandom(12).hex(),
        "ts": time.time(),
        "sender": sender,
    }


def peek_strings(body: bytes, names: tuple[str, ...], limit: int,
                 entries: int = 8) -> dict[str, str]:
    """The fields ``names`` of a map body, if they are strings of at most ``limit``
    characters among its first ``entries``: read without decoding anything else (any
    non-empty array or map, any longer string, stops it), so it costs microseconds even
    on a body crafted to decode slowly. For naming an unverified request in its refusal."""
    u = msgpack.Unpacker(raw=False, max_buffer_size=max(len(body), 1), max_str_len=limit,
                         max_bin_len=0, max_array_len=0, max_map_len=0, max_ext_len=0)
    u.feed(body)
    found: dict[str, str] = {}
    try:
        for _ in range(min(u.read_map_header(), entries)):
            k, v = u.unpack(), u.unpack()
            if k in names and isinstance(v, str):
                found[k] = v
    except (ValueError, msgpack.UnpackException):
        pass  # the part that could be read cheaply is all this is for
    return found


def encode_signed(key: bytes | None, payload: dict[str, Any]) -> list[bytes]:
    """Two frames: msgpack payload and its signature (empty when there is no key)."""
    body = msgpack.packb(payload, use_bin_type=True)
    return [body, sign(key, body) if key else b""]


def decode_signed(frames: list[bytes], key: bytes | None) -> tuple[dict[str, Any], bool]:
    """Decode a control payload (a reply, on the client side); returns it and whether its
    signature is valid. The agent never decodes what is not signed: see ``Gate.admit``."""
    if len(frames) != 2:
        raise WireError(f"control message has {len(frames)} frames, expected 2")
    body, signature = frames
    ok = verify(key, body, signature)
    return decode_header(body), ok
