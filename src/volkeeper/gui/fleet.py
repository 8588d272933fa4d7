"""The nodes the GUI watches: one poller per node, reconnecting by itself, never giving up.

How this works: a ``NodeLink`` asks its node's control API for ``/status`` and for the events
after the last one it has (``/events/recent?after=N``) once per ``POLL_S``.  An answer makes
the link *reachable* and stamps ``seen``; a failure (refused, timed out, a bad answer) makes
it *unreachable* at once -- the GUI then shows everything only this node can tell as Unknown,
with the last known state and its age -- and the next try comes after a backoff (0.25 s,
doubling, at most ``MAX_BACKOFF_S``), for ever: the moment the node answers again the live
state is back, no restart needed.  ``Fleet`` owns the links, a ``version`` that grows with
every change, and ``wait_change`` for the GUI's live streams; ``call`` sends an action to a
node and returns the node's answer or its refusal, verbatim.

Samples for the charts (bytes written by applications, payload and wire bytes sent) are
kept per poll in ``Samples`` (gui/rates.py), so rates come from two real answers, not guesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import httpx

from volkeeper.client.credentials import AccessError, Target, headers, tls_context
from volkeeper.core.addresses import TcpAddress, UnixAddress
from volkeeper.gui.rates import Samples

log = logging.getLogger(__name__)

POLL_S = 1.0
POLL_TIMEOUT_S = 2.5
FIRST_BACKOFF_S = 0.25
MAX_BACKOFF_S = 3.0
ACTION_TIMEOUT_S = 120.0
FRESH_TIMEOUT_S = 1.0
EVENTS_KEPT = 300


@dataclass
class Answer:
    """A node's answer to an action: ``ok`` and the JSON, or the refusal's own words."""

    ok: bool
    body: Any = None
    message: str = ""
    hint: str = ""


@dataclass
class NodeLink:
    address: UnixAddress | TcpAddress
    fingerprint: str | None = None  # a TCP node's pinned certificate (client/credentials.py)
    token: str | None = None  # its bearer token
    status: dict[str, Any] | None = None  # the last answer, kept while unreachable
    reachable: bool = False
    seen: float | None = None  # wall-clock time of the last answer
    error: str | None = None  # why the last try failed
    attempts: int = 0  # failed tries in a row
    next_try: float | None = None  # wall-clock time of the next try, while unreachable
    tried: float = 0.0  # wall-clock time the last finished try began
    events: deque[dict[str, Any]] = field(default_factory=lambda: deque(maxlen=EVENTS_KEPT))
    samples: Samples = field(default_factory=Samples)
    poke: asyncio.Event = field(default_factory=asyncio.Event)  # ask again now
    _boot: str | None = None
    _seq: int = 0
    _tls: ssl.SSLContext | None = None  # a TCP node's verified certificate, once dialled

    @property
    def name(self) -> str:
        """The node's own name once it answered; its address until then."""
        return str(self.status["node"]) if self.status else str(self.address)

    async def client(self, timeout: float) -> httpx.AsyncClient:
        """A client of the node's API; on TCP, TLS to its pinned certificate (checked before
        the token is sent: ``AccessError`` if it is not the pinned one) with the token."""
        if isinstance(self.address, UnixAddress):
            transport = httpx.AsyncHTTPTransport(uds=self.address.path)
            return httpx.AsyncClient(transport=transport, base_url="http://node", timeout=timeout)
        if self._tls is None:
            target = Target(self.address, self.fingerprint)
            self._tls = await asyncio.to_thread(tls_context, target, timeout)
        return httpx.AsyncClient(
            base_url=f"https://{self.address}", verify=self._tls, headers=headers(self.token),
            timeout=timeout,
        )  # fmt: skip

    def took(self, status: dict[str, Any], recent: dict[str, Any], now: float) -> None:
        if recent["boot"] != self._boot:  # first contact, or the daemon restarted
            self._boot, self._seq = recent["boot"], 0
            self.events.append(_note(now, "node answers (daemon started or first contact)"))
        for event in recent["events"]:
            if event["seq"] > self._seq:
                self.events.append(event)
        self._seq = max(self._seq, int(recent["seq"]))
        self.status, self.reachable, self.seen = status, True, now
        self.error, self.attempts, self.next_try = None, 0, None
        self.samples.add(now, status)

    def failed(self, reason: str, now: float) -> float:
        """Record a failed try; answers the seconds to wait before the next one."""
        if self.reachable:
            self.events.append(_note(now, f"node stopped answering: {reason}"))
        self.reachable, self.error = False, reason
        self.attempts += 1
        backoff = min(MAX_BACKOFF_S, FIRST_BACKOFF_S * 2.0 ** (self.attempts - 1))
        self.next_try = now + backoff
        return backoff

    @property
    def after(self) -> int:
        return self._seq


def _note(now: float, message: str) -> dict[str, Any]:
    """An event the GUI itself saw (the node cannot tell that it went away)."""
    return {"seq": 0, "time": now, "type": "gui", "object": "node", "message": message}


class Fleet:
    def __init__(self, targets: list[Target], token: str | None = None) -> None:
        self.links = [NodeLink(t.address, t.fingerprint, token) for t in targets]
        self.version = 0
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []
        self.closing = False

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._poll(link)) for link in self.links]

    async def stop(self) -> None:
        self.closing = True
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._bump()

    def link(self, name: str) -> NodeLink | None:
        return next((link for link in self.links if link.name == name), None)

    async def fresh(self, timeout: float = FRESH_TIMEOUT_S) -> None:
        """Ask every node now and wait (at most ``timeout``) for each to answer or fail: a
        page shows what the nodes say at the moment it is asked for, not a second ago."""
        asked = time.time()
        for link in self.links:
            link.poke.set()
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(
                        lambda: all(link.tried >= asked for link in self.links) or self.closing
                    )

    async def wait_change(self, version: int, timeout: float) -> int:
        """Wait until ``version`` is not the current one (or ``timeout``); answer the current."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(timeout):
                    await self._changed.wait_for(lambda: self.version != version or self.closing)
            return self.version

    async def _bump(self) -> None:
        async with self._changed:
            self.version += 1
            self._changed.notify_all()

    async def _poll(self, link: NodeLink) -> None:
        client: httpx.AsyncClient | None = None
        try:
            while True:
                link.poke.clear()
                began = time.time()
                try:
                    client = client or await link.client(POLL_TIMEOUT_S)
                    status = await _json(client, "/status")
                    recent = await _json(client, f"/events/recent?after={link.after}")
                except (httpx.HTTPError, AccessError, ValueError, KeyError, TypeError) as exc:
                    wait = link.failed(_reason(exc), time.time())
                except Exception as exc:  # a poller that dies would freeze the node's state
                    log.exception("polling %s failed", link.address)
                    wait = link.failed(f"unexpected error: {exc!r}", time.time())
                else:
                    link.took(status, recent, time.time())
                    wait = POLL_S
                link.tried = began
                await self._bump()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await link.poke.wait()
        finally:
            if client is not None:
                await client.aclose()

    async def call(self, node: str, method: str, path: str, body: Any = None) -> Answer:
        """Send an action to ``node``; its answer, or why it refused or could not be asked."""
        link = self.link(node)
        if link is None:
            return Answer(False, message=f"no node named {node!r} is watched by this GUI")
        try:
            async with await link.client(ACTION_TIMEOUT_S) as client:
                response = await client.request(method, path, json=body)
        except (httpx.HTTPError, AccessError) as exc:
            return Answer(False, message=f"cannot reach {node}: {_reason(exc)}")
        try:
            answer = response.json() if response.content else None
        except ValueError:
            answer = None
        if response.status_code >= 400:
            error = answer.get("error") if isinstance(answer, dict) else None
            if not isinstance(error, dict):
                return Answer(False, message=f"{node} answered HTTP {response.status_code}")
            return Answer(False, message=str(error.get("message")), hint=str(error.get("hint")))
        link.poke.set()  # the outcome shows at once, not at the next poll
        return Answer(True, body=answer)


async def _json(client: httpx.AsyncClient, path: str) -> dict[str, Any]:
    response = await client.get(path)
    response.raise_for_status()
    answer = response.json()
    if not isinstance(answer, dict):
        raise TypeError(f"{path} answered {type(answer).__name__}, not an object")
    return answer


def _reason(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException):
        return "no answer in time"
    if isinstance(exc, httpx.ConnectError):
        return f"connection refused or no such socket ({exc})"
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code}"
    return str(exc) or type(exc).__name__
