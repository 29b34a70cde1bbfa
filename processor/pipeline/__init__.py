"""The data stages between the receiver and the detectors.

``location`` (the code location of a span), ``window`` (event-time windows and watermarks),
``sketch`` (mergeable log-bucket quantile sketches), ``baseline`` (per-location decayed
baselines), ``engine`` (a closed window through baselines and detectors) and ``checkpoint``
(what the engine learned, kept in Redis).
"""
