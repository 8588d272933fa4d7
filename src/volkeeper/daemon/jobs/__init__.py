"""Jobs on a source node: their records, rules, views, and the config's declared jobs."""
