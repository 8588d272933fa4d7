"""Role changes: a job's source moving to another node (switchover), and what it carries."""
