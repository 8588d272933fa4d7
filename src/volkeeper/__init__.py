"""volkeeper: userspace real-time block volume replication, served over NBD."""

__version__ = "0.1.0"
