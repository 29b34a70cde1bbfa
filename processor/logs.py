"""Logging setup shared by the main process and the receiver processes.

Secrets (the bearer token, Redis passwords) are never passed to a log call on purpose; the
formatter also replaces any that reach a line anyway (a third-party message, a traceback),
so that a mistake there does not put a password in the log.
"""

from __future__ import annotations

import logging

# Shorter secrets are not replaced: "***" for every "ab" in the log would garble it, and a
# secret that short protects nothing.
_MIN_SECRET_LENGTH = 4


class RedactingFormatter(logging.Formatter):
    def __init__(self, fmt: str, secrets: list[str]):
        super().__init__(fmt)
        # Longest first, so a secret containing another is replaced whole.
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET_LENGTH}, key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def configure_logging(level: str, secrets: list[str], name_suffix: str = "") -> None:
    """Log to stderr at ``level``, secrets masked; ``name_suffix`` marks a receiver process."""
    handler = logging.StreamHandler()
    handler.setFormatter(RedactingFormatter(
        f"%(asctime)s %(levelname)s %(name)s{name_suffix}: %(message)s", secrets))
    logging.basicConfig(level=level, handlers=[handler])
