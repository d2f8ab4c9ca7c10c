"""Connections per address (``--max-connections-per-address``): a flood of idle peers from one
address holds at most the cap, and every other client still gets its results.

The flood comes from 127.0.0.2 (``tcp://SOURCE:0;HOST:PORT``, a ZeroMQ connect from a chosen
source address; on Linux all of 127/8 is loopback), so that the real client, from 127.0.0.1,
is another address. Peers never reconnect (``RECONNECT_IVL`` -1), so one that the server
drops stays gone, and a socket monitor on each peer tells whether it was.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

import pytest
import torch
import zmq
from zmq.utils.monitor import recv_monitor_message

from lazytensor.frontend.served import Client
from lazytensor.protocol import curve
from lazytensor.protocol import messages as m
from lazytensor_server.app import App
from lazytensor_server.curve import Curve
from lazytensor_server.limits import Limits
from lazytensor_server.service import Service
from servers import MODEL, ServerProcess

FLOOD = "127.0.0.2"  # the flooding address
CAP = 4
PROMPTS = ["Q: cheap\nA:", "Q: big\nA:"]


class Peer:
    """An idle ZeroMQ DEALER from ``FLOOD`` that never reconnects, with a monitor on it."""

    def __init__(self, context: zmq.Context, address: str, **options: bytes) -> None:
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.RECONNECT_IVL, -1)
        for name, value in options.items():
            self.socket.setsockopt(getattr(zmq, name), value)
        self.monitor = self.socket.get_monitor_socket()
        host, port = address.removeprefix("tcp://").rsplit(":", 1)
        self.socket.connect(f"tcp://{FLOOD}:0;{host}:{port}")
        self.events: list[int] = []

    def wait_for(self, event: int, timeout: float = 20.0) -> bool:
        """Whether ``event`` happened (now or within ``timeout`` s; not after a disconnect)."""
        end = time.monotonic() + timeout
        while event not in self.events:
            if zmq.EVENT_DISCONNECTED in self.events:
                return False
            left = end - time.monotonic()
            if left <= 0 or not self.monitor.poll(int(left * 1000)):
                return False
            self.events.append(recv_monitor_message(self.monitor)["event"])
        return True

    @property
    def dropped(self) -> bool:
        return self.wait_for(zmq.EVENT_DISCONNECTED, timeout=0.0)

    def models(self) -> list:
        """Ask the server for its models: an idle peer that was kept is still served."""
        self.socket.send_multipart(m.encode(m.ListModels("idle", None)))
        assert self.socket.poll(30_000), "a kept idle peer got no answer"
        return m.decode_reply(self.socket.recv_multipart()).models

    def close(self) -> None:
        if self.socket.closed:
            return
        self.socket.disable_monitor()
        self.monitor.close(0)
        self.socket.close(0)


def raw_dropped(address: str, timeout: float = 20.0) -> bool:
    """A raw TCP connection from ``FLOOD`` that never speaks: whether the server ends it."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    with socket.socket() as raw:
        raw.bind((FLOOD, 0))
        raw.connect((host, int(port)))
        raw.settimeout(timeout)
        try:
            while raw.recv(4096):  # the server's greeting, then the end
                pass
        except TimeoutError:
            return False
        except ConnectionResetError:
            return True
    return True


@contextlib.contextmanager
def peers_of(address: str):
    """Yields ``peer(**socket_options)``, which makes a :class:`Peer`; all closed after."""
    context = zmq.Context()
    made: list[Peer] = []

    def peer(**options: bytes) -> Peer:
        made.append(Peer(context, address, **options))
        return made[-1]

    try:
        yield peer
    finally:
        for p in made:
            p.close()
        context.term()


def hold(peer, timeout: float = 20.0) -> Peer:
    """A new peer that the server keeps (its handshake done, not dropped for 0.3 s). A slot
    is free once the server has seen its last holder leave: until then, try again."""
    deadline = time.monotonic() + timeout
    while True:
        made = peer()
        if made.wait_for(zmq.EVENT_HANDSHAKE_SUCCEEDED) and not made.wait_for(
            zmq.EVENT_DISCONNECTED, timeout=0.3
        ):
            return made
        assert time.monotonic() < deadline, "a peer under the cap was never kept"


def flood(peer, count: int) -> list[Peer]:
    """``count`` peers that the server keeps, one after another."""
    return [hold(peer) for _ in range(count)]


@pytest.fixture(scope="module")
def server(llama_path, tmp_path_factory):
    log = tmp_path_factory.mktemp("connections") / "server.log"
    process = ServerProcess(llama_path, log, "--max-connections-per-address", str(CAP))
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def test_a_flood_from_one_address_holds_the_cap_and_others_are_served(server, local_llama):
    with local_llama.trace(PROMPTS):
        want = local_llama.output.logits[:, -1].save()  # (B, vocab)
    with peers_of(server.address) as peer:
        kept = flood(peer, CAP)
        extra = [peer() for _ in range(3)]
        for p in extra:
            assert p.wait_for(zmq.EVENT_DISCONNECTED), "a peer over the cap was not dropped"
        assert raw_dropped(server.address)  # one that never speaks is counted from its accept
        time.sleep(0.5)
        assert not any(p.dropped for p in kept)
        assert kept[0].models()[0]["name"] == MODEL and kept[-1].models()
        client = Client(server.address, None, timeout=60.0)  # from 127.0.0.1
        try:
            with local_llama.trace(PROMPTS, remote=client):
                got = local_llama.output.logits[:, -1].save()
        finally:
            client.close()
        assert torch.equal(got, want)
    assert f"over --max-connections-per-address {CAP} (last from {FLOOD}" in server.log()


def test_closed_peers_free_their_slots(server):
    with peers_of(server.address) as peer:
        kept = flood(peer, CAP)
        assert peer().wait_for(zmq.EVENT_DISCONNECTED)  # full
        for p in kept[:2]:
            p.close()
        again = flood(peer, 2)  # once the server has seen them go, their slots are free
        assert peer().wait_for(zmq.EVENT_DISCONNECTED)  # and the cap holds again
        assert not any(p.dropped for p in (*kept[2:], *again))
        assert again[1].models()[0]["name"] == MODEL


@contextlib.contextmanager
def embedded(limits: Limits, curve_keys: Curve | None = None):
    """An app with no model, on a loopback port from a thread (connections only)."""
    service = Service([], limits=limits)
    app = App(service, "tcp://127.0.0.1:0", curve=curve_keys)
    app.thread = threading.Thread(target=app.run, kwargs={"signals": False}, daemon=True)
    app.thread.start()
    assert app.bound.wait(30)
    try:
        yield app
    finally:
        app.stop()


def test_the_cap_and_curve_together(tmp_path):
    """With CurveZMQ and a client list: peers refused by the ZAP handler free their slots
    (they never hold one for long), allowed ones hold up to the cap, the rest are dropped."""
    for name in ("server", "alice", "mallory"):
        curve.create(tmp_path / name)
    keys = Curve.from_files(tmp_path / "server.key_secret", tmp_path / "alice.key")
    server_key = curve.public_key(tmp_path / "server.key")

    def options(who: str) -> dict:
        public, secret = curve.key_pair(tmp_path / f"{who}.key_secret")
        return {"CURVE_SERVERKEY": server_key, "CURVE_PUBLICKEY": public,
                "CURVE_SECRETKEY": secret}  # fmt: skip

    with embedded(Limits(max_connections_per_address=2), keys) as app:
        with peers_of(app.endpoint) as peer:
            for _ in range(6):  # refused one after another: each frees its slot
                assert peer(**options("mallory")).wait_for(zmq.EVENT_DISCONNECTED)
            kept = [peer(**options("alice")) for _ in range(2)]
            assert all(p.wait_for(zmq.EVENT_HANDSHAKE_SUCCEEDED) for p in kept)
            assert peer(**options("alice")).wait_for(zmq.EVENT_DISCONNECTED)
            time.sleep(0.3)
            assert not any(p.dropped for p in kept)
            assert kept[1].models() == []  # the app serves no model


def test_no_cap_with_zero():
    with embedded(Limits(max_connections_per_address=0)) as app:
        with peers_of(app.endpoint) as peer:
            kept = flood(peer, 2 * CAP)
            time.sleep(0.3)
            assert not any(p.dropped for p in kept)
