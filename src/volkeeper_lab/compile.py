"""Compile the sans-IO core with mypyc into build/mypyc/ (``make compiled``).

How this works: mypyc must see the package as mypy does, so the build copies the sources it
reads (``volkeeper/__init__.py`` and ``_compiled.py`` for the package, ``errors.py``, all of
``core/``) into ``build/mypyc/``, runs mypyc there on the data path's modules
(``COMPILED``), and then deletes the copies, keeping only the extension modules
(``volkeeper/core/bitmap.cpython-311-x86_64-linux-gnu.so``, ...) and mypyc's shared
runtime library.  Last it writes ``manifest.json`` (what ``volkeeper/_compiled.py`` checks before it
uses the build): the sources' sha256, the modules, the runtime library.  A failed build
leaves no manifest, so volkeeper runs as pure Python; the exit status says it failed.

Run with the venv's Python: ``python -m volkeeper_lab.compile [--clean]``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from volkeeper import _compiled

COPIED = ("__init__.py", "_compiled.py", "errors.py", "py.typed", "core")
# The data path's modules: what every request, frame and ACK runs through.  The rest of
# core/ stays pure Python: it is not hot, and it parses what people and files say (sizes,
# addresses, settings), where a compiled function would check its arguments' types at the
# call and raise TypeError instead of the ValueError that names the bad value.  Two hot
# modules cannot be compiled: peer/wire.py re-exports by star import, which mypyc cannot
# do between compiled modules, and ready.py holds generic dataclasses, which it cannot build.
COMPILED = (
    "core/activity_log.py",
    "core/bitmap.py",
    "core/mirror_engine.py",
    "core/mirror_ledger.py",
    "core/mirror_state.py",
    "core/nbd_transmission.py",
    "core/nbd_wire.py",
    "core/peer/bodies.py",
    "core/peer/decoder.py",
    "core/peer/encoding.py",
    "core/peer/frames.py",
    "core/peer/layout.py",
    "core/peer/session_frames.py",
    "core/resync_plan.py",
    "core/stats.py",
    "core/throttle.py",
)


def build(package: Path = _compiled.PACKAGE, out: Path = _compiled.BUILD) -> None:
    shutil.rmtree(out, ignore_errors=True)
    target = out / "volkeeper"
    target.mkdir(parents=True)
    for name in COPIED:
        source = package / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, target / name)
    modules = [Path("volkeeper", name) for name in COMPILED]
    subprocess.run([sys.executable, "-m", "mypyc", *map(str, modules)], cwd=out, check=True)
    for path in [*target.rglob("*.py"), *target.rglob("py.typed")]:
        path.unlink()
    shutil.rmtree(out / "build", ignore_errors=True)  # mypyc's C sources and objects
    shutil.rmtree(out / ".mypy_cache", ignore_errors=True)
    runtime = list(out.glob("*__mypyc*.so"))
    if len(runtime) != 1:
        raise SystemExit(f"expected one mypyc runtime library in {out}, found {runtime}")
    manifest = {
        "python": sys.implementation.cache_tag,
        "sources": _compiled.source_hashes(package),
        "modules": [".".join(m.with_suffix("").parts) for m in modules],
        "runtime": runtime[0].name,
    }
    (out / _compiled.MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clean", action="store_true", help="remove the build: pure Python")
    args = parser.parse_args()
    if args.clean:
        shutil.rmtree(_compiled.BUILD, ignore_errors=True)
        print(f"removed {_compiled.BUILD}: volkeeper runs as pure Python")
        return
    build()
    print(f"compiled {len(COMPILED)} core modules with mypyc into {_compiled.BUILD}")


if __name__ == "__main__":
    main()
