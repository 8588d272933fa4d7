"""The target side: admitting a source, applying its frames in order, the records."""
