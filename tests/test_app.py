"""The server's socket (app.Wire): replies sent from worker threads, requests read on the loop.

A worker sends its reply itself, under the socket's lock. ZeroMQ's descriptor signals a change
of state, not a message, and a send from any thread may consume that signal while requests
wait: the loop must still read them. A flood of requests answered from other threads, each
reply racing the next request, checks that none is left unread.
"""

from __future__ import annotations

import random
import threading
import time

import zmq

from lazytensor_server.app import serve_in_thread
from lazytensor_server.limits import Limits


class Echo:
    """A stand-in service: each request is answered from a thread of its own, a moment later
    (so that replies are sent while the next requests arrive)."""

    def __init__(self) -> None:
        self.limits = Limits()
        self.models = {"echo": None}
        self.closing = False
        self.threads: list[threading.Thread] = []
        self.random = random.Random(0)

    def handle(self, peer, frames, reply) -> None:
        data = [bytes(f.buffer) for f in frames]
        delay = self.random.uniform(0, 3e-4)
        thread = threading.Thread(target=self._later, args=(delay, reply, peer, data))
        self.threads.append(thread)
        thread.start()

    @staticmethod
    def _later(delay: float, reply, peer, data) -> None:
        time.sleep(delay)
        reply(peer, data)

    def shutdown(self, grace: float) -> None:
        for thread in self.threads:
            thread.join(grace)


def test_every_request_is_read_while_workers_send_replies() -> None:
    app = serve_in_thread(Echo())
    context = zmq.Context()
    dealer = context.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    pause = random.Random(1)
    try:
        dealer.connect(app.endpoint)
        seen = set()
        for i in range(3000):  # requests keep arriving while replies are sent
            dealer.send_multipart([b"%d" % i])
            time.sleep(pause.uniform(0, 3e-4))
            while dealer.poll(0):
                seen.add(int(dealer.recv_multipart()[0]))
        while len(seen) < 3000 and dealer.poll(5_000):
            seen.add(int(dealer.recv_multipart()[0]))
        assert seen == set(range(3000)), f"{3000 - len(seen)} requests never read"
    finally:
        dealer.close()
        context.term()
        app.stop(10)
