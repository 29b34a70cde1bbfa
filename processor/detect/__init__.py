"""Detectors: read closed windows of one code location, emit events.

One module per detector (``latency``, ``errors``, ``exceptions``, ``scaling``, ``dormant``),
listed once in ``registry``; ``base`` is the interface and what detectors are fed,
``lifecycle`` the open -> resolved course every regression takes, ``settings`` the typed
settings, ``stats`` the statistics they share, ``first_seen`` the engine's own event.
"""
