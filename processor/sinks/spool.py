"""A bounded on-disk spool of Redis writes, for what must outlive the process while Redis
is away (docs/operations.md, "What survives").

While Redis does not answer, the sink appends each batch it could not send, as the Redis
commands it would have sent, to ``{dir}/redis-spool.log`` and forgets it; once Redis
answers (or at the next start) the batches are sent again in order and the file is
emptied. Every command can be sent twice without effect (processor/sinks/idempotency.py),
so a replay cut short is simply replayed again.

A record is a 4-byte length, a 4-byte CRC-32 and the MessagePack of the batch's commands
(lists of strings and bytes); each append is flushed and fsync'd, one per batch. A record
cut short by a crash, or one whose CRC does not match, ends the replay there: what follows
it cannot be trusted to be whole.

>>> import tempfile
>>> spool = Spool(tempfile.mkdtemp(), max_bytes=1 << 20)
>>> spool.append([["HSET", "k", "f", b"v"]]); spool.append([["SADD", "s", "m"]])
>>> [r for r in spool.records()]
[[['HSET', 'k', 'f', b'v']], [['SADD', 's', 'm']]]
>>> spool.clear(); spool.size, list(spool.records())
(0, [])

A record cut short by a crash is removed when the spool is opened again:

>>> spool.append([["SADD", "s", "m"]]); os.write(spool._fd, bytes(3))
3
>>> again = Spool(spool.path.rsplit("/", 1)[0], max_bytes=1 << 20)
>>> list(again.records()), again.size == spool.size
([[['SADD', 's', 'm']]], True)
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from typing import Iterator

import msgpack

log = logging.getLogger("backflow.spool")

_HEADER = struct.Struct(">II")  # length, crc32 of the payload
FILE_NAME = "redis-spool.log"


class Spool:
    def __init__(self, directory: str, max_bytes: int, name: str = FILE_NAME):
        os.makedirs(directory, exist_ok=True)
        self.path = os.path.join(directory, name)
        self.max_bytes = max_bytes
        # Unbuffered: a write that fails leaves nothing behind to be written with the next.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        # One pass: where the whole records end, and whether the mark is one of those ends.
        marked, whole, self.start = self._marked(), 0, 0
        with open(self.path, "rb") as f:
            for payload, end in _scan(f):
                if payload is None:
                    break
                whole = end
                if end == marked:
                    self.start = marked
        if whole < self.size:  # a record cut short by a crash: what follows must not hide behind it
            log.warning("the spool %s ends in a record cut short (%d bytes); removed", self.path, self.size - whole)
            os.ftruncate(self._fd, whole)
            self.size = whole

    @property
    def full(self) -> bool:
        return self.size >= self.max_bytes

    def append(self, commands: list) -> None:
        """Add a batch (any MessagePack value: the forwarder spools requests), on disk when this
        returns; OSError (a full disk) leaves the file as it was."""
        record = memoryview(_frame(commands))
        n = len(record)
        try:
            while record:  # (a write may take part of it)
                record = record[os.write(self._fd, record):]
            os.fsync(self._fd)
        except OSError:
            try:
                os.ftruncate(self._fd, self.size)
            except OSError:
                pass
            raise
        self.size += n

    def records(self, start: int = 0) -> Iterator[list[list]]:
        """The batches in the order they were appended (from offset ``start``), up to the
        first one not whole."""
        with open(self.path, "rb") as f:
            for payload, _ in _scan(f, start):
                if payload is None:
                    log.warning("the spool ends in a record cut short or damaged; what follows is not replayed")
                    return
                yield msgpack.unpackb(payload, raw=False)

    def read_at(self, offset: int) -> tuple[list, int] | None:
        """The record at ``offset`` and the offset of the next; None at the end, or (logged)
        at a record cut short or damaged."""
        with open(self.path, "rb") as f:
            got = next(_scan(f, offset), None)
        if got is None:
            return None
        payload, after = got
        if payload is None:
            log.warning("the spool %s holds a record cut short or damaged at %d; what follows is not "
                        "sent", self.path, offset)
            return None
        return msgpack.unpackb(payload, raw=False), after

    # The offset of the first record not yet taken, kept beside the spool (``mark``) so that
    # a restart while the spool is being sent does not send it all again from its start.

    def mark(self, offset: int) -> None:
        aside = self.path + ".at.new"
        _unlink(aside)  # (one a crash left: O_CREAT would keep its mode)
        with open(os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(str(offset))
        os.replace(aside, self.path + ".at")
        self.start = offset

    def _marked(self) -> int:
        """The mark as written (0 without one); used only where a whole record ends."""
        try:
            with open(self.path + ".at") as f:
                return int(f.read())
        except (OSError, ValueError):
            return 0

    def rewrite(self, before: list, after: list) -> None:
        """The spool as ``before``'s records, then its own from ``start`` on, then ``after``'s:
        written aside and renamed over it (a crash leaves the old or the new, whole)."""
        aside = self.path + ".new"
        _unlink(aside)
        with open(os.open(aside, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out, \
                open(self.path, "rb") as old:
            out.writelines(_frame(r) for r in before)
            old.seek(self.start)
            while chunk := old.read(1 << 20):
                out.write(chunk)
            out.writelines(_frame(r) for r in after)
            out.flush()
            os.fsync(out.fileno())
        os.replace(aside, self.path)
        self._unmark()
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self.size = os.lseek(self._fd, 0, os.SEEK_END)

    def _unmark(self) -> None:
        self.start = 0
        _unlink(self.path + ".at")

    def clear(self) -> None:
        os.ftruncate(self._fd, 0)
        os.fsync(self._fd)
        self.size = 0
        self._unmark()

    def close(self) -> None:
        os.close(self._fd)


def _frame(value) -> bytes:
    """A record: length, CRC-32 and the MessagePack of ``value``."""
    payload = msgpack.packb(value, use_bin_type=True)
    return _HEADER.pack(len(payload), zlib.crc32(payload)) + payload


def _scan(f, at: int = 0):
    """The records of ``f`` from offset ``at``: (payload, offset after it) for each whole
    one; at one cut short or damaged, (None, its offset), and no more."""
    f.seek(at)
    while header := f.read(_HEADER.size):
        length, crc = _HEADER.unpack(header) if len(header) == _HEADER.size else (0, None)
        payload = f.read(length)
        if crc is None or len(payload) < length or zlib.crc32(payload) != crc:
            yield None, at
            return
        at += _HEADER.size + length
        yield payload, at


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
