"""Interoperability with real NBD clients: nbdinfo, nbdcopy, qemu-img, fio and nbdsh.

Every test drives a real ``volkeeper daemon`` with the stock client, once over the unix socket
and once over TCP.  To keep the run short, the module starts one daemon per transport with one
volume per test (a test never touches another test's volume), and stops it by PID at the end,
requiring exit status 0.  Data is checked three ways: what the writing client reads back, what
another client reads back, and what the backing file on disk holds.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import NodeFactory, need
from volkeeper_lab.launcher import LocalNode, VolumeSpec

MiB = 1 << 20
TRANSPORTS = ["unix", "tcp"]

# One volume per test; "ro" (read-only, over a prepared file) is added by the fixture.
VOLUMES = [
    VolumeSpec("data1", "24MiB", sector_size=512),
    VolumeSpec("data4k", "24MiB", sector_size=4096),
    VolumeSpec("copy", "16MiB"),
    VolumeSpec("qemu", "8MiB"),
    VolumeSpec("fio", "64MiB"),
    VolumeSpec("flush", "16MiB"),
    VolumeSpec("zero512", "4MiB", sector_size=512),
    VolumeSpec("zero4k", "4MiB", sector_size=4096),
]


# -- helpers ---------------------------------------------------------------------------------


def run(
    *argv: str, timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a client to completion (subprocess.run kills it on timeout)."""
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, cwd=cwd, check=False
    )


def ok(*argv: str, timeout: float = 60, cwd: Path | None = None) -> str:
    done = run(*argv, timeout=timeout, cwd=cwd)
    assert done.returncode == 0, f"{argv[0]} failed ({done.returncode}):\n{done.stderr}"
    return done.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def random_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def spec(node: LocalNode, name: str) -> VolumeSpec:
    return next(v for v in node.volumes if v.name == name)


@functools.cache
def _python_with_libnbd() -> str | None:
    """nbdsh runs ``python3 -m nbd`` from PATH: find a python3 that has libnbd's module."""
    for python in (shutil.which("python3"), "/usr/bin/python3", "/usr/local/bin/python3"):
        if python and run(python, "-c", "import nbd").returncode == 0:
            return python
    return None


def nbdsh(script: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a Python script inside nbdsh (libnbd's own bindings); ``h`` is a fresh handle."""
    need("nbdsh")
    python = _python_with_libnbd()
    if python is None:
        pytest.skip("nbdsh is installed but no python3 on this host imports libnbd's nbd module")
    env = {**os.environ, "PATH": f"{os.path.dirname(python)}:{os.environ.get('PATH', '')}"}
    return subprocess.run(
        ["nbdsh", "-c", script],
        capture_output=True, text=True, timeout=timeout, env=env, check=False,
    )  # fmt: skip


def metric(node: LocalNode, name: str, **labels: str) -> float:
    """One sample of the node's /metrics, parsed with prometheus_client's own parser."""
    with node.api() as api:
        response = api.get("/metrics")
    assert response.status_code == 200
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    raise AssertionError(f"no sample {name}{labels} in /metrics:\n{response.text}")


@pytest.fixture(scope="module", params=TRANSPORTS)
def node(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNode]:
    """One daemon per transport, serving every volume of this module's tests."""
    directory = tmp_path_factory.mktemp(f"clients-{request.param}")
    golden = random_file(directory / "golden.img", 4 * MiB)
    read_only = VolumeSpec("ro", "4MiB", path=golden, read_only=True)
    daemon = LocalNode(
        directory / "alpha", "alpha", [*VOLUMES, read_only], nbd_tcp=request.param == "tcp"
    )
    try:
        daemon.start()
    except BaseException:
        daemon.stop()
        raise
    yield daemon
    code = daemon.stop()
    assert code == 0, f"daemon exit status on SIGTERM: {code}\n{daemon.log_text()}"


# -- nbdinfo ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("volume", "sector_size"), [("data1", 512), ("data4k", 4096)])
def test_nbdinfo_sees_size_flags_and_block_sizes(
    node: LocalNode, volume: str, sector_size: int
) -> None:
    need("nbdinfo")
    info = json.loads(ok("nbdinfo", "--json", node.uri(volume)))
    (export,) = info["exports"]
    assert info["protocol"] == "newstyle-fixed"
    assert export["export-name"] == volume
    assert export["export-size"] == 24 * MiB
    assert export["is_read_only"] is False
    for flag in ("can_flush", "can_fua", "can_trim", "can_zero", "can_multi_conn", "can_cache"):
        assert export[flag] is True, flag
    assert export["block_size_minimum"] == sector_size
    assert export["block_size_preferred"] == 4096
    assert export["block_size_maximum"] == 32 * MiB


def test_nbdinfo_list_shows_every_volume(node: LocalNode) -> None:
    need("nbdinfo")
    listing = json.loads(ok("nbdinfo", "--list", "--json", node.uri()))
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert sorted(exports) == sorted(v.name for v in node.volumes)
    for volume in node.volumes:
        export = exports[volume.name]
        assert export["export-size"] == int(str(volume.size).removesuffix("MiB")) * MiB
        assert export["block_size_minimum"] == volume.sector_size
        assert export["is_read_only"] is volume.read_only
    text = ok("nbdinfo", "--list", node.uri())  # the human-readable listing too
    assert all(f'export="{v.name}"' in text for v in node.volumes)


def test_two_volume_node_lists_both(start_node: NodeFactory) -> None:
    """The smallest multi-volume case, on a daemon of its own (unix socket)."""
    need("nbdinfo")
    two = start_node(volumes=[VolumeSpec("data1", "8MiB"), VolumeSpec("logs", "4MiB", 4096)])
    listing = json.loads(ok("nbdinfo", "--list", "--json", two.uri()))
    assert [(e["export-name"], e["export-size"]) for e in listing["exports"]] == [
        ("data1", 8 * MiB),
        ("logs", 4 * MiB),
    ]


def test_nbdinfo_unknown_export_is_refused(node: LocalNode) -> None:
    need("nbdinfo")
    done = run("nbdinfo", "--json", node.uri("nosuchvolume"))
    assert done.returncode != 0
    # the daemon is unharmed: a real export still answers
    assert json.loads(ok("nbdinfo", "--json", node.uri()))["exports"][0]["export-size"] > 0


# -- nbdcopy ---------------------------------------------------------------------------------


def test_nbdcopy_round_trip_matches_source_and_backing_file(
    node: LocalNode, tmp_path: Path
) -> None:
    need("nbdcopy")
    source = random_file(tmp_path / "in.bin", 16 * MiB)
    ok("nbdcopy", str(source), node.uri("copy"))
    back = tmp_path / "back.bin"
    ok("nbdcopy", node.uri("copy"), str(back))
    assert back.stat().st_size == 16 * MiB
    assert sha256(back) == sha256(source)
    assert sha256(node.volume_path(spec(node, "copy"))) == sha256(source)


# -- qemu-img --------------------------------------------------------------------------------


def make_qcow2(tmp_path: Path) -> Path:
    """An 8 MiB qcow2 with two written extents and unallocated space between them."""
    image = tmp_path / "img.qcow2"
    ok("qemu-img", "create", "-q", "-f", "qcow2", str(image), "8M")
    if shutil.which("qemu-io"):
        ok(
            "qemu-io", "-f", "qcow2",
            "-c", "write -P 0xab 0 1M",
            "-c", "write -P 0x5c 5M 512k",
            str(image),
        )  # fmt: skip
    else:
        raw = tmp_path / "img.raw"
        with raw.open("wb") as f:
            f.write(os.urandom(MiB))
            f.seek(5 * MiB)
            f.write(os.urandom(512 * 1024))
            f.truncate(8 * MiB)
        ok("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", str(raw), str(image))
    return image


def test_qemu_img_convert_onto_and_off_the_volume(node: LocalNode, tmp_path: Path) -> None:
    need("qemu-img", "nbdcopy")
    uri, path = node.uri("qemu"), node.volume_path(spec(node, "qemu"))
    # Junk everywhere first: convert -n must overwrite (or zero) every byte of the target,
    # including the qcow2's unallocated ranges, or the compares below fail.
    ok("nbdcopy", str(random_file(tmp_path / "junk.bin", 8 * MiB)), uri)
    image = make_qcow2(tmp_path)
    ok("qemu-img", "convert", "-q", "-n", "-f", "qcow2", "-O", "raw", str(image), uri)
    back = tmp_path / "back.qcow2"
    ok("qemu-img", "convert", "-q", "-f", "raw", "-O", "qcow2", uri, str(back))
    assert "identical" in ok("qemu-img", "compare", str(image), str(back))
    # and straight against the export and against the backing file
    ok("qemu-img", "compare", "-q", "-F", "raw", str(image), uri)
    expected = tmp_path / "expected.raw"
    ok("qemu-img", "convert", "-q", "-f", "qcow2", "-O", "raw", str(image), str(expected))
    data = path.read_bytes()
    assert data == expected.read_bytes()
    assert data[2 * MiB : 5 * MiB] == bytes(3 * MiB)  # junk gone where the image has no data
    assert data[:MiB] != bytes(MiB)  # and the image's data is there


# -- fio -------------------------------------------------------------------------------------


def fio(uri: str, cwd: Path, *job: str, timeout: float = 90) -> str:
    """Run one fio job through its nbd engine; fails the test on any error or bad verify.

    fio's nbd engine ignores --directory, so its verify state files land in ``cwd``.
    """
    need("fio")
    done = run(
        "fio", "--name=vk", "--ioengine=nbd", f"--uri={uri}", *job, cwd=cwd, timeout=timeout,
    )  # fmt: skip
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"fio failed ({done.returncode}):\n{output}"
    assert not re.search(r"verify.*(bad|fail|mismatch)", output, re.IGNORECASE), output
    assert not re.search(r"\berr=\s*[1-9]", output), output
    return output


def test_fio_verified_random_and_sequential_writes(node: LocalNode, tmp_path: Path) -> None:
    uri = node.uri("fio")
    before = metric(node, "volkeeper_volume_read_bytes_total", volume="fio")
    common = ("--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--size=24M")
    fio(uri, tmp_path, "--rw=randwrite", "--bs=4k", "--iodepth=32", *common)
    fio(uri, tmp_path, "--rw=write", "--bs=1M", "--iodepth=8", "--offset=32M", *common)
    # both jobs wrote their 24 MiB and then read all of it back to verify it
    assert metric(node, "volkeeper_volume_written_bytes_total", volume="fio") >= 48 * MiB
    assert metric(node, "volkeeper_volume_read_bytes_total", volume="fio") - before >= 48 * MiB
    # and fio's verify would have caught a block that landed in the wrong place: check the
    # sequential job's region on disk is not empty and differs block to block
    with node.volume_path(spec(node, "fio")).open("rb") as f:
        f.seek(32 * MiB)
        blocks = [f.read(4096) for _ in range(4)]
    assert all(any(b) for b in blocks) and len(set(blocks)) == 4


def test_fio_fsync_sends_flushes(node: LocalNode, tmp_path: Path) -> None:
    before = metric(node, "volkeeper_volume_flushes_total", volume="flush")
    fio(
        node.uri("flush"),
        tmp_path,
        "--rw=randwrite",
        "--bs=64k",
        "--iodepth=4",
        "--size=4M",
        "--fsync=1",
    )
    after = metric(node, "volkeeper_volume_flushes_total", volume="flush")
    # 64 writes of 64k with a flush after each
    assert after - before >= 64, (before, after)
    assert metric(node, "volkeeper_volume_request_errors_total", volume="flush", op="flush") == 0


# -- read-only volumes -----------------------------------------------------------------------


def test_read_only_volume_refuses_writes_and_serves_reads(node: LocalNode, tmp_path: Path) -> None:
    need("nbdinfo", "nbdcopy")
    uri, backing = node.uri("ro"), node.volume_path(spec(node, "ro"))
    digest = sha256(backing)
    (export,) = json.loads(ok("nbdinfo", "--json", uri))["exports"]
    assert export["is_read_only"] is True

    # nbdcopy refuses to write to it
    attempt = run("nbdcopy", str(random_file(tmp_path / "other.bin", 4 * MiB)), uri)
    assert attempt.returncode != 0

    # The server itself refuses too: with libnbd's client-side checks off, WRITE, TRIM and
    # WRITE_ZEROES really go on the wire and must come back EPERM.
    script = f"""
h.set_strict_mode(0)
h.connect_uri({uri!r})
for name, call in [
    ("write", lambda: h.pwrite(b"x" * 4096, 0)),
    ("fua write", lambda: h.pwrite(b"x" * 4096, 8192, nbd.CMD_FLAG_FUA)),
    ("trim", lambda: h.trim(4096, 0)),
    ("zero", lambda: h.zero(4096, 8192)),
]:
    try:
        call()
    except nbd.Error as exc:
        assert exc.errno == {errno.errorcode[errno.EPERM]!r}, (name, exc.errno, exc.string)
        assert "command failed" in exc.string, exc.string  # the server's reply, not libnbd's
    else:
        raise SystemExit(name + " on a read-only export succeeded")
h.flush()
assert h.pread(4096, 0) == open({str(backing)!r}, "rb").read(4096)
h.shutdown()
"""
    done = nbdsh(script)
    assert done.returncode == 0, done.stderr

    # reads work and the file is untouched
    back = tmp_path / "back.bin"
    ok("nbdcopy", uri, str(back))
    assert sha256(back) == digest
    assert sha256(backing) == digest


def test_refused_requests_count_as_request_errors(node: LocalNode) -> None:
    """A write the server refuses (EPERM on a read-only export) is a failed request to an
    administrator: ``volkeeper_volume_request_errors_total`` must count it."""
    before = metric(node, "volkeeper_volume_request_errors_total", volume="ro", op="write")
    script = f"""
h.set_strict_mode(0)
h.connect_uri({node.uri("ro")!r})
try:
    h.pwrite(b"x" * 4096, 0)
except nbd.Error:
    pass
else:
    raise SystemExit("write on a read-only export succeeded")
h.shutdown()
"""
    done = nbdsh(script)
    assert done.returncode == 0, done.stderr
    after = metric(node, "volkeeper_volume_request_errors_total", volume="ro", op="write")
    assert after - before == 1, "a refused WRITE is missing from request_errors_total"


# -- TRIM and WRITE_ZEROES -------------------------------------------------------------------


@pytest.mark.parametrize("volume", ["zero512", "zero4k"])
def test_trim_and_write_zeroes_read_back_as_zeros(
    node: LocalNode, volume: str, tmp_path: Path
) -> None:
    expected_file = tmp_path / "expected.bin"
    script = f"""
import os
h.connect_uri({node.uri(volume)!r})
size = h.get_size()
data = os.urandom(size)
h.pwrite(data, 0)
h.flush()
assert h.pread(size, 0) == data
h.trim(65536, 65536)                                    # [64k, 128k)
h.zero(131072, 262144)                                  # [256k, 384k), may punch
h.zero(65536, 1048576, nbd.CMD_FLAG_NO_HOLE)            # [1M, 1M+64k), must allocate
h.zero(8192, 3 * 1024 * 1024 - 4096, nbd.CMD_FLAG_FUA)  # [3M-4k, 3M+4k)
h.flush()
want = bytearray(data)
for offset, length in [(65536, 65536), (262144, 131072), (1048576, 65536),
                       (3 * 1024 * 1024 - 4096, 8192)]:
    want[offset:offset + length] = bytes(length)
got = h.pread(size, 0)
assert got == want, "zeroed ranges or their neighbours read back wrong"
h.shutdown()
open({str(expected_file)!r}, "wb").write(want)
"""
    before = metric(node, "volkeeper_volume_requests_total", volume=volume, op="zero")
    done = nbdsh(script)
    assert done.returncode == 0, done.stderr
    assert node.volume_path(spec(node, volume)).read_bytes() == expected_file.read_bytes()
    assert metric(node, "volkeeper_volume_requests_total", volume=volume, op="trim") >= 1
    assert metric(node, "volkeeper_volume_requests_total", volume=volume, op="zero") - before == 3
