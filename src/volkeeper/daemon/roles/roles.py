"""A node's role changes, wired to its jobs, target volumes and NBD server.

How this works: ``Roles`` builds the three parts and lets each register what it answers
for: ``Switchover`` (daemon/roles/switchover.py, the old source's side of a planned move),
``Takeover`` (daemon/roles/takeover.py, the new source's side) and ``Failover``
(daemon/roles/failover.py: promotion, two sources meeting, split brain).
"""

from __future__ import annotations

from volkeeper.daemon.jobs.jobs import Jobs
from volkeeper.daemon.roles.failover import Failover
from volkeeper.daemon.roles.switchover import Switchover
from volkeeper.daemon.roles.takeover import Takeover
from volkeeper.daemon.target.targets import TargetVolumes
from volkeeper.io.nbd_server import NbdServer


class Roles:
    def __init__(self, node: str, jobs: Jobs, targets: TargetVolumes, nbd: NbdServer) -> None:
        self.switchover = Switchover(node, jobs, targets, nbd)
        self.takeover = Takeover(node, jobs, targets)
        self.failover = Failover(node, jobs, targets, nbd)
