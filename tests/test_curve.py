"""CurveZMQ at the handshake, per-owner in-flight caps and key-file fields, on a real server.

The server is ``lazytensor serve --curve-secret ... --curve-clients ...`` in its own process:
every connection is encrypted, and a client whose public key is not listed is refused by the
ZAP handler before any of its messages reaches the service. Results are compared with the
same trace run locally.
"""

from __future__ import annotations

import contextlib
import pathlib
import time

import pytest
import torch
import zmq

import lazytensor as lt
from lazytensor.backends.transport import ZmqTransport
from lazytensor.cli import main
from lazytensor.core.errors import LimitExceeded, RemoteTimeout
from lazytensor.frontend.served import Client
from lazytensor.protocol import curve
from lazytensor.protocol import messages as m
from lazytensor_server.auth import KeyLimits, Keys
from lazytensor_server.curve import client_keys
from servers import MODEL, Capture, ServerProcess

KEY = "alice-api-key"
CAROL = "carol#api key"  # a '#' and a space inside a key are part of it
SENTENCES = ["Q: cheap\nA:", "Q: big\nA:", "Q: fast\nA:"]


def logits_of(model, remote, value: float) -> torch.Tensor:
    """A neuron-forcing trace: neuron 7 of layer 1's MLP set to ``value`` at the last token."""
    with model.trace(SENTENCES, remote=remote):
        model.model.layers[1].mlp.down_proj.input[:, -1, [7]] = value  # (B, T, neurons)
        logits = model.output.logits[:, -1].save()  # (B, vocab)
    return logits


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> pathlib.Path:
    """A folder of key pairs: the server's, alice's (allowed) and mallory's (not)."""
    where = tmp_path_factory.mktemp("curve")
    for name in ("server", "alice", "mallory"):
        curve.create(where / name)
    (where / "clients").mkdir()
    (where / "clients" / "alice.key").write_text((where / "alice.key").read_text())
    (where / "api-keys.txt").write_text(
        f"# name:key [weight=W] [max_inflight=N]\nalice:{KEY}\n"
        f"carol:{CAROL} weight=2 max_inflight=1\n"
    )
    return where


@pytest.fixture(scope="module")
def server(llama_path, keys) -> ServerProcess:
    process = ServerProcess(
        llama_path,
        keys / "server.log",
        *("--api-keys", str(keys / "api-keys.txt")),
        *("--curve-secret", str(keys / "server.key_secret")),
        *("--curve-clients", str(keys / "clients")),
        *("--max-inflight", "3"),
    )
    try:
        with pytest.MonkeyPatch.context() as env:  # the environment variables reach the client
            env.setenv("LAZYTENSOR_SERVER_KEY", str(keys / "server.key"))
            env.setenv("LAZYTENSOR_CLIENT_SECRET", str(keys / "alice.key_secret"))
            process.wait_ready(KEY)
        yield process
    finally:
        process.stop()


def connect(server, keys, api_key=KEY, who="alice", **kwargs) -> Client:
    secret = None if who is None else str(keys / f"{who}.key_secret")
    kwargs.setdefault("server_key", str(keys / "server.key"))
    return Client(server.address, api_key, timeout=60.0, client_secret=secret, **kwargs)


@contextlib.contextmanager
def closing(client: Client):
    try:
        yield client
    finally:
        client.close()


def served(client: Client) -> int:
    (info,) = client.models()
    return info["served"]


# -- key files ---------------------------------------------------------------------------------


def test_key_file_fields(tmp_path) -> None:
    path = tmp_path / "keys.txt"
    path.write_text(
        "# comment\nalice:s3cret#key\nbob: key with spaces weight=2.5 max_inflight=4 \n"
        "bob:second-key\ncarol:x=1\n"
    )
    keys = Keys.from_file(path)
    assert keys.name_of("s3cret#key") == "alice" and keys.name_of("s3cret") is None
    assert keys.name_of("key with spaces") == "bob" == keys.name_of("second-key")
    assert keys.name_of("x=1") == "carol"  # no space before it: part of the key
    assert keys.limits_of("bob") == KeyLimits(weight=2.5, max_inflight=4)
    assert keys.weight_of("bob") == 2.5 and keys.weight_of("alice") == 1.0
    assert keys.limits_of("alice") == KeyLimits() == keys.limits_of("nobody")
    for line, error in [
        ("a:k wieght=2", "unknown field 'wieght'"),
        ("a:k weight=0", "weight='0' is not valid"),
        ("a:k weight=nan", "weight='nan' is not valid"),
        ("a:k max_inflight=1.5", "must be a positive integer"),
        ("a:k weight=2 weight=3", "given twice"),
        ("a:k1 weight=2\na:k2 weight=3", "other fields on an earlier line"),
        (":k", "expected 'name:key'"),
    ]:
        path.write_text(line)
        with pytest.raises(ValueError, match=f"keys.txt:\\d: .*{error}"):
            Keys.from_file(path)


def test_keys_curve_command(tmp_path, capsys) -> None:
    main(["keys", "curve", str(tmp_path / "bob")])
    public = curve.public_key(tmp_path / "bob.key")
    assert public.decode() in capsys.readouterr().out
    assert curve.key_pair(tmp_path / "bob.key_secret")[0] == public
    assert (tmp_path / "bob.key_secret").stat().st_mode & 0o777 == 0o600
    with pytest.raises(SystemExit, match="bob.key exists"):  # a key is never overwritten
        main(["keys", "curve", str(tmp_path / "bob")])
    assert curve.public_key(tmp_path / "bob.key") == public


def test_client_key_files(keys, tmp_path) -> None:
    alice = curve.public_key(keys / "alice.key")
    assert curve.key_pair(keys / "alice.key_secret")[0] == alice
    assert client_keys(keys / "clients") == {alice} == client_keys(keys / "alice.key")
    mallory = curve.public_key(keys / "mallory.key").decode()
    listed = tmp_path / "clients.txt"
    listed.write_text(f"# allowed\nalice:{alice.decode()}\n{mallory}\n")
    assert client_keys(listed) == {alice, mallory.encode()}
    listed.write_text("alice:not-a-key\n")
    with pytest.raises(ValueError, match="clients.txt:1: expected a 40-character Z85"):
        client_keys(listed)
    with pytest.raises(ValueError, match="holds a public key only"):
        curve.key_pair(keys / "alice.key")
    with pytest.raises(ValueError, match="client_secret= .* needs the server's public key"):
        Client("tcp://127.0.0.1:1", client_secret=str(keys / "alice.key_secret"))


# -- the real server ---------------------------------------------------------------------------


def test_an_allowed_client_gets_the_local_values(server, keys, local_llama) -> None:
    want = logits_of(local_llama, False, 4.0)
    with closing(connect(server, keys)) as client:
        torch.testing.assert_close(logits_of(local_llama, client, 4.0), want, rtol=0, atol=0)
        got = logits_of(client.model(MODEL), False, 4.0)  # the remote handle
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    # The server's public key as a Z85 string works as well as its certificate file.
    z85 = curve.public_key(keys / "server.key").decode()
    with closing(
        lt.connect(
            server.address, KEY, server_key=z85, client_secret=str(keys / "alice.key_secret")
        )
    ) as client:
        assert client.models()[0]["name"] == MODEL


def test_unknown_or_missing_keys_are_refused_at_the_handshake(server, keys, local_llama) -> None:
    with closing(connect(server, keys)) as alice:
        before = served(alice)
    seen = len(server.log())
    wrong_server = str(keys / "mallory.key")
    cases = [
        ({"who": "mallory"}, "refused this client's handshake"),  # a key not in the list
        ({"who": None}, "refused this client's handshake"),  # a fresh key of its own
        ({"who": "alice", "server_key": wrong_server}, "server_key="),  # not the server's key
        ({"who": None, "server_key": None}, "needs a CurveZMQ key"),  # no CURVE at all
    ]
    for kwargs, message in cases:
        # A valid API key: had the request reached the service, it would have run.
        with closing(connect(server, keys, connect_timeout=1.5, **kwargs)) as refused:
            with pytest.raises(RemoteTimeout, match=message):
                logits_of(local_llama, refused, 1.0)
    with closing(connect(server, keys)) as alice:
        assert served(alice) == before
    log = server.log()[seen:]
    assert "refused 1 CURVE handshake(s) with an unknown client key" in log, log
    assert curve.public_key(keys / "mallory.key").decode() in log
    assert "refused request" not in log and f"key=alice model={MODEL}" not in log, log


def test_an_idle_connection_flood_does_not_lock_out_a_client(server, keys, local_llama) -> None:
    """200 idle peers: 150 with an allowed key that complete the handshake and say nothing,
    25 with an unknown key (refused by the ZAP handler) and 25 without CURVE (refused by the
    mechanism); then a normal client's request is answered, correctly and quickly."""
    want = logits_of(local_llama, False, -2.0)
    context = zmq.Context()
    server_key = curve.public_key(keys / "server.key")
    alice = curve.key_pair(keys / "alice.key_secret")
    mallory = curve.key_pair(keys / "mallory.key_secret")
    peers = []
    try:
        for index in range(200):
            peer = context.socket(zmq.DEALER)
            peer.setsockopt(zmq.LINGER, 0)
            if index < 175:
                public, secret = alice if index < 150 else mallory
                peer.setsockopt(zmq.CURVE_SERVERKEY, server_key)
                peer.setsockopt(zmq.CURVE_PUBLICKEY, public)
                peer.setsockopt(zmq.CURVE_SECRETKEY, secret)
            peer.connect(server.address)
            peers.append(peer)
        time.sleep(1.0)  # let the handshakes happen
        started = time.monotonic()
        with closing(connect(server, keys)) as client:
            got = logits_of(local_llama, client, -2.0)
        elapsed = time.monotonic() - started
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert elapsed < 10.0, f"a client waited {elapsed:.1f} s behind 200 idle peers"
        # The idle peers were connected all along: the first and the last allowed one ask now.
        for peer in (peers[0], peers[149]):
            peer.send_multipart(m.encode(m.ListModels("idle", KEY)))
            assert peer.poll(30_000), "an idle allowed peer got no answer"
            assert m.decode_reply(peer.recv_multipart()).models[0]["name"] == MODEL
    finally:
        for peer in peers:
            peer.close(0)
        context.term()


def test_the_inflight_cap_refuses_excess_and_the_server_goes_on(server, keys, local_llama) -> None:
    """carol's key file line says max_inflight=1: a burst of 12 runs gets LimitExceeded for
    those that arrive while another of hers is queued or running; the rest run."""
    want = logits_of(local_llama, False, 3.0)
    capture = Capture()
    ids, node = [], None
    for _ in range(12):
        with local_llama.trace(
            SENTENCES, remote=Client("capture", CAROL, transport=capture), blocking=False
        ) as tracer:
            local_llama.model.layers[1].mlp.down_proj.input[:, -1, [7]] = 3.0
            logits = local_llama.output.logits[:, -1].save()
        ids.append(tracer.job.id)
        node = logits._node
    transport = ZmqTransport(
        server.address,
        (curve.public_key(keys / "server.key"), *curve.key_pair(keys / "alice.key_secret")),
    )
    outcomes: dict[str, m.Message] = {}
    try:
        for frames in capture.sent:  # one burst, as fast as the socket takes them
            transport.send(frames)
        deadline = time.monotonic() + 60
        while len(outcomes) < len(ids):
            assert time.monotonic() < deadline, f"answers for {len(outcomes)} of {len(ids)}"
            frames = transport.recv(1.0)
            if frames is not None:
                reply = m.decode_reply(frames)
                if not isinstance(reply, m.Status):
                    outcomes[reply.id] = reply
    finally:
        transport.close()
    refused = [r for r in outcomes.values() if isinstance(r, m.Failure)]
    results = [r for r in outcomes.values() if isinstance(r, m.Result)]
    assert refused and results and len(refused) + len(results) == len(ids)
    for failure in refused:
        error = failure.exception()
        assert isinstance(error, LimitExceeded), error
        assert "has 1 request(s) queued or running" in str(error) and "max_inflight" in str(error)
    for result in results:
        torch.testing.assert_close(dict(result.values)[node], want, rtol=0, atol=0)
    with closing(connect(server, keys, api_key=CAROL)) as carol:  # she is served again
        torch.testing.assert_close(logits_of(local_llama, carol, 3.0), want, rtol=0, atol=0)
