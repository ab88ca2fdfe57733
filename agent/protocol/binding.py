"""Where the agent may listen, and the CURVE keys it needs to listen anywhere else.

Loopback is the default and needs nothing more: only this machine (and SSH tunnels
into it) can connect, and control is signed with the run's key. Any other address
exposes the sockets to the network, so the agent refuses it unless CURVE is on:
telemetry is then encrypted and only clients holding the server's public key (from
the 0600 connection file) can complete the handshake. Imports neither torch nor
textual, so the UI uses it too.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import zmq


class UnsafeBindError(ValueError):
    """A bind beyond loopback without CURVE."""


def is_loopback(host: str) -> bool:
    """True only for addresses that are certainly loopback; names and interfaces are not."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # "*", "eth0", a host name: possibly reachable from outside


def check_bind(host: str, curve: bool) -> None:
    """Raise ``UnsafeBindError`` (with what to do instead) for a bind that would be unsafe."""
    if curve and not zmq.has("curve"):
        raise UnsafeBindError("CURVE was asked for, but this libzmq was built without it")
    if not curve and not is_loopback(host):
        raise UnsafeBindError(
            f"refusing to bind {host!r} without CURVE: it would expose the run's telemetry"
            " and control beyond this machine. Pass curve=True (per-run keys, encrypted"
            " telemetry), or keep the default 127.0.0.1 and attach with"
            " `neurotop attach ssh://HOST`")


@dataclass(frozen=True)
class CurveKeys:
    """A per-run CURVE keypair (Z85 text). Only ``public`` ever leaves the process."""

    public: str
    secret: str

    @classmethod
    def generate(cls) -> CurveKeys:
        public, secret = zmq.curve_keypair()
        return cls(public.decode("ascii"), secret.decode("ascii"))

    def make_server(self, sock: zmq.Socket) -> None:
        """Before bind: the socket accepts only CURVE clients that know ``public``."""
        sock.curve_secretkey = self.secret.encode("ascii")
        sock.curve_publickey = self.public.encode("ascii")
        sock.curve_server = True


def make_client(sock: zmq.Socket, server_public: str) -> None:
    """Before connect: CURVE to a server known by its public key, with a throwaway keypair."""
    public, secret = zmq.curve_keypair()
    sock.curve_serverkey = server_public.encode("ascii")
    sock.curve_publickey = public
    sock.curve_secretkey = secret
