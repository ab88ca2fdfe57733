"""The wire protocol rejects bad frames with a specific reason and never crashes."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from neurotop.protocol import wire


def test_roundtrip_keeps_header_and_arrays():
    block = np.arange(12, dtype=np.float32).reshape(3, 4)
    frames = wire.encode({"kind": "stats", "step": 7}, [block, np.array([1.5], np.float64)])
    m = wire.decode(frames)
    assert m.kind == "stats" and m.header["step"] == 7 and m.header["v"] == wire.PROTOCOL_VERSION
    np.testing.assert_array_equal(m.arrays[0], block)
    assert m.arrays[1].dtype == np.float64


@pytest.mark.parametrize("frames, reason", [
    ([], "empty message"),
    ([b"\xc1garbage"], "not msgpack"),
    ([msgpack.packb([1, 2])], "not a map"),
    ([msgpack.packb({"kind": "stats"})], "no protocol version"),
    ([msgpack.packb({"v": 99, "kind": "stats"})], "newer than this neurotop"),
    ([msgpack.packb({"v": 1})], "no 'kind'"),
    ([msgpack.packb({"v": 1, "kind": "stats", "arrays": [["<f4", [2]]]})], "carries 0"),
    ([msgpack.packb({"v": 1, "kind": "stats", "arrays": [["<f4", [2]]]}), b"abc"],
     "should hold 8 bytes"),
    ([msgpack.packb({"v": 1, "kind": "stats", "arrays": [["O", [2]]]}), b""], "bad description"),
    ([msgpack.packb({"v": 1, "kind": "stats", "arrays": [["<f8", [1 << 30]]]}), b""], "exceeds"),
])
def test_bad_frames_get_specific_errors(frames, reason):
    with pytest.raises(wire.WireError, match=reason):
        wire.decode(frames)


def test_random_bytes_never_raise_anything_but_wire_error():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        frames = [rng.bytes(int(rng.integers(0, 64))) for _ in range(int(rng.integers(1, 4)))]
        try:
            wire.decode(frames)
        except wire.WireError:
            pass


def test_signatures_detect_tampering():
    key = b"k" * 32
    req = wire.new_request("pause", sender="me@here")
    frames = wire.encode_signed(key, req)
    assert wire.decode_signed(frames, key)[1] is True
    assert wire.decode_signed(frames, b"other")[1] is False
    body = msgpack.unpackb(frames[0])
    body["cmd"] = "resume"
    assert wire.decode_signed([msgpack.packb(body), frames[1]], key)[1] is False
    assert wire.decode_signed([frames[0], b""], key)[1] is False
