"""Curve: the CurveZMQ keys that encrypt a connection and authenticate both of its ends.

A CURVE key pair is two 40-character Z85 strings, a public key and a secret key. Keys are kept
in ZeroMQ's certificate files (``zmq.auth.create_certificates``, or ``lazytensor keys curve
PATH``): ``PATH.key`` holds the public key and is given out, ``PATH.key_secret`` holds both and
stays with its owner. Wherever a key is asked for, either form works: the Z85 string itself,
or the path of a certificate file that holds it.

The server proves it holds the secret of the public key its clients were given (``server_key``);
a client proves the same for its own key, which a server started with ``--curve-clients``
checks against its list at the handshake, before any message of the client is read.

Example:
    >>> public, secret = key_pair("alice.key_secret")  # doctest: +SKIP
"""

from __future__ import annotations

import os
from pathlib import Path

#: The length of a Z85-encoded 32-byte CURVE key.
Z85_LENGTH = 40
#: The Z85 alphabet (ZeroMQ RFC 32): a key may hold ``#`` and ``:``.
_Z85 = frozenset(
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#"
)


def public_key(value: str | os.PathLike) -> bytes:
    """A public key (Z85 bytes) from its Z85 string or a certificate file holding it.

    Raises:
        ValueError: ``value`` is neither a Z85 key nor a readable certificate file.
    """
    if _is_z85(value):
        return str(value).encode()
    return _load(value)[0]


def key_pair(value: str | os.PathLike) -> tuple[bytes, bytes]:
    """``(public, secret)`` (Z85 bytes) from a secret key's Z85 string or a secret certificate.

    Raises:
        ValueError: ``value`` is neither a Z85 secret key nor a certificate with a secret key.
    """
    import zmq

    if _is_z85(value):
        secret = str(value).encode()
        return zmq.curve_public(secret), secret
    public, secret = _load(value)
    if secret is None:
        raise ValueError(
            f"{value} holds a public key only; a client needs its secret key: pass the "
            "'.key_secret' file (made with `lazytensor keys curve PATH`)"
        )
    return public, secret


def create(path: str | os.PathLike) -> tuple[Path, Path]:
    """Write a new key pair as ``PATH.key`` (public) and ``PATH.key_secret`` (mode 0600).

    Raises:
        FileExistsError: either file exists already (a key is never overwritten).
    """
    import zmq.auth

    base = Path(path)
    files = (Path(f"{base}.key"), Path(f"{base}.key_secret"))
    for file in files:
        if file.exists():
            raise FileExistsError(f"{file} exists; remove it or choose another PATH")
    base.parent.mkdir(parents=True, exist_ok=True)
    mask = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        zmq.auth.create_certificates(base.parent, base.name)
    finally:
        os.umask(mask)
    files[0].chmod(0o644)
    return files


def is_z85(text: str) -> bool:
    """Whether ``text`` is a Z85-encoded CURVE key (40 characters of the Z85 alphabet)."""
    return len(text) == Z85_LENGTH and set(text) <= _Z85


def _is_z85(value: str | os.PathLike) -> bool:
    return isinstance(value, str) and is_z85(value) and not Path(value).exists()


def _load(path: str | os.PathLike) -> tuple[bytes, bytes | None]:
    import zmq.auth

    try:
        return zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"no CURVE key in {str(path)!r} ({exc}): give a 40-character Z85 key or the path "
            "of a certificate file (`lazytensor keys curve PATH` writes PATH.key and "
            "PATH.key_secret)"
        ) from None
