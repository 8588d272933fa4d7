"""How each kind of fault is done to the cluster, and undone.

How this works: ``Nemesis.strike(fault)`` resolves the fault's role to a node (the source the
checker follows, or the ``fault.target``-th other node) and calls ``_strike_<kind>``; ``heal``
calls ``_heal_<kind>`` if the kind has one (a partition is healed, a killed node started
again, a frozen one thawed, a disk's fault cleared...).  Role changes are faults too: a
switchover asks the source to hand over to the target; a failover pauses the writer, kills
the source, promotes the target (the checker first proves the promoted copy holds every
acknowledged write -- or, asynchronous, a prefix of them no longer than the lag the source
reported) and resumes the writer there; its heal starts the old source, which must come back
as a target.  Also here: the counters and logs a fault's record is read from.
"""

from __future__ import annotations

import json
import time
from typing import Any

from tests.fault.checker import Anomaly, Checker
from tests.fault.cluster import VOLUME, FaultCluster
from tests.fault.history import differing_bytes, read_image
from tests.fault.schedule import Fault
from tests.fault.workload import Workload


class Nemesis:
    def __init__(self, cluster: FaultCluster, names: list[str], job: str, mode: str, seed: int):
        self.cluster, self.names, self.job, self.mode, self.seed = cluster, names, job, mode, seed
        self.victim = ""  # the node the current fault strikes
        self.peer = ""  # the other end of a link fault
        self.old_source = ""

    def create_job(self) -> None:
        source, targets = self.names[0], self.names[1:]
        argv = ["job", "create", self.job, "--source", f"{source}:{VOLUME}", "--mode", self.mode]
        for target in targets:
            argv += ["--target", f"{target}:{VOLUME}"]
        done = self.cluster.vk(source, *argv, "--yes")
        if done.returncode != 0:
            raise RuntimeError(f"job create failed: {done.stderr}")

    def wait_mirroring(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self.cluster.status(self.names[0]) or {"mirrors": []}
            states = {m["state"] for m in view["mirrors"] if m["role"] == "source"}
            if states == {"Mirroring"} and len(view["mirrors"]) == len(self.names) - 1:
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"job {self.job} not Mirroring after {timeout} s: {self.describe_state()}"
        )

    def _vk(self, node: str, *args: str, checker: Checker, context: str) -> bool:
        done = self.cluster.vk(node, *args)
        if done.returncode != 0:
            said = done.stderr.strip() or done.stdout.strip()
            refused = f"{node}: volkeeper {' '.join(args)}: {said}"
            checker.anomalies.append(Anomaly("command refused", context, refused))
        return done.returncode == 0

    # -- strike and heal ------------------------------------------------------------------------

    def strike(self, fault: Fault, workload: Workload, checker: Checker) -> None:
        source = checker.source
        targets = [name for name in self.names if name != source]
        target = targets[fault.target % len(targets)]
        self.victim = source if fault.kind.endswith("_source") else target
        self.peer = source
        getattr(self, f"_strike_{fault.kind.removesuffix('_source').removesuffix('_target')}")(
            fault, workload, checker
        )

    def heal(self, fault: Fault, workload: Workload, checker: Checker) -> None:
        kind = fault.kind.removesuffix("_source").removesuffix("_target")
        undo = getattr(self, f"_heal_{kind}", None)
        if undo is not None:
            undo(fault, workload, checker)

    def _strike_partition(self, fault: Fault, *_: Any) -> None:
        one_way = fault.kind == "partition_one_way"
        if one_way and not fault.params["from_source"]:
            self.cluster.mesh.partition(self.victim, self.peer, one_way=True)
        else:
            self.cluster.mesh.partition(self.peer, self.victim, one_way=one_way)

    _strike_partition_one_way = _strike_partition

    def _heal_partition(self, *_: Any) -> None:
        self.cluster.mesh.heal_partitions()

    _heal_partition_one_way = _heal_partition

    def _strike_shape(self, fault: Fault, *_: Any) -> None:
        self.cluster.mesh.shape(self.peer, self.victim, fault.params["rate"])

    def _heal_shape(self, *_: Any) -> None:
        self.cluster.mesh.heal_shaping()

    def _strike_delay(self, fault: Fault, *_: Any) -> None:
        self.cluster.delay(self.peer, self.victim, fault.params["ms"])

    def _heal_delay(self, *_: Any) -> None:
        self.cluster.delay(self.peer, self.victim, 0)

    def _strike_kill(self, *_: Any) -> None:
        self.cluster.kill(self.victim)

    def _heal_kill(self, *_: Any) -> None:
        self.cluster.start(self.victim)

    def _strike_restart(self, *_: Any) -> None:
        self.cluster.stop(self.victim)

    _heal_restart = _heal_kill

    def _strike_freeze(self, *_: Any) -> None:
        self.cluster.freeze(self.victim)

    def _heal_freeze(self, *_: Any) -> None:
        self.cluster.thaw(self.victim)

    def _strike_power_cut(self, fault: Fault, workload: Workload, _: Checker) -> None:
        self.cluster.power_cut(self.victim, fault.params["seed"], fault.params["fraction"])
        if fault.kind == "power_cut_source":
            workload.history.power_cut()

    _heal_power_cut = _heal_kill

    def _disk(self, command: str) -> None:
        self.cluster.nodes[self.victim].disk.command(command)

    def _strike_disk_error(self, fault: Fault, *_: Any) -> None:
        self._disk(f"fail {fault.params['errno']} {fault.params['ops']}")

    def _heal_disk_error(self, *_: Any) -> None:
        self._disk("heal")

    def _strike_volume_error(self, fault: Fault, *_: Any) -> None:
        """Bad sectors: the volume's writes fail, the intent log's do not."""
        self._disk(f"fail {fault.params['errno']} write only={VOLUME}.img")

    _heal_volume_error = _heal_disk_error

    def _strike_slow_disk(self, fault: Fault, *_: Any) -> None:
        self._disk(f"slow {fault.params['ms']}")

    def _heal_slow_disk(self, *_: Any) -> None:
        self._disk("slow 0")

    def _strike_hang_disk(self, *_: Any) -> None:
        self._disk("hold")
        self.cluster.nodes[self.victim].disk_held = True

    def _heal_hang_disk(self, *_: Any) -> None:
        self._disk("unhold")
        self.cluster.nodes[self.victim].disk_held = False

    def _strike_settings(self, fault: Fault, _: Workload, checker: Checker) -> None:
        self._set(fault, checker, fault.params["compression"], fault.params["throttle"])

    def _heal_settings(self, fault: Fault, _: Workload, checker: Checker) -> None:
        self._set(fault, checker, "none", "none")

    def _set(self, fault: Fault, checker: Checker, compression: str, throttle: str) -> None:
        self._vk(checker.source, "mirror", "set", self.job, "--target", f"{self.victim}:{VOLUME}",
                 "--compression", compression, "--throttle", throttle,
                 checker=checker, context=str(fault))  # fmt: skip

    def _strike_switchover(self, fault: Fault, _: Workload, checker: Checker) -> None:
        if self._vk(checker.source, "job", "switchover", self.job, "--to", self.victim,
                    checker=checker, context=str(fault)):  # fmt: skip
            checker.source = self.victim

    def _strike_failover(self, fault: Fault, workload: Workload, checker: Checker) -> None:
        context = f"seed {self.seed}, {fault}"
        if not workload.pause(timeout=10.0):
            checker.anomalies.append(Anomaly("writer hung", context, "before the failover"))
            return
        lag = {
            m["target"]: m["out_of_sync_bytes"] + (m["queue_bytes"] or 0)
            for m in checker.mirrors() or []
        }
        self.old_source = checker.source
        old_bytes, _ = read_image(
            self.cluster.nodes[self.old_source].image, workload.history.blocks
        )
        self.cluster.kill(self.old_source)
        if self._vk(self.victim, "volume", "promote", VOLUME, checker=checker, context=context):
            checker.source = self.victim
            image, found = read_image(
                self.cluster.nodes[self.victim].image, workload.history.blocks
            )
            lacked = differing_bytes(old_bytes, image)
            lag_said = lag.get(f"{self.victim}:{VOLUME}", 0)
            self._judge_promoted(context, checker, workload, found, lacked, lag_said)
            workload.history.rebase(found)
        workload.resume()

    def _judge_promoted(
        self, context: str, checker: Checker, workload: Workload,
        found: dict[int, int | None], lacked: int, lag: int,
    ) -> None:  # fmt: skip
        history, flag = workload.history, checker.anomalies.append
        if self.mode == "sync":
            for lost in history.lost_writes(found)[:3]:
                flag(Anomaly("promoted copy lacks a write", context, f"{self.victim}: {lost}"))
            return
        broken = history.order_anomaly(found)
        if broken is not None:
            flag(Anomaly("promoted copy out of order", context, f"{self.victim}: {broken}"))
        if lacked > lag:
            flag(Anomaly("lag understated", context, f"lacked {lacked} B, lag said {lag} B"))

    def _heal_failover(self, *_: Any) -> None:
        if self.old_source:
            self.cluster.start(self.old_source)
            self.old_source = ""

    def repair(self, checker: Checker, context: str) -> list[str]:
        """What an administrator does after a fault that only a decision repairs: a Broken
        mirror gets a full resync, a split brain is resolved keeping the source's data."""
        done = []
        for mirror in checker.mirrors() or []:
            target = mirror["target"]
            if mirror["state"] == "Broken":
                args = ["mirror", "resync", self.job, "--target", target, "--full"]
            elif mirror["state"] == "Split brain":
                args = ["mirror", "resolve", self.job, "--keep", checker.source]
            else:
                continue
            self._vk(checker.source, *args, checker=checker, context=context)
            done.append(f"{mirror['state']} {target}: {' '.join(args[:2])}")
        return done

    # -- what a fault's record is read from --------------------------------------------------

    def resync_counters(self) -> dict[tuple[str, str], int]:
        counters = {}
        for name in self.names:
            view = self.cluster.status(name)
            for mirror in (view or {}).get("mirrors", []):
                if mirror["role"] == "source":
                    counters[name, mirror["target"]] = mirror["resync_sent_bytes"] or 0
        return counters

    def resynced_since(self, before: dict[tuple[str, str], int]) -> int:
        """Bytes resynced since ``before`` (a counter that went down restarted from zero)."""
        total = 0
        for key, now in self.resync_counters().items():
            was = before.get(key, 0)
            total += now - was if now >= was else now
        return total

    def log_marks(self) -> dict[str, int]:
        return {name: _size(node.daemon.log_path) for name, node in self.cluster.nodes.items()}

    def log_since(self, marks: dict[str, int]) -> str:
        text = []
        for name, node in self.cluster.nodes.items():
            with node.daemon.log_path.open("rb") as log:
                log.seek(marks.get(name, 0))
                text.append(log.read().decode(errors="replace"))
        return "\n".join(text)

    def describe_state(self) -> str:
        return json.dumps({
            name: [(m["target"], m["state"], m["out_of_sync_bytes"], m.get("last_error"))
                   for m in (self.cluster.status(name) or {"mirrors": []})["mirrors"]]
            for name in self.names
        })  # fmt: skip


def _size(path: Any) -> int:
    return path.stat().st_size if path.exists() else 0
