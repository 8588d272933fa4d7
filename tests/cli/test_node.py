"""``volkeeper node init|show|trust|forget`` on a real config and state directory."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from volkeeper.io.identity import KnownPeers

VOLKEEPER = [sys.executable, "-m", "volkeeper"]
PIN = "sha256:" + "ab" * 32


def volkeeper(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": "120", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [*VOLKEEPER, *args], capture_output=True, text=True, timeout=30, env=env, check=False
    )


def config(tmp_path: Path, peers: str) -> Path:
    path = tmp_path / "alpha.toml"
    path.write_text(
        '[node]\nname = "alpha"\n'
        f'state_dir = "{tmp_path / "state"}"\n'
        'listen = "127.0.0.1:7788"\n'
        f'control = "unix:{tmp_path / "alpha.sock"}"\n'
        f'nbd = "unix:{tmp_path / "nbd.sock"}"\n'
        f"[peers]\n{peers}"
    )
    return path


def test_init_makes_an_identity_once_and_prints_its_fingerprint(tmp_path: Path) -> None:
    path = config(tmp_path, 'beta = "127.0.0.1:7790"\n')
    made = volkeeper("node", "init", "--config", str(path), "--json")
    assert made.returncode == 0, made.stderr
    first = json.loads(made.stdout)
    assert first["node"] == "alpha" and first["created"] is True
    assert first["fingerprint"].startswith("sha256:") and len(first["fingerprint"]) == 71
    again = volkeeper("node", "init", "--config", str(path))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"identity of alpha exists: {first['fingerprint']}",
        f"on each peer, run:  volkeeper node trust alpha {first['fingerprint']}",
    ]


def test_trust_pins_a_peer_and_show_says_how_each_link_is_protected(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        'beta = "127.0.0.1:7790"\n'
        'gamma = { address = "127.0.0.1:7791", insecure = true }\n'
        'delta = "127.0.0.1:7792"\n',
    )
    volkeeper("node", "init", "--config", str(path))
    pinned = volkeeper("node", "trust", "beta", PIN.upper(), "--config", str(path))
    assert pinned.returncode == 0, pinned.stderr
    assert pinned.stdout.strip() == f"beta trusted: {PIN}"
    assert KnownPeers(tmp_path / "state").pins() == {"beta": PIN}
    other = "sha256:" + "cd" * 32
    replaced = volkeeper("node", "trust", "beta", other, "--config", str(path))
    assert replaced.stdout.strip() == f"beta trusted: {other} (replaces {PIN})"

    shown = json.loads(volkeeper("node", "show", "--config", str(path), "--json").stdout)
    assert [(p["name"], p["security"], p["fingerprint"]) for p in shown["peers"]] == [
        ("beta", "pinned", other),
        ("gamma", "insecure", None),
        ("delta", "unpinned", None),
    ]
    table = volkeeper("node", "show", "--config", str(path)).stdout
    assert "INSECURE (plain TCP)" in table and "not trusted" in table

    forgotten = volkeeper("node", "forget", "beta", "--config", str(path))
    assert forgotten.returncode == 0 and KnownPeers(tmp_path / "state").pins() == {}
    again = volkeeper("node", "forget", "beta", "--config", str(path))
    assert again.returncode == 2
    assert again.stderr.strip() == (
        "volkeeper: beta is not pinned by volkeeper node trust on alpha"
    )


def test_trust_refuses_what_it_cannot_honour(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        f'beta = {{ address = "127.0.0.1:7790", fingerprint = "{PIN}" }}\n'
        'gamma = { address = "127.0.0.1:7791", insecure = true }\n',
    )
    cases = {
        ("omega", PIN): f"volkeeper: omega is not in [peers] of {path} (peers: beta, gamma)",
        ("gamma", PIN): f"volkeeper: gamma is insecure = true in {path}: remove that to use a pin",
        ("beta", PIN): f"volkeeper: {path} pins beta to {PIN} in [peers]; change it there",
    }
    for (name, fingerprint), message in cases.items():
        done = volkeeper("node", "trust", name, fingerprint, "--config", str(path))
        assert (done.returncode, done.stderr.strip()) == (2, message)
    bad = volkeeper("node", "trust", "beta", "md5:00", "--config", str(path))
    assert bad.returncode == 2 and 'a fingerprint is "sha256:" and 64 hex digits' in bad.stderr
    assert not (tmp_path / "state" / "known_peers.json").exists()


def test_tokens_are_made_listed_installed_and_revoked(tmp_path: Path) -> None:
    path = config(tmp_path, 'beta = "127.0.0.1:7790"\n')
    made = volkeeper("token", "create", "ops", "--role", "admin", "--config", str(path))
    assert made.returncode == 0 and made.stdout.startswith("vk_"), made
    shared = "t" * 40
    installed = subprocess.run(
        [*VOLKEEPER, "token", "create", "gui", "--stdin", "--config", str(path)],
        input=shared + "\n", capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert installed.returncode == 0 and installed.stdout == "", installed
    listed = json.loads(volkeeper("token", "list", "--json", "--config", str(path)).stdout)
    assert listed == [{"name": "gui", "role": "read"}, {"name": "ops", "role": "admin"}]
    assert shared not in (tmp_path / "state" / "tokens.json").read_text()
    bad = volkeeper("token", "create", "x", "--role", "root", "--config", str(path))
    assert (bad.returncode, bad.stderr.strip()) == (
        2, "volkeeper: a token's role is read or admin, got 'root'",
    )  # fmt: skip
    assert volkeeper("token", "revoke", "gui", "--config", str(path)).returncode == 0
    gone = volkeeper("token", "revoke", "gui", "--config", str(path))
    assert (gone.returncode, gone.stderr.strip()) == (2, "volkeeper: no token named gui")
