"""A node's Prometheus metrics in tests: the text at /metrics, one sample by name and labels."""

from __future__ import annotations

from volkeeper_lab.launcher import LocalNode


def metrics(node: LocalNode) -> str:
    with node.api() as api:
        return api.get("/metrics").text


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        named = line.startswith((name + "{", name + " "))
        if named and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in metrics:\n{text[:3000]}")
