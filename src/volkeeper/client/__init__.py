"""What every client of a node's control API shares (the CLI, the GUI, the agent)."""
