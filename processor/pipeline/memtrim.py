"""Giving freed heap back to the operating system.

Closing the windows of many locations, or writing their checkpoint fields, allocates and
frees memory by the hundred thousand objects; glibc keeps the freed heap unless asked, so
RSS would stay at the peak. ``release_free_memory`` asks (a no-op where libc is not glibc).
"""

from __future__ import annotations

import ctypes


def _load_glibc():
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim  # noqa: B018 (raises AttributeError where libc is not glibc)
        return libc
    except (OSError, AttributeError):  # not glibc: nothing to ask
        return None


_LIBC = _load_glibc()


def release_free_memory() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
