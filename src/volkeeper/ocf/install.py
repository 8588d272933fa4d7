"""``volkeeper ocf install``: put the resource agent where Pacemaker looks for it.

How this works: Pacemaker finds ``ocf:PROVIDER:TYPE`` at ``OCF_ROOT/resource.d/PROVIDER/TYPE``
(OCF_ROOT is /usr/lib/ocf).  ``install`` writes ``resource.d/volkeeper/job`` there: a
short shell script that answers ``meta-data`` itself (any user may ask it, ocf-tester does
as ``nobody``) and runs the agent (volkeeper/ocf/agent.py) for every other action with the
Python that runs this command, so the agent finds the volkeeper it was installed from.  Run
it on every cluster node; it is idempotent.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from volkeeper.ocf.agent import META_DATA

OCF_ROOT = Path("/usr/lib/ocf")


def install(ocf_root: Path = OCF_ROOT) -> Path:
    """Write the agent's launcher; returns its path."""
    target = ocf_root / "resource.d" / "volkeeper" / "job"
    target.parent.mkdir(parents=True, exist_ok=True)
    script = (
        "#!/bin/sh\n"
        "# ocf:volkeeper:job -- written by `volkeeper ocf install`; see volkeeper/ocf/agent.py\n"
        'if [ "$1" = meta-data ]; then\n'
        "cat <<'END_OF_META_DATA'\n"
        f"{META_DATA}"
        "END_OF_META_DATA\n"
        "exit 0\n"
        "fi\n"
        f'exec "{sys.executable}" -m volkeeper.ocf.agent "$@"\n'
    )
    temporary = target.with_name(".job.new")
    temporary.write_text(script)
    temporary.chmod(0o755)
    os.replace(temporary, target)
    return target
