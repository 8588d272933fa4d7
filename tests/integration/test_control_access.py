"""Who may use a node's control API, with real daemons, real sockets and a real other user.

On a unix socket (the default) access is the socket file's mode: 0600 for the daemon's user,
0660 for a ``[node] control_group``; another user (``nobody``, run as such) is refused by
the kernel.  On TCP the API is TLS with the node's certificate and wants a bearer token:
missing, unknown and revoked tokens are refused, a read token can change nothing, and the
CLI dials only the pinned certificate and sends the token only to it.
"""

from __future__ import annotations

import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import NodeFactory
from volkeeper_lab.launcher import LocalNode, VolumeSpec

NOBODY = 65534
CONNECT = "import socket, sys; socket.socket(socket.AF_UNIX).connect(sys.argv[1]); print('in')"
VOLKEEPER = [sys.executable, "-m", "volkeeper"]


@pytest.fixture
def open_dir() -> Iterator[Path]:
    """A directory every user may enter (pytest's own are 0700): the socket's mode decides."""
    directory = Path(tempfile.mkdtemp(prefix="vk-control-"))
    directory.chmod(0o755)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def as_nobody(socket_path: Path) -> subprocess.CompletedProcess[str]:
    """Connect as user nobody (Debian's own python3: the venv's is under root's home)."""
    if not Path("/usr/bin/python3").exists():
        pytest.skip("no /usr/bin/python3 for user nobody to run")
    return subprocess.run(
        ["/usr/bin/python3", "-c", CONNECT, str(socket_path)], user=NOBODY, group=NOBODY,
        extra_groups=[], capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip


def test_the_unix_socket_is_the_daemons_users_alone(tmp_path: Path, open_dir: Path) -> None:
    node = LocalNode(open_dir / "alpha", "alpha", [VolumeSpec("data1", "4MiB")])
    node.directory.chmod(0o755)
    node.start()
    try:
        info = node.control_socket.stat()
        assert stat.S_IMODE(info.st_mode) == 0o600 and info.st_uid == os.getuid()
        refused = as_nobody(node.control_socket)
        assert refused.returncode != 0 and "PermissionError" in refused.stderr, refused
        assert node.status()["node"] == "alpha"  # its own user: in
    finally:
        assert node.stop() == 0


def test_a_control_group_opens_it_to_that_group(open_dir: Path) -> None:
    node = LocalNode(open_dir / "alpha", "alpha", [VolumeSpec("data1", "4MiB")],
                     node_settings={"control_group": "nogroup"})  # fmt: skip
    node.directory.chmod(0o755)
    node.start()
    try:
        info = node.control_socket.stat()
        assert stat.S_IMODE(info.st_mode) == 0o660 and info.st_gid == NOBODY
        allowed = as_nobody(node.control_socket)
        assert allowed.returncode == 0 and allowed.stdout.strip() == "in", allowed
    finally:
        assert node.stop() == 0


def test_an_unknown_control_group_stops_the_start_with_a_clear_error(tmp_path: Path) -> None:
    node = LocalNode(tmp_path / "alpha", "alpha", [VolumeSpec("data1", "4MiB")],
                     node_settings={"control_group": "no-such-group"})  # fmt: skip
    with pytest.raises(RuntimeError, match="no group named 'no-such-group'"):
        node.start()


def volkeeper(*args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "120"}
    if token is not None:
        env["VOLKEEPER_TOKEN"] = token
    return subprocess.run(
        [*VOLKEEPER, *args], capture_output=True, text=True, timeout=60, env=env, check=False
    )


def https(node: LocalNode, token: str | None) -> httpx.Client:
    verify = ssl.create_default_context(cafile=str(node.served_certificate))
    verify.check_hostname = False
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(
        base_url=f"https://127.0.0.1:{node.control_port}", verify=verify, headers=headers,
        timeout=10,
    )  # fmt: skip


def test_on_tcp_every_request_needs_a_token_and_a_read_token_changes_nothing(
    start_node: NodeFactory,
) -> None:
    node = start_node("alpha", [VolumeSpec("data1", "4MiB")], control_tcp=True)
    config = str(node.config_path)
    made = volkeeper("token", "create", "viewer", "--role", "read", "--config", config)
    assert made.returncode == 0, made.stderr
    read_token = made.stdout.strip()
    assert read_token.startswith("vk_") and len(read_token) >= 40
    stored = (node.state_dir / "tokens.json").read_text()
    assert (
        read_token not in stored
        and stat.S_IMODE((node.state_dir / "tokens.json").stat().st_mode) == 0o600
    )
    listed = json.loads(volkeeper("token", "list", "--config", config, "--json").stdout)
    assert listed == [{"name": "lab", "role": "admin"}, {"name": "viewer", "role": "read"}]

    with https(node, None) as api:
        missing = api.get("/status")
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert missing.json()["error"]["code"] == "unauthorized"
    with https(node, "vk_" + "x" * 43) as api:
        wrong = api.get("/metrics")
    assert wrong.status_code == 401
    assert wrong.json()["error"]["message"] == "the bearer token is not one of this node's"

    body = {"name": "web", "source": "alpha:data1", "target": "beta:data1", "confirm": True}
    with https(node, read_token) as api:
        assert api.get("/status").json()["node"] == "alpha"
        for method, path, payload in (
            ("POST", "/jobs", body), ("POST", "/reload", None), ("DELETE", "/jobs/web", None),
            ("POST", "/volumes/data1/lock", None),
        ):  # fmt: skip
            refused = api.request(method, path, json=payload)
            assert refused.status_code == 403, (method, path, refused.text)
            assert refused.json()["error"]["message"] == (
                f"token viewer may only read ({method} {path} changes things)"
            )
    with https(node, node.token) as api:  # admin
        assert api.post("/reload").status_code == 200
    assert node.status()["jobs"] == []  # type: ignore[comparison-overlap]

    revoked = volkeeper("token", "revoke", "viewer", "--config", config)
    assert revoked.returncode == 0, revoked.stderr
    with https(node, read_token) as api:
        assert api.get("/status").status_code == 401  # at once, no restart
    with pytest.raises(httpx.HTTPError):  # and no plain HTTP at all
        httpx.get(f"http://127.0.0.1:{node.control_port}/status", timeout=5)


def test_the_cli_pins_the_nodes_certificate_and_sends_its_token_only_there(
    start_node: NodeFactory,
) -> None:
    node = start_node("alpha", [VolumeSpec("data1", "4MiB")], control_tcp=True)
    shown = volkeeper("status", "--json", "--node", node.control, token=node.token)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["node"] == "alpha"

    no_token = volkeeper("status", "--node", node.control)
    assert no_token.returncode == 1
    assert "this control API needs a bearer token" in no_token.stderr
    bare = node.control.partition("#")[0]
    unpinned = volkeeper("status", "--node", bare, token=node.token)
    assert unpinned.returncode == 1
    assert f"give its fingerprint as {bare}#sha256:..." in unpinned.stderr
    impostor = f"{bare}#sha256:{'0' * 64}"
    refused = volkeeper("status", "--node", impostor, token=node.token)
    assert refused.returncode == 1 and "REFUSED: the node at" in refused.stderr
    assert "nothing was sent" in refused.stderr
    local = volkeeper("status", "--json", "--config", str(node.config_path), token=node.token)
    assert local.returncode == 0 and json.loads(local.stdout)["node"] == "alpha"
