"""The node's TOML config: the node, its volumes and peers, declared jobs, value types."""
