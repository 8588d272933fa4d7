"""The node daemon as an administrator sees it: signals, bad configs, the CLI, the control API,
a control API that is gone, block devices and a full disk.

Everything runs a real ``volkeeper daemon`` subprocess and real clients.  Daemons are stopped
by PID (the ``start_node`` fixture, or this module's own ``cli_node``), and every other process
a test starts is stopped by PID in a ``finally``.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import NodeFactory, need
from volkeeper_lab.launcher import LocalNode, VolumeSpec, free_tcp_port

MiB = 1 << 20
VOLKEEPER = [sys.executable, "-m", "volkeeper"]


# -- helpers ---------------------------------------------------------------------------------


def run(
    *argv: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def ok(*argv: str, timeout: float = 60) -> str:
    done = run(*argv, timeout=timeout)
    assert done.returncode == 0, f"{argv[0]} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """The ``volkeeper`` command, with a wide terminal and no inherited VOLKEEPER_NODE."""
    environment = {k: v for k, v in os.environ.items() if k != "VOLKEEPER_NODE"}
    environment.update(COLUMNS="200", **env)
    return run(*VOLKEEPER, *args, env=environment, timeout=30)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a client this test started, by its PID."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def metrics(node: LocalNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with node.api() as api:
        response = api.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): float(s.value)
        for family in text_string_to_metric_families(response.text)
        for s in family.samples
    }


def sample(
    values: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float:
    return values[(name, tuple(sorted(labels.items())))]


def connects(address: str | tuple[str, int]) -> bool:
    family = socket.AF_UNIX if isinstance(address, str) else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(1)
        try:
            sock.connect(address)
        except OSError:
            return False
        return True


@pytest.fixture(scope="module")
def libnbd_python() -> str:
    """nbdsh runs ``python3 -m nbd`` from PATH: a python3 that has libnbd's module."""
    need("nbdsh")
    for python in ("python3", "/usr/bin/python3", "/usr/local/bin/python3"):
        if run(python, "-c", "import nbd").returncode == 0:
            return python
    pytest.skip("nbdsh is installed but no python3 on this host imports libnbd's nbd module")


def nbdsh_argv(libnbd_python: str, script: str) -> tuple[list[str], dict[str, str]]:
    directory = os.path.dirname(libnbd_python)
    path = f"{directory}:{os.environ['PATH']}" if directory else os.environ["PATH"]
    return ["nbdsh", "-c", script], {**os.environ, "PATH": path}


# -- SIGTERM under load ----------------------------------------------------------------------

ACKED_WRITER = """
import struct, sys
h.connect_uri(URI)
blocks = REGION // 4096
r = 0
while True:
    r += 1
    for i in range(blocks):
        h.pwrite(struct.pack("<QQ", r, i) * 256, i * 4096)
        sys.stdout.write(f"{r} {i}\\n")
        sys.stdout.flush()
"""


def test_sigterm_under_fio_load_exits_zero_and_keeps_acknowledged_data(
    start_node: NodeFactory, tmp_path: Path, libnbd_python: str
) -> None:
    need("fio", "nbdcopy")
    volumes = [
        VolumeSpec("load", "64MiB"),
        VolumeSpec("data1", "16MiB"),
        VolumeSpec("data2", "16MiB"),
    ]
    node = start_node(volumes=volumes)
    data1 = node.volume_path(volumes[1])
    # a known pattern, acknowledged long before the stop
    pattern = random_file(tmp_path / "pattern.bin", 16 * MiB)
    ok("nbdcopy", str(pattern), node.uri("data2"))

    clients: list[subprocess.Popen[bytes]] = []
    fio_out = (tmp_path / "fio.out").open("wb")
    try:
        clients.append(
            subprocess.Popen(
                ["fio", "--name=load", "--ioengine=nbd", f"--uri={node.uri('load')}",
                 "--rw=randwrite", "--bs=4k", "--iodepth=64",
                 "--time_based", "--runtime=60"],
                stdout=fio_out, stderr=subprocess.STDOUT, cwd=tmp_path,
            )
        )  # fmt: skip
        script = ACKED_WRITER.replace("URI", repr(node.uri("data1"))).replace(
            "REGION", str(16 * MiB)
        )
        argv, env = nbdsh_argv(libnbd_python, script)
        acks_path = tmp_path / "acks.txt"
        with acks_path.open("wb") as acks_out:
            clients.append(
                subprocess.Popen(argv, stdout=acks_out, stderr=subprocess.DEVNULL, env=env)
            )
        # wait until both clients are really writing, fio with 64 requests in flight
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            with node.api() as api:
                written = {v["name"]: v["written_bytes"] for v in api.get("/volumes").json()}
            if written["load"] > 8 * MiB and acks_path.stat().st_size > 2000:
                break
            assert all(c.poll() is None for c in clients), (tmp_path / "fio.out").read_text()
            time.sleep(0.1)
        else:
            pytest.fail("fio and the acked writer did not get going")

        assert node.process is not None
        started = time.monotonic()
        node.process.send_signal(signal.SIGTERM)
        code = node.process.wait(10)
        elapsed = time.monotonic() - started
        for client in clients:
            client.wait(10)  # both lose their connection and end on their own
    finally:
        for client in clients:
            stop_process(client)
        fio_out.close()

    assert code == 0, node.log_text()
    assert elapsed < 5, f"SIGTERM took {elapsed:.1f}s"
    assert "node stopped" in node.log_text()
    # data acknowledged before the stop is in the files
    assert sha256(node.volume_path(volumes[2]).read_bytes()) == sha256(pattern.read_bytes())
    lines = acks_path.read_text().splitlines()
    assert len(lines) > 100
    acked = [tuple(map(int, line.split())) for line in lines]
    last = {i: r for r, i in acked}  # the last acknowledged round of every block
    blocks = 16 * MiB // 4096
    r_end, i_end = acked[-1]
    # the one write the writer may have had on the wire, unacknowledged, at the stop
    in_flight = (r_end, i_end + 1) if i_end + 1 < blocks else (r_end + 1, 0)
    content = data1.read_bytes()
    for i, r in last.items():
        block = content[i * 4096 : (i + 1) * 4096]
        if block == stamp(r, i):
            continue
        assert (in_flight[1], block) == (i, stamp(*in_flight)), (
            f"acknowledged write of block {i} (round {r}) is not in the file"
        )


def stamp(r: int, i: int) -> bytes:
    return struct.pack("<QQ", r, i) * 256


# -- bad configs -----------------------------------------------------------------------------


def config_text(tmp_path: Path, nbd_port: int, **override: str) -> str:
    fields = {
        "node_extra": "",
        "sector_size": "512",
        "size": 'size = "8MiB"',
    }
    fields.update(override)
    return f"""
[node]
name = "alpha"
state_dir = "{tmp_path / "state"}"
listen = "127.0.0.1:{free_tcp_port()}"
control = "unix:{tmp_path / "control.sock"}"
nbd = "127.0.0.1:{nbd_port}"
{fields["node_extra"]}

[[volume]]
name = "data1"
path = "{tmp_path / "missing" / "data1.img"}"
sector_size = {fields["sector_size"]}
{fields["size"]}
"""


@pytest.mark.parametrize(
    ("override", "exit_code", "words"),
    [
        pytest.param(
            {"node_extra": 'lisen = "127.0.0.1:1"'}, 2, ["unknown key", "node.lisen"],
            id="unknown-key",
        ),
        pytest.param(
            {"sector_size": "1000"}, 2, ["volume[0].sector_size", "1000"], id="bad-sector-size"
        ),
        # found only when the daemon opens the volume, so not a ConfigError: any non-zero status
        pytest.param(
            {"size": ""}, None, ["data1", "data1.img", "does not exist", "size"],
            id="missing-file-without-size",
        ),
    ],
)  # fmt: skip
def test_bad_config_exits_nonzero_with_one_line_and_listens_nowhere(
    tmp_path: Path, override: dict[str, str], exit_code: int | None, words: list[str]
) -> None:
    nbd_port = free_tcp_port()
    config = tmp_path / "alpha.toml"
    config.write_text(config_text(tmp_path, nbd_port, **override))
    done = run(*VOLKEEPER, "daemon", "--config", str(config), timeout=30)
    assert done.returncode != 0
    if exit_code is not None:
        assert done.returncode == exit_code, done.stderr
    reasons = [line for line in done.stderr.splitlines() if line.startswith("volkeeper: ")]
    assert len(reasons) == 1, done.stderr
    assert "Traceback" not in done.stderr
    for word in words:
        assert word in reasons[0], (word, reasons[0])
    # nothing listens, nothing was created
    assert not connects(("127.0.0.1", nbd_port))
    assert not (tmp_path / "control.sock").exists()
    assert not (tmp_path / "missing" / "data1.img").exists()


def test_config_error_exit_status_is_two_for_missing_config_file(tmp_path: Path) -> None:
    done = run(*VOLKEEPER, "daemon", "--config", str(tmp_path / "nope.toml"), timeout=30)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert "nope.toml" in done.stderr and "does not exist" in done.stderr


def test_nbd_address_in_use_is_a_one_line_error(tmp_path: Path) -> None:
    """Another program holds the NBD port: the daemon must say so in one line, no traceback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        config = tmp_path / "alpha.toml"
        config.write_text(config_text(tmp_path, port))
        done = run(*VOLKEEPER, "daemon", "--config", str(config), timeout=30)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and "╭" not in done.stderr, done.stderr
    reasons = [line for line in done.stderr.splitlines() if line.startswith("volkeeper: ")]
    assert len(reasons) == 1, done.stderr
    assert str(port) in reasons[0] and "in use" in reasons[0], reasons[0]
    assert not (tmp_path / "control.sock").exists()


def test_second_daemon_with_the_same_config_does_not_hijack_the_node(
    start_node: NodeFactory,
) -> None:
    """A second ``volkeeper daemon`` on the same config must refuse to start (its sockets are
    taken), not unlink the running node's sockets and serve the same volume file beside it."""
    need("nbdinfo")
    node = start_node(volumes=[VolumeSpec("data1", "8MiB")])
    second = subprocess.Popen(
        [*VOLKEEPER, "daemon", "--config", str(node.config_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    try:
        try:
            code: int | None = second.wait(6)
        except subprocess.TimeoutExpired:
            code = None
    finally:
        stop_process(second)
        assert second.stderr is not None
        stderr = second.stderr.read().decode()
        second.stderr.close()
    assert code is not None, "the second daemon kept running on the first node's sockets"
    assert code != 0
    # the first node is still the one serving, on its own sockets
    assert connects(str(node.control_socket)), "the running node lost its control socket"
    assert connects(str(node.nbd_socket)), "the running node lost its NBD socket"
    assert node.status()["node"] == "alpha"
    assert ok("nbdinfo", "--size", node.uri()).strip() == str(8 * MiB)
    reasons = [line for line in stderr.splitlines() if line.startswith("volkeeper: ")]
    assert len(reasons) == 1 and "in use" in reasons[0], stderr


# -- CLI and control API on one two-volume node ----------------------------------------------


@pytest.fixture(scope="module")
def cli_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    """A node with a 512- and a 4096-byte-sector volume, shared by the read-mostly tests."""
    volumes = [VolumeSpec("data1", "16MiB", 512), VolumeSpec("data2", "16MiB", 4096)]
    node = LocalNode(tmp_path_factory.mktemp("cli") / "alpha", "alpha", volumes)
    try:
        node.start()
    except BaseException:
        node.stop()
        raise
    yield node
    code = node.stop()
    assert code == 0, f"daemon exit status on SIGTERM: {code}\n{node.log_text()}"


def check_status_document(document: dict[str, object]) -> None:
    assert document["node"] == "alpha"
    assert document["mirrors"] == []
    volumes = document["volumes"]
    assert isinstance(volumes, list)
    assert [(v["name"], v["size"], v["sector_size"], v["role"]) for v in volumes] == [
        ("data1", 16 * MiB, 512, "standalone"),
        ("data2", 16 * MiB, 4096, "standalone"),
    ]


@pytest.mark.parametrize("how", ["--node", "--config", "VOLKEEPER_NODE"])
def test_cli_status_and_volume_list_json(cli_node: LocalNode, how: str) -> None:
    address = f"unix:{cli_node.control_socket}"
    args: tuple[str, ...] = ()
    env: dict[str, str] = {}
    if how == "--node":
        args = ("--node", address)
    elif how == "--config":
        args = ("--config", str(cli_node.config_path))
    else:
        env = {"VOLKEEPER_NODE": address}
    status = cli("status", "--json", *args, **env)
    assert status.returncode == 0, status.stderr
    check_status_document(json.loads(status.stdout))
    listing = cli("volume", "list", "--json", *args, **env)
    assert listing.returncode == 0, listing.stderr
    volumes = json.loads(listing.stdout)
    assert [(v["name"], v["sector_size"], v["role"]) for v in volumes] == [
        ("data1", 512, "standalone"),
        ("data2", 4096, "standalone"),
    ]
    assert all(v["size"] == 16 * MiB for v in volumes)


def test_cli_rich_output_names_the_volumes(cli_node: LocalNode) -> None:
    node = ("--node", f"unix:{cli_node.control_socket}")
    status = cli("status", *node)
    assert status.returncode == 0, status.stderr
    assert "alpha" in status.stdout and "data1" in status.stdout and "data2" in status.stdout
    assert "{" not in status.stdout  # a table, not JSON
    listing = cli("volume", "list", *node)
    assert listing.returncode == 0, listing.stderr
    assert "data1" in listing.stdout and "data2" in listing.stdout and "4096" in listing.stdout


@pytest.mark.parametrize("where", ["unix", "tcp", "none"])
def test_cli_unreachable_node_exits_one_with_one_line(tmp_path: Path, where: str) -> None:
    args = {
        "unix": ("--node", f"unix:{tmp_path / 'nobody.sock'}"),
        "tcp": ("--node", f"127.0.0.1:{free_tcp_port()}#sha256:{'0' * 64}"),
        "none": (),
    }[where]
    done = cli("status", "--json", *args)
    assert done.returncode == 1, (done.returncode, done.stderr)
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("volkeeper: ")
    if where != "none":
        assert "cannot reach the node" in lines[0]


def test_control_api_status_volumes_openapi_and_errors(cli_node: LocalNode) -> None:
    with cli_node.api() as api:
        status = api.get("/status")
        volumes = api.get("/volumes")
        spec = api.get("/openapi.json")
        missing = api.get("/no/such/thing")
        wrong_method = api.post("/status")
    assert status.status_code == 200
    check_status_document(status.json())
    assert volumes.status_code == 200
    assert [v["name"] for v in volumes.json()] == ["data1", "data2"]
    assert spec.status_code == 200
    document = json.loads(spec.text)
    assert document["openapi"].startswith("3.")
    assert {"/status", "/volumes", "/metrics"} <= set(document["paths"])
    answers = document["paths"]["/status"]["get"]["responses"]
    assert answers["200"]["content"]["application/json"]["schema"]["$ref"].endswith("/Status")
    assert answers["409"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert {"Status", "MirrorView", "JobView", "VolumeView", "ErrorBody"} <= set(
        document["components"]["schemas"]
    )
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert error["code"] == "not_found" and error["message"]
    assert wrong_method.status_code == 405
    assert "code" in wrong_method.json()["error"]


def test_metrics_count_writes_and_time_requests(cli_node: LocalNode, tmp_path: Path) -> None:
    need("nbdcopy")
    before = metrics(cli_node)
    ok("nbdcopy", str(random_file(tmp_path / "w.bin", 4 * MiB)), cli_node.uri("data1"))
    after = metrics(cli_node)
    written = "volkeeper_volume_written_bytes_total"
    delta = sample(after, written, volume="data1") - sample(before, written, volume="data1")
    assert delta >= 4 * MiB
    assert sample(after, written, volume="data2") == sample(before, written, volume="data2")
    assert sample(after, "volkeeper_volume_size_bytes", volume="data2") == 16 * MiB
    # a real histogram: cumulative buckets ending in +Inf, _count and _sum
    hist = "volkeeper_volume_request_duration_seconds"
    count = sample(after, f"{hist}_count", volume="data1", op="write")
    assert count > sample(before, f"{hist}_count", volume="data1", op="write")
    assert sample(after, f"{hist}_bucket", volume="data1", op="write", le="+Inf") == count
    assert sample(after, f"{hist}_sum", volume="data1", op="write") > 0
    buckets = sorted(
        (float(dict(labels)["le"]), value)
        for (name, labels), value in after.items()
        if name == f"{hist}_bucket" and ("op", "write") in labels and ("volume", "data1") in labels
    )
    assert len(buckets) > 3
    assert [v for _, v in buckets] == sorted(v for _, v in buckets)  # cumulative


def test_two_sector_sizes_both_serve(cli_node: LocalNode, tmp_path: Path) -> None:
    need("nbdcopy")
    for volume in cli_node.volumes:
        source = random_file(tmp_path / f"{volume.name}.in", 16 * MiB)
        ok("nbdcopy", str(source), cli_node.uri(volume.name))
        back = tmp_path / f"{volume.name}.back"
        ok("nbdcopy", cli_node.uri(volume.name), str(back))
        assert sha256(back.read_bytes()) == sha256(source.read_bytes()), volume.name
        on_disk = cli_node.volume_path(volume).read_bytes()
        assert sha256(on_disk) == sha256(source.read_bytes()), volume.name


# -- the data path outlives the control API --------------------------------------------------


def test_nbd_keeps_serving_when_the_control_socket_is_gone(
    start_node: NodeFactory, tmp_path: Path
) -> None:
    need("nbdcopy")
    node = start_node(volumes=[VolumeSpec("data1", "8MiB")])
    os.unlink(node.control_socket)
    with pytest.raises(httpx.HTTPError), node.api() as api:
        api.get("/status")
    source = random_file(tmp_path / "in.bin", 8 * MiB)
    ok("nbdcopy", str(source), node.uri())
    back = tmp_path / "back.bin"
    ok("nbdcopy", node.uri(), str(back))
    assert back.read_bytes() == source.read_bytes()
    assert node.process is not None and node.process.poll() is None
    # and it still stops cleanly (the fixture asserts exit 0 on SIGTERM)


# -- a block device --------------------------------------------------------------------------


def need_root(tool: str) -> None:
    if os.geteuid() != 0:
        pytest.skip(f"{tool} needs root")
    need(tool)


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    need_root("losetup")
    backing = tmp_path / "loop-backing.img"
    with backing.open("wb") as f:
        f.truncate(16 * MiB)
    attach = run("losetup", "--find", "--show", str(backing))
    if attach.returncode != 0:
        pytest.skip(f"losetup cannot attach a loop device: {attach.stderr.strip()}")
    device = attach.stdout.strip()
    try:
        yield device, backing
    finally:
        run("losetup", "--detach", device)


def test_block_device_volume_round_trip(
    loop_device: tuple[str, Path], start_node: NodeFactory, tmp_path: Path
) -> None:
    # loop_device is requested first, so it is detached after the daemon has stopped
    need("nbdcopy")
    device, backing = loop_device
    node = start_node(volumes=[VolumeSpec("blk", "16MiB", path=Path(device))])
    with node.api() as api:
        (volume,) = api.get("/volumes").json()
    assert volume["kind"] == "block" and volume["path"] == device and volume["size"] == 16 * MiB
    source = random_file(tmp_path / "in.bin", 16 * MiB)
    ok("nbdcopy", str(source), node.uri("blk"))
    back = tmp_path / "back.bin"
    ok("nbdcopy", node.uri("blk"), str(back))
    assert back.read_bytes() == source.read_bytes()
    assert node.stop() == 0  # flushes the device at shutdown
    assert sha256(backing.read_bytes()) == sha256(source.read_bytes())


# -- a full backing store --------------------------------------------------------------------


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    need_root("mount")
    mountpoint = tmp_path / "tmpfs"
    mountpoint.mkdir()
    mounted = run("mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mountpoint))
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield mountpoint
    finally:
        run("umount", "--lazy", str(mountpoint))


def test_full_backing_store_gives_enospc_and_the_daemon_survives(
    tiny_tmpfs: Path, start_node: NodeFactory, tmp_path: Path
) -> None:
    need("nbdcopy")
    path = tiny_tmpfs / "full.img"
    node = start_node(volumes=[VolumeSpec("full", "8MiB", path=path)])
    assert path.stat().st_blocks == 0  # sparse: the 8 MiB volume fits until written
    attempt = run("nbdcopy", str(random_file(tmp_path / "big.bin", 4 * MiB)), node.uri("full"))
    assert attempt.returncode != 0
    assert "No space left on device" in attempt.stderr, attempt.stderr  # ENOSPC reached it
    # the daemon keeps running and serves reads; what it serves is what the file holds
    assert node.process is not None and node.process.poll() is None
    back = tmp_path / "back.bin"
    ok("nbdcopy", node.uri("full"), str(back))
    assert back.read_bytes()[: 2 * MiB] == path.read_bytes()[: 2 * MiB]
    log = node.log_text()
    assert "No space" in log or "ENOSPC" in log, log
    values = metrics(node)
    assert sample(values, "volkeeper_volume_request_errors_total", volume="full", op="write") > 0
    # and it still stops cleanly (the fixture asserts exit 0 on SIGTERM)


def test_a_field_the_api_does_not_know_is_refused_by_name(cli_node: LocalNode) -> None:
    """A misspelt setting must not create a mirror without it, nor a setting that cannot
    change on a live mirror be dropped in silence."""
    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "confirm": True}
    with cli_node.api() as api:
        typo = api.post("/jobs", json={**body, "compresion": "zstd:3"})
        fixed = api.patch("/jobs/web/mirror", json={"region_size": "64KiB"})
        jobs = api.get("/jobs").json()
    for answer, field in ((typo, "compresion"), (fixed, "region_size")):
        assert answer.status_code == 422, answer.text
        error = answer.json()["error"]
        assert error["code"] == "bad_request" and f"body.{field}" in error["message"], error
    assert jobs == []
