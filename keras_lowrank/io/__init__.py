"""Files: the `.keras` manifest and adapter-only files."""
