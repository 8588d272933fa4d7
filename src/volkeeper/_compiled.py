"""Whether the sans-IO core runs compiled (mypyc) or as pure Python, and making it so.

How this works: ``make compiled`` (``volkeeper_lab/compile.py``) compiles the data path's
modules of ``core/`` with mypyc into ``build/mypyc/`` beside ``src/``, and writes
``manifest.json`` there: the sha256 of every source mypyc read, the module names it compiled
and the file of mypyc's shared runtime library.  When ``volkeeper``
is imported, ``activate()`` compares that manifest with the sources in ``src/``.  If every
hash matches, it loads the runtime library and puts the build's directories first on
``volkeeper.core.__path__`` and ``volkeeper.core.peer.__path__``: ``import
volkeeper.core.bitmap`` then finds the compiled module, and a module the build does not hold
is still found in ``src/``.  Anything else -- no build, a source changed since it (a stale
build would run old code), another Python, ``VOLKEEPER_PURE_PYTHON=1`` -- leaves the pure
Python modules in place, and ``STATE`` says which and why (the daemon logs it at start).

The pure modules are the reference: the build compiles the same files, and the test suite
runs the core's tests both ways (``make test``).  A wheel whose compiled modules sit inside
the package needs none of this; ``activate`` then finds no build and changes nothing.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent  # src/volkeeper
BUILD = PACKAGE.parent.parent / "build" / "mypyc"
MANIFEST = "manifest.json"  # in the build directory: written by the build, checked here
PURE_VARIABLE = "VOLKEEPER_PURE_PYTHON"
# What the build hashes: everything mypyc reads when it compiles the core.
INPUTS = ("core/**/*.py", "errors.py")

STATE = "pure Python (not activated)"
ACTIVE = False  # the compiled modules are in use


def source_hashes(package: Path = PACKAGE) -> dict[str, str]:
    """sha256 of every source the build compiles from, by path relative to the package."""
    paths = sorted({p for pattern in INPUTS for p in package.glob(pattern)})
    return {str(p.relative_to(package)): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def activate() -> str:
    """Use the compiled core if a build matches the sources; return (and keep) why or why not."""
    global STATE, ACTIVE
    STATE = _activate()
    ACTIVE = STATE.startswith("compiled")
    return STATE


def _activate(build: Path = BUILD) -> str:
    if os.environ.get(PURE_VARIABLE, "") not in ("", "0"):
        return f"pure Python ({PURE_VARIABLE} is set)"
    if not (build / MANIFEST).exists():
        return "pure Python (no compiled build: make compiled)"
    try:
        manifest = json.loads((build / MANIFEST).read_text())
        if manifest["python"] != sys.implementation.cache_tag:
            return f"pure Python (the build is for {manifest['python']}: make compiled)"
        if manifest["sources"] != source_hashes():
            return "pure Python (core changed since the compiled build: make compiled)"
        runtime = manifest["runtime"]  # the file; its module name is what precedes the tags
        _load(runtime.split(".")[0], build / runtime)
    except (OSError, ValueError, KeyError, ImportError) as exc:
        return f"pure Python (the compiled build cannot be used: {exc})"
    import volkeeper.core
    import volkeeper.core.peer

    for package in (volkeeper.core, volkeeper.core.peer):
        relative = Path(*package.__name__.split("."))
        package.__path__.insert(0, str(build / relative))
    return f"compiled with mypyc ({len(manifest['modules'])} core modules)"


def _load(name: str, path: Path) -> None:
    """Import the extension module at ``path`` as ``name`` (mypyc's shared runtime library,
    which each compiled module imports by name) without putting ``build/`` on sys.path."""
    if name in sys.modules:
        return
    loader = importlib.machinery.ExtensionFileLoader(name, str(path))
    spec = importlib.util.spec_from_file_location(name, path, loader=loader)
    if spec is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    loader.exec_module(module)
