"""The ``volkeeper`` command's own behaviour, without a node: help and usage errors."""

from __future__ import annotations

import subprocess
import sys

import pytest

VOLKEEPER = [sys.executable, "-m", "volkeeper"]


def volkeeper(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"COLUMNS": "100", "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [*VOLKEEPER, *args], capture_output=True, text=True, timeout=30, env=env, check=False
    )


@pytest.mark.parametrize("args", [(), ("job",), ("mirror",), ("volume",)])
def test_no_command_prints_the_help_and_exits_2_without_a_traceback(args: tuple[str, ...]) -> None:
    done = volkeeper(*args)
    assert done.returncode == 2, done
    assert "Usage:" in done.stdout + done.stderr
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize("args", [("--bogus",), ("status", "--bogus"), ("no-such-command",)])
def test_a_usage_error_is_one_clear_message(args: tuple[str, ...]) -> None:
    done = volkeeper(*args)
    assert done.returncode == 2, done
    assert "Traceback" not in done.stdout + done.stderr
    assert "Error:" in done.stderr, done.stderr
