"""Detectors: read closed windows of one code location, emit events.

``build_detectors(cfg)`` makes the set each new code location gets, from the settings.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from processor.detect.base import Detector

# The detectors (and River and scipy behind them) load on first use, not with the package:
# receiver processes import processor.detect.settings through the Config object and
# never run a detector, so they need not carry them.
_LAZY = {"Detector": "base", "Observation": "base", "Dormant": "dormant",
         "ErrorRateShift": "errors", "NewException": "exceptions", "LatencyShift": "latency",
         "ScalingShift": "scaling"}

__all__ = ["Detector", "Observation", "build_detectors", "Dormant", "ErrorRateShift",
           "NewException", "LatencyShift", "ScalingShift"]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"processor.detect.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'processor.detect' has no attribute {name!r}")


def build_detectors(cfg) -> list[Detector]:
    from processor.detect.dormant import Dormant
    from processor.detect.errors import ErrorRateShift
    from processor.detect.exceptions import NewException
    from processor.detect.latency import LatencyShift
    from processor.detect.scaling import ScalingShift

    d, w, half = cfg.detectors, cfg.window, cfg.baseline_half_life
    common = dict(window_s=w, half_life_s=half, warmup_windows=d.warmup_windows)
    out: list = []
    if d.latency.enabled:
        lt = d.latency
        out.append(LatencyShift(**common, threshold=lt.threshold, median_delta=lt.median_delta,
                                tail_ratio=lt.tail_ratio, min_tail_expected=lt.min_tail_expected,
                                min_relative=lt.min_relative, min_absolute_ms=lt.min_absolute_ms,
                                alpha=lt.alpha, accept_windows=d.accept_windows))
    if d.errors.enabled:
        er = d.errors
        out.append(ErrorRateShift(**common, threshold=er.threshold, ratio=er.ratio,
                                  prior_share=er.prior_share, prior_spans=er.prior_spans,
                                  min_ratio=er.min_ratio, min_absolute=er.min_absolute, alpha=er.alpha,
                                  accept_windows=d.accept_windows))
    if d.exceptions.enabled:
        out.append(NewException(warmup_windows=d.warmup_windows, max_types=d.exceptions.max_types))
    if d.scaling.enabled:
        sc = d.scaling
        out.append(ScalingShift(window_s=w, half_life_s=half, warmup_windows=sc.warmup_windows,
                                recent_windows=sc.recent_windows, z_threshold=sc.z_threshold,
                                persist_windows=sc.persist_windows, min_relative=sc.min_relative,
                                min_load_range=sc.min_load_range, resolve_windows=sc.resolve_windows,
                                accept_windows=d.accept_windows))
    if d.dormant.enabled:
        dm = d.dormant
        out.append(Dormant(window_s=w, warmup_windows=d.warmup_windows, min_silence_s=dm.min_silence_s,
                           min_presence=dm.min_presence, alpha=dm.alpha))
    return out
