"""Curve: CurveZMQ encryption and ZAP authentication of the server's socket, at the handshake.

With ``--curve-secret`` the ROUTER socket is a CURVE server: every connection is encrypted and
a client must know the server's public key. With ``--curve-clients`` too, a ZAP handler
(pyzmq's :class:`zmq.auth.asyncio.AsyncioAuthenticator`, on the app's event loop) checks each
client's public key during the handshake; ZeroMQ closes a connection whose key is refused
before a single message of it is read, so an unknown client never reaches
:class:`~.service.Service` and costs no decoding. Refusals are logged, at most one line per
:data:`LOG_EVERY` seconds, so a flood of handshakes cannot fill the log.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lazytensor.protocol import curve

log = logging.getLogger("lazytensor.server")

#: The ZAP domain of the server socket.
DOMAIN = "lazytensor"
#: Seconds between two log lines about refused handshakes.
LOG_EVERY = 10.0


@dataclass(frozen=True)
class Curve:
    """The server's key pair and the client keys it accepts (``None``: any client).

    Args:
        public: the server's public key (Z85 bytes); clients pass it as ``server_key``.
        secret: the server's secret key (Z85 bytes).
        clients: the accepted client public keys, or ``None`` to accept any client that
            knows ``public`` (the connection is still encrypted).
    """

    public: bytes
    secret: bytes
    clients: frozenset[bytes] | None = None

    @classmethod
    def from_files(cls, secret: str | os.PathLike, clients: str | os.PathLike | None) -> Curve:
        """From a secret certificate and a folder or file of client public keys."""
        public, secret_key = curve.key_pair(secret)
        return cls(public, secret_key, None if clients is None else client_keys(clients))

    def secure(self, context: Any, socket: Any) -> Any:
        """Make ``socket`` (not yet bound) a CURVE server; start the ZAP handler first if
        clients are checked. Returns the authenticator to stop at shutdown, or ``None``."""
        import zmq
        from zmq.auth.asyncio import AsyncioAuthenticator

        authenticator = None
        if self.clients is not None:
            # Before bind: without a ZAP handler, ZeroMQ would accept every CURVE client.
            authenticator = AsyncioAuthenticator(context, log=logging.getLogger("zmq.auth"))
            authenticator.start()
            authenticator.configure_curve_callback(DOMAIN, Gate(self.clients))
        socket.setsockopt(zmq.CURVE_SERVER, 1)
        socket.setsockopt(zmq.CURVE_SECRETKEY, self.secret)
        socket.setsockopt(zmq.CURVE_PUBLICKEY, self.public)
        socket.setsockopt_string(zmq.ZAP_DOMAIN, DOMAIN)
        return authenticator


class Gate:
    """ZAP credentials provider: allows the listed client keys, counts and logs the others."""

    def __init__(self, clients: frozenset[bytes]) -> None:
        self.clients = clients
        self.refused = 0  # since the server started
        self._logged_at = -LOG_EVERY
        self._unlogged = 0

    def callback(self, domain: str, key: bytes) -> bool:
        if key in self.clients:
            return True
        self.refused += 1
        self._unlogged += 1
        now = time.monotonic()
        if now - self._logged_at >= LOG_EVERY:
            log.info(
                "refused %d CURVE handshake(s) with an unknown client key (last: %s); "
                "add a client's public key to --curve-clients to let it in",
                self._unlogged,
                key.decode(errors="replace"),
            )
            self._logged_at, self._unlogged = now, 0
        return False


def client_keys(path: str | os.PathLike) -> frozenset[bytes]:
    """The client public keys in ``path``: a folder (every ``*.key`` certificate in it), a
    certificate file, or a text file of Z85 public keys, one per line, each optionally after
    a ``name:`` (ignored). Other lines starting with ``#`` are comments (a Z85 key may itself
    start with ``#`` or hold ``:``: a line that is a key is read as one).

    Raises:
        ValueError: the folder or file holds no key, or a line is not a Z85 key.
    """
    import zmq.auth

    where = Path(path)
    if where.is_dir():
        keys = set(zmq.auth.load_certificates(where))
    elif "public-key" in (text := where.read_text()):  # a ZeroMQ certificate
        keys = {curve.public_key(where)}
    else:
        keys = set()
        for number, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            key, name = line[-curve.Z85_LENGTH :], line[: -curve.Z85_LENGTH]
            if curve.is_z85(key) and (not name or name.endswith(":")):
                keys.add(key.encode())
            elif line and not line.startswith("#"):
                raise ValueError(
                    f"{where}:{number}: expected a 40-character Z85 public key "
                    f"('[name:]KEY'), got {raw!r}"
                )
    if not keys:
        raise ValueError(
            f"no client public key in {str(path)!r}: give a folder of '.key' certificates "
            "(`lazytensor keys curve PATH` writes one) or a file of Z85 keys, one per line"
        )
    return frozenset(keys)
