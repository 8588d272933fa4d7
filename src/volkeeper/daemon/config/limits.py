"""The ``[limits]`` table: limits against abuse of a node's listeners (io/limits.py).

How this works: each key has a safe default and a validator that names what it takes; the
node hands the validated values to ``io.limits.Limits`` as they are.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import PlainValidator

from volkeeper.core.nbd_wire import MAX_BLOCK_SIZE
from volkeeper.daemon.config.types import Table, as_size, ranged, show


def _in_flight_bytes(value: object) -> int:
    size = as_size(value)
    if size < MAX_BLOCK_SIZE:
        raise ValueError(f"must be at least 32MiB (the largest NBD request), got {show(value)}")
    return size


def _max_request(value: object) -> int:
    size = as_size(value)
    if size & (size - 1) or not 64 * 1024 <= size <= MAX_BLOCK_SIZE:
        raise ValueError(f"must be a power of two from 64KiB to 32MiB, got {show(value)}")
    return size


class LimitsSection(Table):
    """The optional ``[limits]`` table: limits against abuse (io/limits.py), safe defaults."""

    handshake_timeout: Annotated[float, ranged(1, 600)] = 10.0
    max_connections: Annotated[int, ranged(1, 65535, integer=True)] = 256
    max_connections_per_client: Annotated[int, ranged(1, 65535, integer=True)] = 32
    nbd_in_flight_bytes: Annotated[int, PlainValidator(_in_flight_bytes)] = 128 * 1024 * 1024
    peer_queued_bytes: Annotated[int, PlainValidator(_in_flight_bytes)] = 256 * 1024 * 1024
    nbd_max_request: Annotated[int, PlainValidator(_max_request)] = MAX_BLOCK_SIZE
