"""The launcher's free ports: below the ephemeral range, a slice per xdist worker, and never
the same port twice in a row (two nodes of one test, or two workers, racing to bind it)."""

from __future__ import annotations

import pytest

from volkeeper_lab import launcher


def test_workers_draw_from_disjoint_slices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    slices = []
    for worker in ("gw0", "gw1"):
        monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
        slices.append(launcher._port_range())
    (low0, high0), (low1, high1) = slices
    assert high0 <= low1 and high1 <= launcher._first_ephemeral_port()
    assert high0 - low0 == high1 - low1 > 1000


def test_a_port_is_not_handed_out_twice_in_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTEST_XDIST_WORKER", "gw0")
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", "2")
    low, high = launcher._port_range()
    ports = [launcher.free_tcp_port() for _ in range(200)]
    assert len(set(ports)) == len(ports)
    assert all(low <= port < high for port in ports)
