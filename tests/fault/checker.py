"""The checker: what every node says, held against what every copy holds.

How this works: the harness calls ``Checker.look(context)`` with the writer paused (nothing in
flight, so the source does not change while it looks).  It first asks every node for its
status -- what is *claimed* -- and only then reads the images, freezing each target's daemon
(SIGSTOP) while its image is read so an asynchronous copy is seen at one instant.  With the
writer paused a copy only gets closer to the source after the claim was made, so a claim
that was true then is true of what is read later; a difference found is a false claim:

- the source holds what the application was told (``History.lost_writes``);
- no mirror reports fewer ``out_of_sync_bytes`` (plus, asynchronous, the bytes queued for
  the target: its lag) than the bytes in which its target differs from the source (Broken
  and Split brain say the difference is unknown; they are exempt);
- a synchronous mirror that says Mirroring has a target identical to the source, and a
  target that says UpToDate while Mirroring holds every acknowledged write;
- an asynchronous mirror that says Mirroring has a target that is the source as some prefix
  of the writes left it (write-order fidelity).

``converged()`` is the end of a fault: every node answers, every mirror is Mirroring with
nothing out of sync or queued, and every target UpToDate (Consistent, asynchronous).
``identical(context)`` then proves every copy byte-identical and right, and rebases the
history on the source's image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tests.fault.cluster import FaultCluster
from tests.fault.history import History, differing_bytes, read_image

UNCLAIMED = ("Broken", "Split brain")


@dataclass(frozen=True)
class Anomaly:
    kind: str
    context: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.kind}] {self.context}: {self.detail}"


class Checker:
    def __init__(self, cluster: FaultCluster, history: History, job: str, mode: str) -> None:
        self.cluster, self.history, self.job, self.mode = cluster, history, job, mode
        self.source = ""  # the node the harness made source
        self.anomalies: list[Anomaly] = []
        self.looks = 0

    def _flag(self, kind: str, context: str, detail: str) -> None:
        self.anomalies.append(Anomaly(kind, context, detail))

    def mirrors(self) -> list[dict[str, Any]] | None:
        view = self.cluster.status(self.source)
        if view is None:
            return None
        return [m for m in view["mirrors"] if m["job"] == self.job and m["role"] == "source"]

    def target_state(self, node: str) -> str | None:
        view = self.cluster.status(node)
        if view is None:
            return None
        return next((v.get("data_state") for v in view["volumes"] if v["role"] == "target"), None)

    # -- a look at a moment ---------------------------------------------------------------------

    def look(self, context: str) -> None:
        mirrors = self.mirrors()
        if mirrors is None or not self._readable(self.source):
            return
        claims = [(m, self.target_state(_node(m["target"]))) for m in mirrors]
        self.looks += 1
        source_bytes, found = read_image(self.cluster.nodes[self.source].image, self.history.blocks)
        for lost in self.history.lost_writes(found)[:3]:
            self._flag("acknowledged write lost", context, f"{self.source}: {lost}")
        for mirror, target_state in claims:
            target = _node(mirror["target"])
            if not self._readable(target):
                continue
            target_bytes, target_found = self._read_frozen(target)
            self._judge(context, mirror, target_state, source_bytes, target_bytes, target_found)

    def _judge(
        self, context: str, mirror: dict[str, Any], target_state: str | None,
        source_bytes: bytes, target_bytes: bytes, found: dict[int, int | None],
    ) -> None:  # fmt: skip
        target, state = _node(mirror["target"]), mirror["state"]
        claim = (
            f"{self.source}->{target} said {state}, {mirror['out_of_sync_bytes']} B out of "
            f"sync, {mirror['queue_bytes'] or 0} B queued"
        )
        if state in UNCLAIMED:
            return
        differ = differing_bytes(source_bytes, target_bytes)
        said = mirror["out_of_sync_bytes"] + (mirror["queue_bytes"] or 0)  # async: + the lag
        if differ > said:
            self._flag("out of sync understated", context, f"{claim}; {differ} bytes differ")
        if state != "Mirroring":
            return
        if self.mode == "sync":
            if differ:
                self._flag("Mirroring while different", context, f"{claim}; {differ} differ")
            if target_state == "UpToDate":
                for lost in self.history.lost_writes(found)[:3]:
                    self._flag("UpToDate target lacks a write", context, f"{target}: {lost}")
        elif (broken := self.history.order_anomaly(found)) is not None:
            self._flag("write order broken", context, f"{claim}; {target}: {broken}")

    def _readable(self, name: str) -> bool:
        """Its disk is mounted and not hanging (a read would wait as long as the hang)."""
        node = self.cluster.nodes[name]
        return node.disk.process is not None and not node.disk_held

    def _read_frozen(self, name: str) -> tuple[bytes, dict[int, int | None]]:
        was_frozen = self.cluster.nodes[name].frozen
        self.cluster.freeze(name)
        try:
            return read_image(self.cluster.nodes[name].image, self.history.blocks)
        finally:
            if not was_frozen:
                self.cluster.thaw(name)

    # -- the end of a fault ---------------------------------------------------------------------

    def settled(self, mirrors: list[dict[str, Any]] | None = None) -> bool:
        """Every mirror Mirroring and every target in step (UpToDate; an asynchronous one
        says Consistent: it cannot know what is still on its way)."""
        mirrors = self.mirrors() if mirrors is None else mirrors
        if not mirrors or any(m["state"] != "Mirroring" for m in mirrors):
            return False
        in_step = ("UpToDate",) if self.mode == "sync" else ("UpToDate", "Consistent")
        return all(self.target_state(_node(m["target"])) in in_step for m in mirrors)

    def converged(self) -> bool:
        """Settled, and nothing out of sync or on its way."""
        mirrors = self.mirrors() or []
        lag = sum(m["out_of_sync_bytes"] + (m["queue_bytes"] or 0) for m in mirrors)
        return lag == 0 and self.settled(mirrors)

    def identical(self, context: str) -> None:
        """Every copy equals the source, which holds what it should; then rebase on it."""
        source_bytes, found = read_image(self.cluster.nodes[self.source].image, self.history.blocks)
        for lost in self.history.lost_writes(found)[:3]:
            self._flag("acknowledged write lost", context, f"{self.source}: {lost}")
        for name in self.cluster.nodes:
            if name != self.source:
                differ = differing_bytes(source_bytes, self._read_frozen(name)[0])
                if differ:
                    self._flag("copies differ after recovery", context, f"{name}: {differ} bytes")
        self.history.rebase(found)


def _node(volume: str) -> str:
    return volume.split(":", 1)[0]
