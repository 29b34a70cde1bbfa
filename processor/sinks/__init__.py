"""Sinks: write what the detectors and baselines produced. They only write."""
