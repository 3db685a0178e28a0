"""Model-level adapter state: options, the active set, owned weights."""
