"""The event stream: the bus, its Server-Sent Events on a real uvicorn server, the CLI reader."""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import json
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response

from volkeeper.cli import events as cli_events
from volkeeper.cli.client import CliError
from volkeeper.cli.events import sse_events, stream_events, text_line
from volkeeper.client.credentials import Target
from volkeeper.core.addresses import TcpAddress, UnixAddress
from volkeeper.daemon.api import events
from volkeeper.daemon.api.events import HISTORY, QUEUE_LIMIT, EventBus, Subscription
from volkeeper.io import identity
from volkeeper_lab.launcher import free_tcp_port

pytestmark = pytest.mark.timeout(20)

TIME = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
WAIT_S = 3.0
MIRROR = {"object": "mirror", "job": "web", "target": "beta:data1", "state": "Mirroring"}


async def take(subscription: Subscription, n: int) -> list[dict[str, Any]]:
    return [await asyncio.wait_for(anext(subscription), 1) for _ in range(n)]


async def rest(subscription: Subscription) -> list[dict[str, Any]]:
    """Every event until the subscription ends (which it must, soon)."""

    async def drain() -> list[dict[str, Any]]:
        return [event async for event in subscription]

    return await asyncio.wait_for(drain(), 1)


def bare(event: dict[str, Any]) -> dict[str, Any]:
    """The event without its time, once the time is checked."""
    assert TIME.fullmatch(event["time"]), event
    return {key: value for key, value in event.items() if key != "time"}


# --- the bus ----------------------------------------------------------------------------------


def test_events_are_numbered_stamped_and_checked() -> None:
    async def scenario() -> None:
        bus = EventBus()
        subscription = bus.subscribe()
        before = datetime.now(UTC).replace(microsecond=0)
        bus.publish("create", "job", job="web")
        with pytest.raises(ValueError, match="not one of"):
            bus.publish("update", "job", job="web")
        with pytest.raises(ValueError, match="set by the bus"):
            bus.publish("change", "job", seq=7)
        bus.publish("change", "mirror", job="web", state="Resyncing", was="Mirroring")
        first, second = await take(subscription, 2)
        assert list(first) == ["seq", "time", "type", "object", "job"]
        assert bare(first) == {"seq": 1, "type": "create", "object": "job", "job": "web"}
        assert bare(second) == {
            "seq": 2, "type": "change", "object": "mirror",
            "job": "web", "state": "Resyncing", "was": "Mirroring",
        }  # fmt: skip
        stamp = datetime.fromisoformat(first["time"])
        assert before <= stamp <= datetime.now(UTC)

    asyncio.run(scenario())


def test_every_subscriber_gets_every_event_from_its_subscription_on() -> None:
    async def scenario() -> None:
        bus = EventBus()
        early = bus.subscribe()
        bus.publish("create", "job", job="web")
        late = bus.subscribe()
        bus.publish("destroy", "job", job="web")
        assert [e["seq"] for e in await take(early, 2)] == [1, 2]
        assert [e["seq"] for e in await take(late, 1)] == [2]
        assert bus.subscribers == 2

    asyncio.run(scenario())


def test_the_bus_keeps_its_last_events_for_readers_that_poll() -> None:
    bus, other = EventBus(), EventBus()
    assert bus.recent() == {"boot": bus.boot, "seq": 0, "events": []}
    assert bus.boot != other.boot  # a restarted daemon numbers from 1 again: boot says so
    for n in range(HISTORY + 3):
        bus.publish("change", "mirror", job="web", n=n)
    kept = bus.recent()
    assert kept["seq"] == HISTORY + 3
    assert [e["seq"] for e in kept["events"]] == list(range(4, HISTORY + 4))
    assert [e["n"] for e in bus.recent(after=HISTORY + 1)["events"]] == [HISTORY + 1, HISTORY + 2]
    assert bus.recent(after=HISTORY + 3)["events"] == []


def test_a_snapshot_comes_first_as_exists_events_then_the_exists_marker() -> None:
    async def scenario() -> None:
        bus = EventBus()
        state = dict(MIRROR)
        volume = {"object": "volume", "name": "data1", "role": "source"}
        subscription = bus.subscribe(lambda: [dict(state), volume])
        state["state"] = "Resyncing"  # taken at subscribe time: this change is an event
        bus.publish("change", "mirror", job="web", state="Resyncing", was="Mirroring")
        mirror, vol, marker, change = await take(subscription, 4)
        assert list(mirror)[:4] == ["seq", "time", "type", "object"]
        assert bare(mirror) == {"seq": 0, "type": "exists", **MIRROR}
        assert bare(vol) == {"seq": 0, "type": "exists", **volume}
        assert bare(marker) == {"seq": 0, "type": "exists", "object": "-"}
        assert change["seq"] == 1 and change["state"] == "Resyncing"

    asyncio.run(scenario())


def test_a_subscriber_that_falls_behind_is_ended_with_a_marker_and_others_go_on() -> None:
    async def scenario() -> None:
        bus = EventBus()
        slow, fast = bus.subscribe(), bus.subscribe()
        for n in range(QUEUE_LIMIT):
            bus.publish("change", "mirror", n=n)
        assert len(await take(fast, QUEUE_LIMIT)) == QUEUE_LIMIT
        bus.publish("change", "mirror", n=QUEUE_LIMIT)  # does not fit: slow is ended
        assert bus.subscribers == 1
        bus.publish("change", "mirror", n=QUEUE_LIMIT + 1)
        assert [e["n"] for e in await take(fast, 2)] == [QUEUE_LIMIT, QUEUE_LIMIT + 1]
        behind = await rest(slow)
        assert [e["seq"] for e in behind[:-1]] == list(range(1, QUEUE_LIMIT + 1))
        assert bare(behind[-1]) == {
            "seq": 0, "type": "change", "object": "-",
            "lost_events": True, "first_lost_seq": QUEUE_LIMIT + 1,
        }  # fmt: skip
        assert await rest(slow) == []  # ended for good

    asyncio.run(scenario())


def test_close_detaches_and_ends_a_waiting_reader() -> None:
    async def scenario() -> None:
        bus = EventBus()
        subscription = bus.subscribe()
        reader = asyncio.create_task(rest(subscription))
        bus.publish("create", "job", job="web")
        await asyncio.sleep(0.01)
        subscription.close()
        bus.publish("destroy", "job", job="web")
        assert bus.subscribers == 0
        assert [e["type"] for e in await asyncio.wait_for(reader, 1)] == ["create"]

    asyncio.run(scenario())


def test_closing_the_bus_ends_every_subscription_and_refuses_new_ones() -> None:
    async def scenario() -> None:
        bus = EventBus()
        first, second = bus.subscribe(), bus.subscribe()
        bus.publish("change", "node", name="alpha")
        bus.close()
        assert bus.subscribers == 0
        assert [e["seq"] for e in await rest(first)] == [1]
        assert [e["seq"] for e in await rest(second)] == [1]
        late = bus.subscribe(lambda: [MIRROR])
        assert [e["object"] for e in await rest(late)] == ["mirror", "-"]
        assert bus.subscribers == 0

    asyncio.run(scenario())


# --- a real server ----------------------------------------------------------------------------


class Served:
    """uvicorn serving ``app`` on its own loop in a thread, on a socket bound up front."""

    def __init__(self, app: FastAPI, sock: socket.socket, tls: bool = False) -> None:
        self.loop = asyncio.new_event_loop()
        files = {"ssl_certfile": str(IDENTITY.certificate), "ssl_keyfile": str(IDENTITY.key)}
        config = uvicorn.Config(
            app, log_level="warning", lifespan="off", timeout_graceful_shutdown=2,
            **(files if tls else {}),
        )  # fmt: skip
        self.server = uvicorn.Server(config)
        serve = self.server.serve(sockets=[sock])
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(serve,))
        self.thread.start()
        wait_for(lambda: self.server.started, "the server to start")

    def call(self, function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Run ``function`` on the server's loop, as the daemon would, and return its result."""

        async def call() -> Any:
            return function(*args, **kwargs)

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(WAIT_S)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(WAIT_S)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "uvicorn did not stop"
        self.loop.close()


def wait_for(condition: Callable[[], Any], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline, f"waited {WAIT_S} s for {what}"
        time.sleep(0.005)


def events_app(bus: EventBus) -> FastAPI:
    app = FastAPI()

    @app.get("/events")
    async def stream(initial: bool = True) -> Response:
        return events.sse_response(bus, (lambda: [MIRROR]) if initial else None)

    return app


@contextmanager
def serve(app: FastAPI, address: UnixAddress | TcpAddress) -> Iterator[Served]:
    if isinstance(address, UnixAddress):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(address.path)
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind((address.host, address.port))
    sock.listen()
    served = Served(app, sock, tls=isinstance(address, TcpAddress))
    try:
        yield served
    finally:
        served.stop()
        sock.close()


def target(address: UnixAddress | TcpAddress) -> Target:
    """How the CLI names it: a TCP control API is TLS, pinned to its certificate."""
    if isinstance(address, UnixAddress):
        return Target(address)
    return Target(address, IDENTITY.fingerprint)


def free_tcp() -> TcpAddress:
    return TcpAddress("127.0.0.1", free_tcp_port())


@pytest.fixture(params=["tcp", "unix"])
def address(request: pytest.FixtureRequest, tmp_path: Path) -> UnixAddress | TcpAddress:
    return free_tcp() if request.param == "tcp" else UnixAddress(str(tmp_path / "api.sock"))


IDENTITY: identity.Identity  # the TCP servers' certificate (node_identity makes it)


@pytest.fixture(scope="module", autouse=True)
def node_identity(tmp_path_factory: pytest.TempPathFactory) -> None:
    global IDENTITY
    IDENTITY = identity.create(tmp_path_factory.mktemp("identity"), "node")


@pytest.fixture
def bus() -> EventBus:
    return EventBus()


@pytest.fixture
def served(bus: EventBus, address: UnixAddress | TcpAddress) -> Iterator[Served]:
    with serve(events_app(bus), address) as served:
        yield served
        served.call(bus.close)  # open streams end, so uvicorn can stop


@pytest.fixture(autouse=True)
def quick_keepalive(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(events, "KEEPALIVE_S", 0.02)


def http_client(address: UnixAddress | TcpAddress) -> httpx.Client:
    if isinstance(address, UnixAddress):
        transport = httpx.HTTPTransport(uds=address.path)
        return httpx.Client(transport=transport, base_url="http://node", timeout=WAIT_S)
    verify = ssl.create_default_context(cafile=str(IDENTITY.certificate))
    verify.check_hostname = False
    return httpx.Client(base_url=f"https://{address}", verify=verify, timeout=WAIT_S)


class Follower:
    """``stream_events`` in a thread, printing into a StringIO."""

    def __init__(self, address: UnixAddress | TcpAddress, as_json: bool, initial: bool) -> None:
        self.out = io.StringIO()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(address, as_json, initial))
        self.thread.start()

    def _run(self, address: UnixAddress | TcpAddress, as_json: bool, initial: bool) -> None:
        try:
            stream_events(target(address), as_json, initial, self.out)
        except BaseException as exc:
            self.error = exc

    def lines(self, n: int) -> list[str]:
        wait_for(lambda: len(self.out.getvalue().splitlines()) >= n or self.error, f"{n} lines")
        assert self.error is None, self.error
        return self.out.getvalue().splitlines()

    def end(self) -> None:
        self.thread.join(WAIT_S)
        assert not self.thread.is_alive(), "stream_events did not return"
        assert self.error is None, self.error


# --- Server-Sent Events -----------------------------------------------------------------------


@pytest.mark.parametrize("address", ["tcp"], indirect=True)
def test_the_stream_is_server_sent_events_with_keepalives(
    bus: EventBus, served: Served, address: UnixAddress | TcpAddress
) -> None:
    with (
        http_client(address) as client,
        client.stream("GET", "/events", params={"initial": "false"}) as response,
    ):
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-cache"
        lines = response.iter_lines()
        assert next(lines) == ": keepalive"  # nothing happens: a comment after KEEPALIVE_S
        assert next(lines) == ""
        served.call(bus.publish, "change", "mirror", job="web", state="Paused")
        rest = itertools.dropwhile(lambda line: line in (": keepalive", ""), lines)
        frame = list(itertools.islice((line for line in rest if line != ": keepalive"), 3))
        assert frame[:2] == ["id: 1", "event: change"]
        field, data = frame[2].split(": ", 1)
        assert field == "data"
        assert bare(json.loads(data)) == {
            "seq": 1, "type": "change", "object": "mirror", "job": "web", "state": "Paused"
        }  # fmt: skip


@pytest.mark.parametrize("address", ["tcp"], indirect=True)
def test_a_client_that_goes_away_takes_its_subscription_with_it(
    bus: EventBus, served: Served, address: UnixAddress | TcpAddress
) -> None:
    with (
        http_client(address) as client,
        client.stream("GET", "/events") as response,
    ):
        lines = response.iter_lines()  # kept: dropping it would already close the stream
        assert next(lines) == "id: 0"
        assert served.call(lambda: bus.subscribers) == 1
    wait_for(lambda: served.call(lambda: bus.subscribers) == 0, "the subscription to go")


# --- the CLI reader ---------------------------------------------------------------------------


def test_events_print_as_events2_lines(
    bus: EventBus, served: Served, address: UnixAddress | TcpAddress
) -> None:
    follower = Follower(address, as_json=False, initial=True)
    follower.lines(2)
    served.call(
        bus.publish, "change", "mirror",
        job="web", target="beta:data1", state="Resync pending", was="Mirroring",
    )  # fmt: skip
    served.call(bus.publish, "destroy", "job", job="web", eta_s=None)
    lines = follower.lines(4)
    served.call(bus.close)
    follower.end()
    times, rests = zip(*(line.split(" ", 1) for line in lines), strict=True)
    assert all(TIME.fullmatch(stamp) for stamp in times), times
    assert list(rests) == [
        "exists mirror job:web target:beta:data1 state:Mirroring",
        "exists -",
        'change mirror job:web target:beta:data1 state:"Resync pending" was:Mirroring',
        "destroy job job:web eta_s:null",
    ]


def test_events_print_as_json_lines_and_without_the_initial_state(
    bus: EventBus, served: Served, address: UnixAddress | TcpAddress
) -> None:
    follower = Follower(address, as_json=True, initial=False)
    wait_for(lambda: served.call(lambda: bus.subscribers) == 1, "the follower to subscribe")
    time.sleep(0.05)  # a keepalive or two go by, and are not printed
    served.call(bus.publish, "create", "job", job="web", targets=["beta:data1"])
    served.call(bus.publish, "change", "volume", name="data1", role="source")
    lines = follower.lines(2)
    served.call(bus.close)
    follower.end()
    assert len(lines) == 2
    assert all(", " not in line and ": " not in line for line in lines), lines
    first, second = (json.loads(line) for line in lines)
    assert list(first) == ["seq", "time", "type", "object", "job", "targets"]
    assert bare(first) == {
        "seq": 1, "type": "create", "object": "job", "job": "web", "targets": ["beta:data1"]
    }  # fmt: skip
    assert bare(second) == {
        "seq": 2, "type": "change", "object": "volume", "name": "data1", "role": "source"
    }  # fmt: skip


@pytest.mark.parametrize("address", ["unix"], indirect=True)
def test_an_api_error_is_one_line(address: UnixAddress | TcpAddress) -> None:
    app = FastAPI()

    @app.get("/events")
    async def refuse() -> JSONResponse:
        body = {"code": "not_ready", "message": "the node is starting", "hint": "try again"}
        return JSONResponse({"error": body}, status_code=503)

    with (
        serve(app, address),
        pytest.raises(CliError, match=r"^the node is starting \(try again\)$"),
    ):
        stream_events(target(address), as_json=False, initial=True, out=io.StringIO())


def test_a_node_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    address = UnixAddress(str(tmp_path / "nobody.sock"))
    with pytest.raises(CliError, match="cannot reach the node at unix:"):
        stream_events(target(address), as_json=True, initial=True, out=io.StringIO())


@pytest.mark.parametrize("address", ["tcp"], indirect=True)
def test_silence_beyond_the_keepalives_is_a_lost_connection(
    bus: EventBus,
    served: Served,
    address: UnixAddress | TcpAddress,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(events, "KEEPALIVE_S", 10.0)
    monkeypatch.setattr(cli_events, "READ_TIMEOUT_S", 0.2)
    out = io.StringIO()
    with pytest.raises(CliError, match=r"sent nothing for 0\.2 s: the connection is lost"):
        stream_events(target(address), as_json=False, initial=True, out=out)
    assert [line.split(" ", 1)[1] for line in out.getvalue().splitlines()] == [
        "exists mirror job:web target:beta:data1 state:Mirroring",
        "exists -",
    ]


def test_a_stream_cut_in_the_middle_is_one_line() -> None:
    """A node that dies mid-stream: the chunked body stops without its last chunk."""
    event = b'data: {"seq":1,"time":"T","type":"change","object":"node"}\n\n'
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        listener.settimeout(WAIT_S)

        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(IDENTITY.certificate, IDENTITY.key)

        def answer_and_die() -> None:
            probe, _ = listener.accept()  # the CLI checks the certificate first (its pin)
            with contextlib.suppress(OSError), tls.wrap_socket(probe, server_side=True):
                pass
            accepted, _ = listener.accept()
            with tls.wrap_socket(accepted, server_side=True) as connection:
                connection.recv(65536)
                connection.sendall(head + b"\r\n" + b"%x\r\n%s\r\n" % (len(event), event))

        server = threading.Thread(target=answer_and_die)
        server.start()
        out = io.StringIO()
        address = TcpAddress("127.0.0.1", listener.getsockname()[1])
        with pytest.raises(CliError, match=r"the node at 127\.0\.0\.1:\d+ broke: peer closed"):
            stream_events(target(address), as_json=False, initial=True, out=out)
        server.join(WAIT_S)
    assert out.getvalue() == "T change node\n"


def test_the_sse_reader_takes_data_lines_and_skips_the_rest() -> None:
    lines = [
        ": keepalive", "",
        "id: 3", "event: change", 'data: {"seq":3,', 'data:"type":"change"}', "retry: 10", "",
        "", "event: orphan", "",  # no data: no event
        'data: {"seq":4}',  # not ended by a blank line: not an event yet
    ]  # fmt: skip
    assert list(sse_events(lines)) == [{"seq": 3, "type": "change"}]
    with pytest.raises(CliError, match="malformed event"):
        list(sse_events(["data: [1, 2]", ""]))
    with pytest.raises(CliError, match="malformed event"):
        list(sse_events(["data: {", ""]))


def test_a_text_line_quotes_what_is_not_a_plain_word() -> None:
    event = {
        "seq": 9, "time": "T", "type": "change", "object": "mirror",
        "a": "", "b": 'say "hi"', "c": 3, "d": True, "e": {"x": 1}, "f": "beta:data1",
    }  # fmt: skip
    assert (
        text_line(event)
        == 'T change mirror a:"" b:"say \\"hi\\"" c:3 d:true e:{"x":1} f:beta:data1'
    )
