"""The compiled core: used only when a build matches the sources, and in use under make test.

``make test`` builds the data path's modules with mypyc (``make compiled``) and runs the
suite with them, then the core's tests again as pure Python (``VOLKEEPER_PURE_PYTHON=1``).
It sets ``VOLKEEPER_EXPECT=compiled`` or ``pure`` so that a build that silently failed, or a
fallback nobody asked for, fails the run instead of passing with the other variant.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from volkeeper import _compiled

SRC = Path(_compiled.PACKAGE)


def test_the_variant_make_test_asked_for_is_the_one_running() -> None:
    expected = os.environ.get("VOLKEEPER_EXPECT")
    if expected is None:
        pytest.skip("VOLKEEPER_EXPECT is set by make test")
    assert ("compiled" if _compiled.ACTIVE else "pure") == expected, _compiled.STATE


def test_compiled_modules_are_the_ones_imported_when_active() -> None:
    import volkeeper.core.mirror_engine
    import volkeeper.core.units

    engine_file = str(volkeeper.core.mirror_engine.__file__)
    assert engine_file.endswith(".so") == _compiled.ACTIVE, (engine_file, _compiled.STATE)
    assert str(volkeeper.core.units.__file__).endswith(".py")  # never compiled: it parses input


def test_source_hashes_change_with_any_core_source(tmp_path: Path) -> None:
    copy = tmp_path / "volkeeper"
    shutil.copytree(SRC, copy, ignore=shutil.ignore_patterns("__pycache__"))
    before = _compiled.source_hashes(copy)
    assert "core/mirror_engine.py" in before and "errors.py" in before
    assert "core/peer/decoder.py" in before and "daemon/node.py" not in before
    path = copy / "core" / "throttle.py"
    path.write_text(path.read_text() + "\n# changed\n")
    after = _compiled.source_hashes(copy)
    assert {k for k in before if before[k] != after[k]} == {"core/throttle.py"}


def state_in_child(env: dict[str, str]) -> str:
    code = "import volkeeper._compiled as c; print(c.STATE)"
    env = {**os.environ, **env}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


def test_pure_python_when_asked() -> None:
    assert state_in_child({"VOLKEEPER_PURE_PYTHON": "1"}) == (
        "pure Python (VOLKEEPER_PURE_PYTHON is set)"
    )


def test_a_stale_build_is_not_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A manifest whose hashes do not match the sources: pure Python, and why."""
    monkeypatch.delenv(_compiled.PURE_VARIABLE, raising=False)
    manifest = {"python": sys.implementation.cache_tag, "sources": _compiled.source_hashes()}
    manifest["sources"]["core/throttle.py"] = "0" * 64
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    state = _compiled._activate(tmp_path)
    assert state == "pure Python (core changed since the compiled build: make compiled)"


def test_a_build_for_another_python_is_not_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(_compiled.PURE_VARIABLE, raising=False)
    (tmp_path / "manifest.json").write_text(json.dumps({"python": "cpython-399"}))
    state = _compiled._activate(tmp_path)
    assert state == "pure Python (the build is for cpython-399: make compiled)"


def test_no_build_is_pure_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(_compiled.PURE_VARIABLE, raising=False)
    assert _compiled._activate(tmp_path) == "pure Python (no compiled build: make compiled)"
