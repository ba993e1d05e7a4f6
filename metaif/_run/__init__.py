"""Machinery of the `metaif` command (private): config, checkpoints, pipeline, report."""
