"""Invariant 1, write ordering: a target never holds a later acknowledged write without every
earlier one -- checked on the target's disk after the source dies at a random instant.

What this proves: a writer thread drives the source ``alpha``'s NBD export at queue depth 1
(tests/integration/rawnbd.py) while job ``web`` mirrors alpha:data1 -> beta:data1 in sync
mode.  Write ``k`` puts a 4 KiB block stamped with (marker, round, k, position) at block
``k mod N`` of the round's region, so blocks are overwritten and each block's latest content
is its highest ``k``.  A FLUSH goes out every 64 writes.

* ``test_source_killed_target_holds_a_prefix_of_the_writes``: at a random moment (a seeded
  ``random.Random``, the seed is printed) alpha is killed with SIGKILL, the writer stops (its
  last write may fail), beta is stopped cleanly (SIGTERM: it flushes) and beta's backing file
  is read.  With ``K`` the highest sequence number found, every block must hold exactly the
  highest ``j <= K`` written to it (or its old content if none was): the set of applied writes
  is a prefix, no write missing below ``K``, no torn block.  Sync mode adds ``K >= last write
  the writer saw acknowledged`` (and ``K <= last write attempted``).  Three rounds, each in a
  fresh region, with both daemons restarted in between (alpha recovers its intent log).
* ``test_target_killed_and_restarted_mid_stream_resync_makes_them_identical``: beta is killed
  with SIGKILL mid-stream and restarted while the writer goes on; alpha keeps acknowledging
  writes, resyncs, reaches Mirroring again; then both are stopped and the backing files must
  be byte-identical (sha256) and hold exactly the writer's model.

``test_prefix_check_rejects_reordered_images`` shows the check itself can fail.  Killed
daemons are restarted before a test ends, so the fixture's teardown (SIGTERM, exit 0) holds.
"""

from __future__ import annotations

import os
import random
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import NodeFactory
from tests.integration import rawnbd
from tests.integration.rawnbd import RawNbd
from tests.support.mirroring import sha256
from volkeeper_lab.launcher import LocalNode, VolumeSpec

MiB = 1 << 20
SIZE = 32 * MiB
BLOCK = 4096
N = 1000  # blocks per round's region; write k goes to block k mod N
FLUSH_EVERY = 64
MARK = b"VKORDER1"
STAMP = struct.Struct("<8sQQQ")  # marker, round, sequence k, block position
ROUNDS = 3


def block_for(round_: int, k: int) -> bytes:
    return STAMP.pack(MARK, round_, k, k % N) * (BLOCK // STAMP.size)


def seed() -> int:
    value = int(os.environ.get("VK_ORDER_SEED", time.time_ns() % (1 << 32)))
    print(f"write-order seed: {value} (rerun with VK_ORDER_SEED={value})")
    return value


# -- the writer -------------------------------------------------------------------------------


class Writer(threading.Thread):
    """Queue depth 1 through alpha's NBD export: write k, wait for its reply, write k + 1."""

    def __init__(self, socket_path: Path, round_: int, base: int) -> None:
        super().__init__(daemon=True, name=f"writer-{round_}")
        self.socket_path, self.round, self.base = socket_path, round_, base
        self.attempted = -1  # the last k sent
        self.acked = -1  # the last k whose reply said success
        self.error: BaseException | str | None = None
        self.stopping = threading.Event()

    def run(self) -> None:
        try:
            with RawNbd.open(str(self.socket_path), "data1", timeout=15) as client:
                k = 0
                while not self.stopping.is_set():
                    self.attempted = k
                    reply = client.write(self.base + (k % N) * BLOCK, block_for(self.round, k))
                    if reply.error != rawnbd.OK:
                        self.error = f"write {k} failed with NBD error {reply.error}"
                        return
                    self.acked = k
                    k += 1
                    if k % FLUSH_EVERY == 0:
                        assert client.flush().error == rawnbd.OK, f"flush after {k - 1} failed"
                assert client.flush().error == rawnbd.OK, "the final flush failed"
                client.disconnect()
        except (rawnbd.NbdClosed, rawnbd.NbdTimeout, OSError, AssertionError) as exc:
            self.error = exc

    def wait_acked(self, count: int, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.acked < count:
            assert self.is_alive(), f"the writer ended early: {self.error!r}"
            assert time.monotonic() < deadline, f"only {self.acked + 1} writes in {timeout}s"
            time.sleep(0.002)

    def finish(self, timeout: float = 30) -> None:
        self.stopping.set()
        self.join(timeout)
        assert not self.is_alive(), "the writer did not stop"


# -- the prefix check -------------------------------------------------------------------------


def stamps(image: bytes, round_: int, base: int) -> list[int | None]:
    """For each block of the region: the k it holds, or None if it holds no write of this
    round.  A block that is neither untouched (zeros) nor a whole, consistent stamp fails."""
    found: list[int | None] = []
    for position in range(N):
        block = image[base + position * BLOCK : base + (position + 1) * BLOCK]
        if block == bytes(BLOCK):
            found.append(None)
            continue
        mark, stamped_round, k, stamped_position = STAMP.unpack_from(block)
        assert mark == MARK and stamped_round == round_ and stamped_position == position, (
            f"block {position} holds foreign bytes {block[:32]!r}"
        )
        assert block == block_for(round_, k), f"block {position} is torn (starts as write {k})"
        found.append(k)
    return found


def latest_at_or_below(position: int, top: int) -> int | None:
    """The highest j <= top written to ``position`` (j = position + N * i), or None."""
    if top < position:
        return None
    return position + N * ((top - position) // N)


def check_prefix(found: list[int | None]) -> int:
    """Every block holds what the writes 0..K left there, K the highest present; returns K."""
    present = [k for k in found if k is not None]
    assert present, "the target holds none of this round's writes"
    top = max(present)
    wrong = [
        (position, k, latest_at_or_below(position, top))
        for position, k in enumerate(found)
        if k != latest_at_or_below(position, top)
    ]
    assert not wrong, (
        f"not a prefix: write {top} is present, but {len(wrong)} blocks do not hold the latest "
        f"write <= {top} (position, holds, should hold): {wrong[:10]}"
    )
    return top


def test_prefix_check_rejects_reordered_images() -> None:
    """The check accepts exactly the prefix images: a lost earlier write, a lost overwrite,
    a torn block and a foreign block all fail it."""

    def image(top: int, holes: dict[int, bytes | None] | None = None) -> bytes:
        out = bytearray(N * BLOCK)
        for position in range(N):
            k = latest_at_or_below(position, top)
            if k is not None:
                out[position * BLOCK : (position + 1) * BLOCK] = block_for(0, k)
        for position, content in (holes or {}).items():
            out[position * BLOCK : (position + 1) * BLOCK] = content or bytes(BLOCK)
        return bytes(out)

    assert check_prefix(stamps(image(2345), 0, 0)) == 2345
    assert check_prefix(stamps(image(17), 0, 0)) == 17
    bad = [
        image(2345, {10: None}),  # write 2010 (and 1010, 10) lost, 2345 present
        image(2345, {300: block_for(0, 1300)}),  # write 2300 lost: the old 1300 remains
        image(2345, {700: block_for(0, 2700)}),  # write 2700 applied before 2346..2699
        image(2345, {200: block_for(0, 2200)[:2048] + block_for(0, 1200)[2048:]}),  # torn
        image(2345, {5: block_for(1, 2005)}),  # another round's block
    ]
    for candidate in bad:
        with pytest.raises(AssertionError):
            check_prefix(stamps(candidate, 0, 0))


# -- daemons ----------------------------------------------------------------------------------


def data1(node: LocalNode) -> Path:
    return node.volume_path(node.volumes[0])


def mirror_view(node: LocalNode) -> dict[str, Any]:
    mirrors = node.status()["mirrors"]
    assert isinstance(mirrors, list) and len(mirrors) == 1, mirrors
    return mirrors[0]  # type: ignore[no-any-return]


def wait_state(node: LocalNode, state: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (view := mirror_view(node))["state"] != state:
        assert time.monotonic() < deadline, (
            f"mirror not {state!r} after {timeout}s: {view}\n{node.log_text()[-3000:]}"
        )
        time.sleep(0.02)
    return view


def mirrored_pair(start_node: NodeFactory) -> tuple[LocalNode, LocalNode]:
    beta = start_node("beta", [VolumeSpec("data1", SIZE)])
    alpha = start_node("alpha", [VolumeSpec("data1", SIZE)], peers={"beta": beta.peer_port})
    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "mode": "sync"}
    with alpha.api() as api:
        created = api.post("/jobs", json={**body, "confirm": True})
    assert created.status_code == 201, created.text
    wait_state(alpha, "Mirroring")
    return alpha, beta


# -- 1. kill -9 of the source: the target holds a prefix -------------------------------------


def test_source_killed_target_holds_a_prefix_of_the_writes(start_node: NodeFactory) -> None:
    rng = random.Random(seed())
    alpha, beta = mirrored_pair(start_node)
    for round_ in range(ROUNDS):
        base = round_ * N * BLOCK
        writer = Writer(alpha.nbd_socket, round_, base)
        writer.start()
        try:
            writer.wait_acked(rng.randrange(N + N // 5, 3 * N))  # past one overwrite pass
            time.sleep(rng.uniform(0, 0.05))
            assert mirror_view(alpha)["state"] == "Mirroring", "the link dropped mid-round"
            alpha.kill()
        finally:
            writer.finish()
        acked, attempted = writer.acked, writer.attempted
        assert beta.stop() == 0, "the target did not stop cleanly"

        found = stamps(data1(beta).read_bytes(), round_, base)
        top = check_prefix(found)
        print(f"round {round_}: acked {acked}, attempted {attempted}, target holds 0..{top}")
        assert acked <= top <= attempted, (
            f"round {round_}: the target holds writes 0..{top}, but the writer saw 0..{acked} "
            f"acknowledged (sync mode) and sent up to {attempted}"
        )

        beta.start()
        alpha.start()  # crash recovery: the activity log's extents are resynced
        wait_state(alpha, "Mirroring")
    assert alpha.stop() == 0 and beta.stop() == 0
    assert sha256(data1(alpha)) == sha256(data1(beta)), "not identical after recovery"


# -- 2. kill -9 of the target: resync makes the copies identical ----------------------------


def test_target_killed_and_restarted_mid_stream_resync_makes_them_identical(
    start_node: NodeFactory,
) -> None:
    rng = random.Random(seed())
    alpha, beta = mirrored_pair(start_node)
    writer = Writer(alpha.nbd_socket, 7, 0)
    writer.start()
    try:
        writer.wait_acked(rng.randrange(N // 2, 2 * N))
        time.sleep(rng.uniform(0, 0.05))
        beta.kill()
        wait_state(alpha, "Resync pending", timeout=15)
        away = writer.acked
        time.sleep(rng.uniform(0.2, 0.8))
        writer.wait_acked(away + 100, timeout=15)  # writes go on while the target is away
        beta.start()
        wait_state(alpha, "Mirroring")
        writer.wait_acked(writer.acked + rng.randrange(100, 600))  # and on after the resync
    finally:
        writer.finish()
    assert writer.error is None, f"the writer failed: {writer.error!r}"
    assert writer.acked == writer.attempted
    view = wait_state(alpha, "Mirroring")
    assert view["out_of_sync_bytes"] == 0, view

    assert alpha.stop() == 0 and beta.stop() == 0
    assert sha256(data1(alpha)) == sha256(data1(beta)), "the resync left a difference"
    image = data1(beta).read_bytes()
    assert check_prefix(stamps(image, 7, 0)) == writer.acked, "an acknowledged write is missing"
    assert image[N * BLOCK :] == bytes(SIZE - N * BLOCK), "bytes outside the writer's region"
