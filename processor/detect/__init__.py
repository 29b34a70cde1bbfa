"""Detectors: read closed windows of one code location, emit events."""
