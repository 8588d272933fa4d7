"""Live Pacemaker clusters drive a job through the agent; crm_simulate decides on two nodes.

Two live clusters are started here, each from Debian's corosync and pacemakerd run as plain
processes with a CIB written beforehand (no fencing device in a test; a 2 s DC election):

* two nodes on this one machine, each in its own network, mount and IPC namespaces joined
  by veth (tests/ocf/cluster.py), each node's agent managing its own volkeeper node through
  its own /etc/volkeeper/node.toml: Pacemaker finds alpha (the job's source) promoted and a
  Dummy application colocated there; nodeA's cluster stack stops and Pacemaker demotes alpha
  and promotes beta (a switchover: nothing resent), the application and the client follow;
  nodeA returns as a target; beta's daemon is killed and Pacemaker promotes alpha (a
  failover); beta restarts as its target.
* one node (a one-node ring on 127.0.0.1) whose agent manages beta: a copy whose full resync
  runs gets no promotion score and is never promoted although its resource asks to be; when
  the source of an UpToDate copy is killed, Pacemaker promotes it (a failover) and the
  application starts there.

crm_simulate shows the same ladder on a two-node CIB, case by case.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import NodeFactory, need
from tests.ocf.cluster import TwoNodeCluster
from tests.support.acked_writer import AckedWriter
from tests.support.topologies import assert_identical, path, stop_in_order, volume, wait_mirror
from volkeeper.ocf.install import install
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

CIB_DIR = Path("/var/lib/pacemaker/cib")
NODE = "node1"

COROSYNC_CONF = """totem {{
    version: 2
    cluster_name: volkeeper-test
    transport: udpu
    crypto_cipher: none
    crypto_hash: none
}}
nodelist {{
    node {{
        ring0_addr: 127.0.0.1
        name: {node}
        nodeid: 1
    }}
}}
quorum {{
    provider: corosync_votequorum
}}
logging {{
    to_logfile: yes
    logfile: {log}
    to_stderr: no
    to_syslog: no
}}
"""


CIB = """<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0">
  <configuration>
    <crm_config>
      <cluster_property_set id="options">
        <nvpair id="options-stonith" name="stonith-enabled" value="false"/>
        <nvpair id="options-dc-deadtime" name="dc-deadtime" value="2s"/>
        <nvpair id="options-recheck" name="cluster-recheck-interval" value="5s"/>
      </cluster_property_set>
    </crm_config>
    <nodes/>
    <resources>{resources}{app}</resources>
    {constraints}
  </configuration>
  <status/>
</cib>
"""
EMPTY_CIB = CIB.format(resources="", app="", constraints="<constraints/>")


def clone(name: str, job: str, control: str, target_role: str) -> str:
    return f"""<clone id="{name}-clone">
  <meta_attributes id="{name}-clone-meta">
    <nvpair id="{name}-promotable" name="promotable" value="true"/>
    <nvpair id="{name}-clone-max" name="clone-max" value="1"/>
    <nvpair id="{name}-promoted-max" name="promoted-max" value="1"/>
    <nvpair id="{name}-target-role" name="target-role" value="{target_role}"/>
  </meta_attributes>
  <primitive id="{name}" class="ocf" provider="volkeeper" type="job">
    <instance_attributes id="{name}-params">
      <nvpair id="{name}-job" name="job" value="{job}"/>
      <nvpair id="{name}-control" name="control" value="{control}"/>
    </instance_attributes>
    <operations>
      <op id="{name}-mon-p" name="monitor" interval="2s" role="Promoted" timeout="20s"/>
      <op id="{name}-mon-u" name="monitor" interval="3s" role="Unpromoted" timeout="20s"/>
      <op id="{name}-promote" name="promote" interval="0" timeout="90s"/>
    </operations>
  </primitive>
</clone>"""


APP = """<primitive id="app" class="ocf" provider="heartbeat" type="Dummy">
  <operations><op id="app-mon" name="monitor" interval="5s" timeout="20s"/></operations>
</primitive>"""

CONSTRAINTS = """<constraints>
  <rsc_colocation id="app-with-web" rsc="app" with-rsc="web-clone" with-rsc-role="Promoted"
                  score="INFINITY"/>
  <rsc_order id="web-then-app" first="web-clone" first-action="promote" then="app"
             then-action="start"/>
</constraints>"""


def run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if check:
        assert done.returncode == 0, f"{' '.join(argv)}: {done.stdout}{done.stderr}"
    return done


@contextlib.contextmanager
def pacemaker(directory: Path) -> Iterator[None]:
    """corosync and pacemakerd, started and stopped here; the CIB emptied before and after."""
    need("corosync", "pacemakerd", "cibadmin", "crm_mon", "crm_resource", "crm_attribute")
    if run("pgrep", "-x", "corosync", check=False).returncode == 0:
        pytest.skip("a corosync already runs on this machine: not touching its cluster")
    conf = directory / "corosync.conf"
    conf.write_text(COROSYNC_CONF.format(node=NODE, log=directory / "corosync.log"))
    _reset_cib(EMPTY_CIB)
    env = {**os.environ, "PCMK_logfile": str(directory / "pacemaker.log")}
    with (directory / "daemons.out").open("wb") as out:
        corosync = subprocess.Popen(["corosync", "-f", "-c", str(conf)], stdout=out, stderr=out)
        try:
            _until(lambda: run("corosync-quorumtool", "-s", check=False).returncode == 0, 20)
            pacemakerd = subprocess.Popen(["pacemakerd"], stdout=out, stderr=out, env=env)
            try:
                _until(lambda: "Current DC: node1" in run("crm_mon", "-1", check=False).stdout, 60)
                yield
            finally:
                run("pacemakerd", "--shutdown", check=False)
                _stop(pacemakerd, 60)
        finally:
            _stop(corosync, 20)
            _reset_cib(None)
            for blackbox in Path("/dev/shm").glob(f"qb-corosync-{corosync.pid}-blackbox-*"):
                blackbox.unlink()  # libqb's flight recorder of that corosync: 8 MiB a run


def _reset_cib(document: str | None) -> None:
    for stale in CIB_DIR.glob("cib*"):
        stale.unlink()
    if document is not None:
        cib = CIB_DIR / "cib.xml"
        cib.write_text(document)
        shutil.chown(cib, "hacluster", "haclient")
        cib.chmod(0o600)


def _stop(process: subprocess.Popen[bytes], timeout: float) -> None:
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    if process.poll() is None:
        process.kill()
        process.wait()


def _until(condition: Callable[[], bool], timeout: float, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"not within {timeout} s: {what}"
        time.sleep(0.2)


def roles() -> dict[str, str]:
    """Resource id -> its role on the cluster node ("Promoted", "Unpromoted", "Started",
    "Stopped")."""
    document = ET.fromstring(run("crm_mon", "-1", "--output-as=xml").stdout)
    found = {}
    for resource in document.iter("resource"):
        found[resource.get("id", "")] = resource.get("role", "")
    return found


def promotion_score(resource: str) -> str | None:
    done = run("crm_attribute", "-N", NODE, "-n", f"master-{resource}", "-l", "reboot", "-G",
               "-q", check=False)  # fmt: skip
    return done.stdout.strip() if done.returncode == 0 else None


@pytest.mark.serial  # one Pacemaker per machine: never beside another test
def test_pacemaker_promotes_the_uptodate_copy_and_never_the_stale_one(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    install()
    alpha_port, beta_port = free_tcp_port(), free_tcp_port()
    volumes = [VolumeSpec("data1", "16MiB"), VolumeSpec("data2", "64MiB")]
    beta = start_node("beta", volumes, peer_port=beta_port, peers={"alpha": alpha_port})
    alpha: LocalNode = start_node("alpha", volumes, peer_port=alpha_port,
                                  peers={"beta": beta_port})  # fmt: skip
    with alpha.api() as api:
        for job, source, throttle in (("web", "data1", None), ("stale", "data2", "1MiB")):
            body = {"name": job, "source": f"alpha:{source}", "target": f"beta:{source}",
                    "confirm": True, "throttle": throttle}  # fmt: skip
            assert api.post("/jobs", json=body).status_code == 201
    wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    control = f"unix:{beta.control_socket}"
    with pacemaker(tmp_path):
        resources = clone("web", "web", control, "Unpromoted") + clone(
            "stale", "stale", control, "Promoted"
        )
        run("cibadmin", "--create", "-o", "resources", "--xml-text",
            f"<resources>{resources}{APP}</resources>")  # fmt: skip
        run("cibadmin", "--replace", "-o", "constraints", "--xml-text", CONSTRAINTS)
        _until(lambda: roles().get("web") == "Unpromoted", 60, f"web started: {roles()}")
        _until(lambda: promotion_score("web") == "1000", 30, "web's promotion score")

        # the stale copy asks to be promoted, has no score, and stays a target
        _until(lambda: roles().get("stale") == "Unpromoted", 30, f"stale started: {roles()}")
        time.sleep(8)  # several monitors of both and cluster rechecks
        assert promotion_score("stale") is None
        assert roles().get("stale") == "Unpromoted" and volume(beta, "data2")["role"] == "target"

        # the source dies; the UpToDate copy is promoted, the application follows
        alpha.kill()
        run("crm_resource", "-r", "web-clone", "--meta", "-p", "target-role", "-v", "Promoted")
        _until(lambda: roles().get("web") == "Promoted", 60, f"web promoted: {roles()}")
        _until(lambda: roles().get("app") == "Started", 30, f"app started: {roles()}")
        assert volume(beta)["role"] == "source"
        writer = AckedWriter([beta.nbd_socket], blocks=1024)
        writer.start()
        writer.wait_writes(200)
        writer.finish()

        alpha.start()  # the old source returns, finds beta is the source, becomes its target
        _until(lambda: volume(alpha)["role"] == "target", 30, "alpha a target")
        wait_mirror(beta, "web", "alpha:data1", "Mirroring")
        assert roles().get("web") == "Promoted"
        print(f"live cluster: {roles()}")
    writer.check(beta.volume_path(volumes[0]))


def _node_state(number: int, score: int | None, online: bool) -> str:
    """A node of the two-node CIB: the agent's instance running there, unpromoted, with the
    promotion score its monitor would have set (None: deleted, never promote)."""
    attribute = "" if score is None else (
        f'<nvpair id="status-{number}-master-vk" name="master-vk" value="{score}"/>'
    )  # fmt: skip
    key = f"1:1:0:00000000-0000-0000-0000-00000000000{number}"
    running = (
        f'<lrm id="{number}"><lrm_resources>'
        '<lrm_resource id="vk" class="ocf" provider="volkeeper" type="job">'
        f'<lrm_rsc_op id="vk_last_0" operation_key="vk_start_0" operation="start" '
        f'crm-debug-origin="test" crm_feature_set="3.16.1" transition-key="{key}" '
        f'transition-magic="0:0;{key}" call-id="2" rc-code="0" op-status="0" interval="0" '
        'last-rc-change="1" exec-time="10" queue-time="0" op-digest="0"/>'
        "</lrm_resource></lrm_resources></lrm>"
    )  # fmt: skip
    up = "member" if online else "down"
    return (
        f'<node_state id="{number}" uname="node{number}" in_ccm="{str(online).lower()}" '
        f'crmd="{"online" if online else "offline"}" join="{up}" expected="{up}">'
        f'<transient_attributes id="{number}"><instance_attributes id="status-{number}">'
        f"{attribute}</instance_attributes></transient_attributes>{running if online else ''}"
        "</node_state>"
    )  # fmt: skip


def two_node_cib(node1: tuple[int | None, bool], node2: tuple[int | None, bool]) -> str:
    resources = clone("vk", "web", "unix:/run/volkeeper/node.sock", "Promoted").replace(
        '"vk-clone-max" name="clone-max" value="1"', '"vk-clone-max" name="clone-max" value="2"'
    )
    return f"""<cib validate-with="pacemaker-3.9" epoch="1" num_updates="0" admin_epoch="0"
     crm_feature_set="3.16.1" have-quorum="1">
  <configuration>
    <crm_config><cluster_property_set id="options">
      <nvpair id="options-stonith" name="stonith-enabled" value="false"/>
      <nvpair id="options-quorum" name="no-quorum-policy" value="ignore"/>
    </cluster_property_set></crm_config>
    <nodes><node id="1" uname="node1"/><node id="2" uname="node2"/></nodes>
    <resources>{resources}</resources>
    <constraints/>
  </configuration>
  <status>{_node_state(1, *node1)}{_node_state(2, *node2)}</status>
</cib>"""


def promoted_by_simulation(cib: str, directory: Path) -> str:
    path = directory / "cib.xml"
    path.write_text(cib)
    output = run("crm_simulate", "-x", str(path), "-S").stdout
    revised = output.partition("Revised Cluster Status:")[2]
    lines = revised.splitlines()
    line = next((s for s in lines if "Promoted: [" in s and "Unpromoted" not in s), "")
    return line.partition("[")[2].partition("]")[0].strip()


@pytest.mark.parametrize(
    ("node1", "node2", "promoted"),
    [
        ((1000, True), (None, True), "node1"),  # UpToDate and connected; the other stale
        ((None, True), (100, True), "node2"),  # the stale one never, even when it is first
        ((1000, True), (10, True), "node1"),  # UpToDate before Consistent (async)
        ((None, False), (10, True), "node2"),  # the source's node gone: the Consistent copy
        ((None, False), (None, True), ""),  # the source's node gone, the copy stale: nobody
    ],
)
def test_crm_simulate_promotes_by_the_agents_scores_on_two_nodes(
    node1: tuple[int | None, bool], node2: tuple[int | None, bool], promoted: str, tmp_path: Path
) -> None:
    need("crm_simulate")
    assert promoted_by_simulation(two_node_cib(node1, node2), tmp_path) == promoted


@pytest.mark.serial  # one Pacemaker per machine: never beside another test
def test_a_two_node_cluster_switches_over_and_fails_over(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    """Two cluster nodes, each in its own namespaces (tests/ocf/cluster.py), each running
    the agent for its own volkeeper node.  nodeA's cluster stack stops: Pacemaker demotes
    alpha and promotes beta -- a switchover, nothing resent -- and the application moves;
    nodeA returns as the target.  Then beta's daemon is killed: Pacemaker promotes alpha --
    a failover -- and beta, restarted, becomes its target."""
    need("corosync", "pacemakerd", "crm_mon", "nsenter", "unshare")
    install()
    alpha_port, beta_port = free_tcp_port(), free_tcp_port()
    beta = start_node("beta", [VolumeSpec("data1", "16MiB")], peer_port=beta_port,
                      peers={"alpha": alpha_port})  # fmt: skip
    alpha = start_node("alpha", [VolumeSpec("data1", "16MiB")], peer_port=alpha_port,
                       peers={"beta": beta_port})  # fmt: skip
    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "confirm": True}
    with alpha.api() as api:
        assert api.post("/jobs", json=body).status_code == 201
    wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    resources = clone("web", "web", "", "Promoted").replace(
        '"web-clone-max" name="clone-max" value="1"', '"web-clone-max" name="clone-max" value="2"'
    )
    config = '<nvpair id="web-config" name="config" value="/etc/volkeeper/node.toml"/>'
    resources = resources.replace('<nvpair id="web-control" name="control" value=""/>', config)
    cib = CIB.format(resources=resources, app=APP, constraints=CONSTRAINTS)
    with TwoNodeCluster(tmp_path / "cluster", cib, os.getpid() % 200) as cluster:
        cluster.config("nodeA", alpha.config_path)
        cluster.config("nodeB", beta.config_path)
        cluster.start()

        def placed(web: dict[str, str], app: str) -> Callable[[], bool]:
            return lambda: cluster.roles("web") == web and app in cluster.roles("app")

        both = {"nodeA": "Promoted", "nodeB": "Unpromoted"}
        cluster.until(placed(both, "nodeA"), 90, "alpha found promoted, app on nodeA")

        cluster.nodes["nodeA"].stop()  # its resources go first: demoted, then stopped
        cluster.until(placed({"nodeB": "Promoted"}, "nodeB"), 90, "beta promoted")
        assert volume(beta)["role"] == "source" and volume(alpha)["role"] == "target"
        writer = AckedWriter([beta.nbd_socket, alpha.nbd_socket], blocks=1024)
        writer.start()
        writer.wait_writes(200)
        cluster.start("nodeA")
        back = {"nodeA": "Unpromoted", "nodeB": "Promoted"}
        cluster.until(placed(back, "nodeB"), 90, "nodeA back, unpromoted")
        switched = wait_mirror(beta, "web", "alpha:data1", "Mirroring")
        assert switched["resync_sent_bytes"] == 0  # a switchover: nothing resent

        beta.kill()  # the source's daemon dies: Pacemaker fails over to nodeA
        cluster.until(placed({"nodeA": "Promoted"}, "nodeA"), 90, "alpha promoted")
        assert volume(alpha)["role"] == "source"
        writer.wait_writes(writer.writes + 200)  # the client moved to alpha
        writer.finish()
        beta.start()
        cluster.until(lambda: volume(beta)["role"] == "target", 30, "beta a target")
        cluster.any_node().run("crm_resource", "--cleanup", "-r", "web-clone")
        cluster.until(placed(both, "nodeA"), 90, "nodeB back, unpromoted")
        wait_mirror(alpha, "web", "beta:data1", "Mirroring")
    stop_in_order(alpha, beta)
    assert_identical(path(alpha), path(beta))
    writer.check(path(alpha))
