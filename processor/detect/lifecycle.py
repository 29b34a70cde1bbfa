"""The lifecycle every regression detector shares: open -> followed -> resolved.

A regression opens with the detector's event; while it is open the detector's baseline stays
as it was and the regression is followed window by window, until either the detector's
evidence says the baseline's behaviour is back (``recovered``) or the new level has held for
``accept_windows`` windows and becomes the baseline (``accepted``). Either ends it with one
``resolved`` event naming the event type it resolves. Meanwhile a further rise of
``escalate_ratio`` times the level last reported, confirmed by a test on the windows that
show it, is reported again: an escalation, naming the event that opened the regression.

>>> o = Regression(version=("shop", "2", ""))
>>> [o.follow(recovered=False, accept_windows=3) for _ in range(3)]
[None, None, 'accepted']
>>> o = Regression(version=("shop", "2", ""))
>>> o.follow(recovered=False, accept_windows=3), o.follow(recovered=True, accept_windows=3), o.windows
(None, 'recovered', 2)
>>> Regression.thawed(o.freeze()) == o
True
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from processor.detect.stats import BinomialCUSUM

RECOVERED, ACCEPTED = "recovered", "accepted"
Version = tuple[str, str, str]  # (service, service.version, vcs.ref.head.revision)


@dataclass(slots=True, kw_only=True)
class Regression:
    """One open regression. Detectors extend it with what they follow (typed fields, plain
    values only, so that ``freeze`` gives a tuple ``marshal`` can keep)."""

    version: Version      # the version it was attributed to
    windows: int = 0      # windows followed since it opened
    back: float = 0.0     # reverse CUSUM: evidence that the baseline's behaviour is back
    event_id: str = ""    # the id of the event that opened it
    reported: float = 0.0  # the level last reported (opening or escalation), in the detector's unit
    escalations: int = 0  # escalations reported since it opened

    def escalates(self, level: float, ratio: float, min_absolute: float, since: float = 0.0) -> bool:
        """Whether ``level`` is far enough above both the level last reported and ``since``
        (the level of the windows followed since then) to be tested as an escalation
        (``ratio`` 0: never). A report made on early evidence can understate a change that
        the next windows show in full; that is not a further rise."""
        reference = max(self.reported, since)
        return ratio > 0 and level >= reference * ratio and level - reference >= min_absolute

    def follow(self, recovered: bool, accept_windows: int) -> str | None:
        """One more window: ``recovered``, ``accepted`` or None while it stays open."""
        self.windows += 1
        if recovered:
            return RECOVERED
        if self.windows >= accept_windows:
            return ACCEPTED
        return None

    def back_at_baseline(self, successes: float, trials: float, p_open: float, p_base: float,
                         threshold: float) -> bool:
        """Add a window's evidence that the success share is back at ``p_base`` rather than
        still at ``p_open`` (a binomial CUSUM, the same test that opened it, reversed); True once
        it crosses ``threshold``."""
        cusum = BinomialCUSUM(threshold)
        cusum.statistic = self.back
        self.back = cusum.update(successes, trials, p_open, p_base).statistic
        return cusum.drift_detected

    def freeze(self) -> tuple:
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))

    @classmethod
    def thawed(cls, state: tuple | None):
        if state is None:
            return None
        return cls(**{f.name: v for f, v in zip(dataclasses.fields(cls), state)})
