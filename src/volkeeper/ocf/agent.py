"""``ocf:volkeeper:job``: the OCF 1.1 resource agent that lets Pacemaker drive a job's roles.

How this works: Pacemaker runs the agent as a promotable clone, one instance per node, with
the action as its argument and the parameters in ``OCF_RESKEY_*``.  The agent asks the local
node's control API (``control``, or the ``control`` address of ``config``) and acts:

    action         what it does                                                   exit
    start          the node knows the job: mark the instance started              0 / 6 / 1
    stop           mark it stopped (a target keeps mirroring; a source is demoted
                   first by Pacemaker)                                            0
    monitor        the job's source here and not demoted: RUNNING_PROMOTED;       8 / 0 / 7
                   a target (started): SUCCESS, and its promotion score;
                   otherwise NOT_RUNNING (probes see the truth: a source is
                   reported promoted even before start)
    promote        source here: lift a demotion; a target whose source is          0 / 1
                   connected: a switchover to this node; a target whose source
                   is gone: a failover (``volume promote``, never forced)
    demote         a source stops taking writes, drains, and waits, locked, for   0 / 1
                   another node to take the job over; a target: nothing
    notify         nothing to do                                                  0
    validate-all   the parameters make sense and the node answers                 0 / 6 / 5
    meta-data      the XML below                                                  0

Promotion scores, set with ``crm_attribute --promotion`` on every monitor, follow DRBD's
ladder so Pacemaker never promotes stale data: the source 10000; an UpToDate target
connected to its source 1000 (its peers are known); an UpToDate target whose source is away
100; a Consistent (async) one 10; anything else (Inconsistent, Outdated, Paused, Split
brain) none -- the score is deleted.  A target that gets no score is never promoted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from volkeeper.cli.client import CliError, ControlClient, resolve_node

SUCCESS, ERR_GENERIC, ERR_ARGS, ERR_UNIMPLEMENTED = 0, 1, 2, 3
ERR_INSTALLED, ERR_CONFIGURED, NOT_RUNNING, RUNNING_PROMOTED = 5, 6, 7, 8
SCORES = {"source": 10000, "connected": 1000, "UpToDate": 100, "Consistent": 10}
DEFAULT_CONFIG = "/etc/volkeeper/node.toml"

META_DATA = """<?xml version="1.0"?>
<!DOCTYPE resource-agent SYSTEM "ra-api-1.dtd">
<resource-agent name="job" version="1.0">
  <version>1.1</version>
  <longdesc lang="en">
Drives the roles of one volkeeper job: run it as a promotable clone (promoted-max=1) on the
job's nodes.  The promoted instance is the job's source, the others its targets.  Promotion
moves the source with a switchover when the current source is reachable and with a failover
when it is not; a stale or Inconsistent copy gets no promotion score, so it is never
promoted.  The volkeeper daemon itself runs outside the agent (a systemd unit, or another
resource).  Use fencing: without it a partitioned old source may keep writing (volkeeper then
finds a split brain, and waits for the administrator).
  </longdesc>
  <shortdesc lang="en">volkeeper replicated job (promotable)</shortdesc>
  <parameters>
    <parameter name="job" unique="1" required="1">
      <longdesc lang="en">The name of the volkeeper job.</longdesc>
      <shortdesc lang="en">job name</shortdesc>
      <content type="string"/>
    </parameter>
    <parameter name="control" unique="0" required="0">
      <longdesc lang="en">The local node's control API: unix:/path or host:port.  Read from
the node config when not given.</longdesc>
      <shortdesc lang="en">control address</shortdesc>
      <content type="string" default=""/>
    </parameter>
    <parameter name="config" unique="0" required="0">
      <longdesc lang="en">The local node's config file (for its control address).</longdesc>
      <shortdesc lang="en">node config</shortdesc>
      <content type="string" default="/etc/volkeeper/node.toml"/>
    </parameter>
  </parameters>
  <actions>
    <action name="start" timeout="30s"/>
    <action name="stop" timeout="30s"/>
    <action name="promote" timeout="90s"/>
    <action name="demote" timeout="90s"/>
    <action name="notify" timeout="30s"/>
    <action name="monitor" depth="0" timeout="20s" interval="10s" role="Promoted"/>
    <action name="monitor" depth="0" timeout="20s" interval="11s" role="Unpromoted"/>
    <action name="meta-data" timeout="5s"/>
    <action name="validate-all" timeout="20s"/>
  </actions>
</resource-agent>
"""


class Agent:
    def __init__(self, env: dict[str, str]) -> None:
        self.env = env
        self.job = env.get("OCF_RESKEY_job", "")
        state_dir = Path(env.get("HA_RSCTMP") or "/run/resource-agents")
        self.started_file = state_dir / f"volkeeper-job-{self.job}.started"

    # -- the node's view --------------------------------------------------------------------

    def client(self) -> ControlClient:
        control = self.env.get("OCF_RESKEY_control") or None
        config = self.env.get("OCF_RESKEY_config") or DEFAULT_CONFIG
        return ControlClient(resolve_node(control, None if control else config), timeout=60)

    def role(self) -> tuple[str | None, dict[str, Any]]:
        """("source" | "demoted" | "target" | None, the job's view here)."""
        jobs = {j["name"]: j for j in self.client().get("/jobs")}
        job = jobs.get(self.job)
        if job is None:
            return None, {}
        if job["role"] == "source":
            return ("demoted" if job.get("demoted") else "source"), job
        return "target", job

    # -- actions ----------------------------------------------------------------------------

    def monitor(self) -> int:
        role, job = self.role()
        if role == "source":
            self.score(SCORES["source"])
            return RUNNING_PROMOTED
        if role is None or not self.started_file.exists():
            return NOT_RUNNING
        self.score(self.target_score(job) if role == "target" else SCORES["connected"])
        return SUCCESS

    def target_score(self, job: dict[str, Any]) -> int | None:
        mirrors = job.get("mirrors", [])
        if not mirrors:
            return None
        view = mirrors[0]
        data_state = view.get("data_state")
        if view.get("state") == "Mirroring" and data_state == "UpToDate":
            return SCORES["connected"]
        if view.get("state") in ("Paused", "Split brain"):
            return None
        return SCORES.get(data_state or "")

    def start(self) -> int:
        role, _ = self.role()
        if role is None:
            return ERR_CONFIGURED  # this node takes no part in the job
        self.started_file.parent.mkdir(parents=True, exist_ok=True)
        self.started_file.touch()
        return SUCCESS

    def stop(self) -> int:
        self.started_file.unlink(missing_ok=True)
        return SUCCESS

    def promote(self) -> int:
        role, job = self.role()
        if role in ("source", "demoted"):
            self.client().request("POST", f"/jobs/{self.job}/activate")
            return SUCCESS
        if role != "target":
            return ERR_GENERIC
        view = job["mirrors"][0]
        volume = view["target"].partition(":")[2]
        if view.get("state") == "Mirroring":  # the source is there: a switchover
            node = self.client().get("/status")["node"]
            self.client().request("POST", f"/jobs/{self.job}/switchover", {"to": node})
        else:  # the source is gone: a failover (refused unless the copy may be promoted)
            self.client().request("POST", f"/volumes/{volume}/promote", {"force": False})
        return SUCCESS if self.role()[0] == "source" else ERR_GENERIC

    def demote(self) -> int:
        role, _ = self.role()
        if role == "source":
            self.client().request("POST", f"/jobs/{self.job}/demote")
        return SUCCESS

    def notify(self) -> int:
        return SUCCESS

    def validate(self) -> int:
        if not self.job:
            log("the job parameter is required")
            return ERR_CONFIGURED
        try:
            self.client()
        except CliError as exc:
            log(str(exc))
            return ERR_CONFIGURED
        return SUCCESS

    def score(self, score: int | None) -> None:
        """The promotion score of this node; None deletes it (never promote)."""
        command = ["crm_attribute", "--promotion", "--lifetime", "reboot"]
        command += ["--delete"] if score is None else ["--update", str(score)]
        try:
            subprocess.run(command, check=False, capture_output=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired) as exc:
            log(f"crm_attribute failed: {exc}")


def log(message: str) -> None:
    print(f"volkeeper job agent: {message}", file=sys.stderr)


def run(action: str, env: dict[str, str]) -> int:
    agent = Agent(env)
    if action == "meta-data":
        print(META_DATA, end="")
        return SUCCESS
    if action in ("usage", "help"):
        print("usage: job {start|stop|monitor|promote|demote|notify|validate-all|meta-data}")
        return SUCCESS
    checked = agent.validate()
    if action == "validate-all" or checked != SUCCESS:
        return checked
    actions = {
        "start": agent.start, "stop": agent.stop, "monitor": agent.monitor,
        "promote": agent.promote, "demote": agent.demote, "notify": agent.notify,
    }  # fmt: skip
    if action not in actions:
        return ERR_UNIMPLEMENTED
    try:
        return actions[action]()
    except CliError as exc:
        log(f"{action}: {exc}")
        if action == "monitor":  # the daemon does not answer: nothing runs here
            return NOT_RUNNING
        return SUCCESS if action == "stop" else ERR_GENERIC


def main() -> None:
    started = time.monotonic()
    action = sys.argv[1] if len(sys.argv) > 1 else "usage"
    code = run(action, dict(os.environ))
    if action not in ("monitor", "meta-data"):
        log(f"{action} -> {code} in {time.monotonic() - started:.2f} s")
    sys.exit(code)


if __name__ == "__main__":
    main()
