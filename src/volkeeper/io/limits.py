"""Limits against abuse of a node's listeners, and the count of each time one held.

How this works: ``Limits`` carries the ``[limits]`` table's values (daemon/config/node.py has
the safe defaults) to the NBD server and the replication listener, which check them where a
connection is accepted, negotiated and fed:

* ``handshake_timeout``: a connection must finish negotiating (NBD: reach transmission;
  replication: send its first bytes, then complete TLS) within it, or it is closed -- a
  slow-loris client holds a slot for that long at most;
* ``max_connections`` per listener and ``max_connections_per_client`` per client address
  (TCP): one more is closed at once;
* ``nbd_in_flight_bytes``: an NBD connection stops being read while the requests it has
  in flight carry more than this (read buffers and write payloads), so one client cannot make
  the daemon hold gigabytes;
* ``peer_queued_bytes``: a target stops reading a source's link while the frames it has
  taken and not yet written carry more than this (a source sending faster than the target's
  disk, or ignoring its ACKs, meets TCP's own back-pressure instead of the target's memory).

* ``nbd_max_request``: the largest READ or WRITE an NBD client may send (advertised in
  NBD_INFO_BLOCK_SIZE; 32 MiB, core/nbd_wire.py ``MAX_BLOCK_SIZE``, is also the most it may
  be); a larger one is refused with EINVAL before any buffer is allocated for it.  A
  replication frame carries at most its protocol's ``MAX_PAYLOAD``: it must take the largest
  write a client may make, so it is not a setting of its own.

``hit(limit, ...)`` counts each time a limit held (``volkeeper_limit_hits_total``) and logs
it -- the first ten, then every thousandth, so a flood cannot flood the log too.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import structlog

from volkeeper.core.nbd_wire import MAX_BLOCK_SIZE

log = structlog.get_logger("volkeeper.limits")

MiB = 1024 * 1024


@dataclass
class Limits:
    handshake_timeout: float = 10.0
    max_connections: int = 256
    max_connections_per_client: int = 32
    nbd_in_flight_bytes: int = 128 * MiB
    peer_queued_bytes: int = 256 * MiB
    nbd_max_request: int = MAX_BLOCK_SIZE
    hits: collections.Counter[str] = field(default_factory=collections.Counter)

    def hit(self, limit: str, **fields: object) -> None:
        self.hits[limit] += 1
        count = self.hits[limit]
        if count <= 10 or count % 1000 == 0:
            log.warning("limit reached", limit=limit, times=count, **fields)

    def over_connections(self, what: str, total: int, same_client: int, peer: str) -> bool:
        """Would one more connection (``total`` open, ``same_client`` from its address)
        break a limit?  Counts and logs it if so."""
        if total >= self.max_connections:
            self.hit(f"{what}_connections", peer=peer, open=total)
            return True
        if same_client >= self.max_connections_per_client:
            self.hit(f"{what}_connections_per_client", peer=peer, open=same_client)
            return True
        return False
