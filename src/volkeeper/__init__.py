"""volkeeper: userspace real-time block volume replication, served over NBD."""

from volkeeper._compiled import activate

__version__ = "0.1.0"

activate()  # the core compiled with mypyc, when a build matches the sources
