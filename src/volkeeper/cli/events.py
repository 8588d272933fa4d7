"""``volkeeper events``: follow a node's event stream, one line per event, like events2.

How this works: ``stream_events`` GETs the control API's ``/events`` (Server-Sent Events, see
daemon/api/events.py) and reads it line by line as it arrives.  A blank line ends an SSE event; its
``data:`` lines hold the event's JSON, which repeats what ``id:`` and ``event:`` say, so only
``data:`` is read and comments (``: keepalive``) are skipped.  Each event is printed at once and
flushed, for pipes: with ``as_json`` as one compact line of JSON, keys in the node's order;
otherwise as ``TIME TYPE OBJECT key:value ...`` (``seq`` left out), a string without spaces or
quotes as it is and any other value as compact JSON (``state:"Resync pending"``,
``throttle:null``).  The node sends a keepalive every 15 s of silence, so a read that
waits ``READ_TIMEOUT_S`` means the connection is dead.  The stream ends normally when the node
closes it (it stops, or the client fell too far behind: the last event then says
``lost_events``).  Every failure is a ``CliError`` with one line.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

import httpx

from volkeeper.cli.client import CliError, _api_error, http_client
from volkeeper.client.credentials import Target

READ_TIMEOUT_S = 60.0
_HEAD = ("seq", "time", "type", "object")
_PLAIN = re.compile(r"[^\s\"]+")


def stream_events(target: Target, as_json: bool, initial: bool, out: TextIO) -> None:
    """Print the node's events to ``out`` until the node ends the stream."""
    render = json_line if as_json else text_line
    params = None if initial else {"initial": "false"}
    timeout = httpx.Timeout(10.0, read=READ_TIMEOUT_S)
    address = target.address
    with http_client(target, 10.0) as client:
        try:
            with client.stream("GET", "/events", params=params, timeout=timeout) as response:
                if response.status_code >= 400:
                    response.read()
                    raise CliError(_api_error(response))
                for event in sse_events(response.iter_lines()):
                    out.write(render(event) + "\n")
                    out.flush()
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise CliError(f"cannot reach the node at {address}: {exc}") from exc
        except httpx.ReadTimeout as exc:
            message = f"the node at {address} sent nothing for {READ_TIMEOUT_S:g} s"
            raise CliError(f"{message}: the connection is lost") from exc
        except httpx.HTTPError as exc:
            raise CliError(f"the event stream from the node at {address} broke: {exc}") from exc


def sse_events(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The JSON events of a Server-Sent Events stream, given its lines without line ends."""
    data: list[str] = []
    for line in lines:
        if line:
            field, _, value = line.partition(":")
            if field == "data":
                data.append(value.removeprefix(" "))
        elif data:
            yield _decode("\n".join(data))
            data = []


def _decode(data: str) -> dict[str, Any]:
    try:
        event = json.loads(data)
    except ValueError:
        event = None
    if not isinstance(event, dict):
        raise CliError(f"the node sent a malformed event: {data[:200]!r}")
    return event


def json_line(event: dict[str, Any]) -> str:
    return json.dumps(event, separators=(",", ":"))


def text_line(event: dict[str, Any]) -> str:
    head = [str(event.get(key, "-")) for key in _HEAD[1:]]
    fields = [f"{key}:{_word(value)}" for key, value in event.items() if key not in _HEAD]
    return " ".join(head + fields)


def _word(value: Any) -> str:
    if isinstance(value, str) and _PLAIN.fullmatch(value):
        return value
    return json.dumps(value, separators=(",", ":"))
