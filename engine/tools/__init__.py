"""Developer tools that are not part of the serving path (e.g. writing tiny test checkpoints)."""
