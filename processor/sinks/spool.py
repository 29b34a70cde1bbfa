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

>>> spool.append([["SADD", "s", "m"]]); spool._file.write(bytes(3)); spool._file.flush()
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
        self._file = open(self.path, "ab")
        self.size = self._file.tell()
        whole = self._whole_length()
        if whole < self.size:  # a record cut short by a crash: what follows must not hide behind it
            log.warning("the spool %s ends in a record cut short (%d bytes); removed", self.path, self.size - whole)
            self._file.truncate(whole)
            self.size = whole

    @property
    def full(self) -> bool:
        return self.size >= self.max_bytes

    def append(self, commands: list) -> None:
        """Add a batch (any MessagePack value: the forwarder spools requests), on disk when this
        returns; OSError (a full disk) leaves the file as it was."""
        payload = msgpack.packb(commands, use_bin_type=True)
        try:
            self._file.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
            self._file.flush()
            os.fsync(self._file.fileno())
        except OSError:
            try:
                self._file.truncate(self.size)
            except OSError:
                pass
            raise
        self.size += _HEADER.size + len(payload)

    def _whole_length(self) -> int:
        """Bytes from the start of the file up to the end of its last whole record."""
        end = 0
        with open(self.path, "rb") as f:
            while True:
                header = f.read(_HEADER.size)
                if len(header) < _HEADER.size:
                    return end
                length, crc = _HEADER.unpack(header)
                payload = f.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    return end
                end += _HEADER.size + length

    def records(self) -> Iterator[list[list]]:
        """The batches in the order they were appended, up to the first one not whole."""
        with open(self.path, "rb") as f:
            while True:
                header = f.read(_HEADER.size)
                if not header:
                    return
                if len(header) < _HEADER.size:
                    log.warning("the spool ends in a record cut short; what it held is lost")
                    return
                length, crc = _HEADER.unpack(header)
                payload = f.read(length)
                if len(payload) < length or zlib.crc32(payload) != crc:
                    log.warning("the spool ends in a record cut short or damaged; what follows is not replayed")
                    return
                yield msgpack.unpackb(payload, raw=False)

    def read_at(self, offset: int) -> tuple[list, int] | None:
        """The record at ``offset`` and the offset of the next; None at the end, or (logged)
        at a record cut short or damaged."""
        with open(self.path, "rb") as f:
            f.seek(offset)
            header = f.read(_HEADER.size)
            if not header:
                return None
            length, crc = _HEADER.unpack(header) if len(header) == _HEADER.size else (0, None)
            payload = f.read(length)
            if crc is None or len(payload) < length or zlib.crc32(payload) != crc:
                log.warning("the spool %s holds a record cut short or damaged at %d; what follows is not "
                            "sent", self.path, offset)
                return None
            return msgpack.unpackb(payload, raw=False), offset + _HEADER.size + length

    def replace(self, records: list) -> None:
        """The spool holding ``records`` instead, written aside then renamed over it (a crash
        leaves the old or the new, whole)."""
        aside = self.path + ".new"
        with open(aside, "wb") as f:
            for r in records:
                payload = msgpack.packb(r, use_bin_type=True)
                f.write(_HEADER.pack(len(payload), zlib.crc32(payload)) + payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(aside, self.path)
        self._file.close()
        self._file = open(self.path, "ab")
        self.size = self._file.tell()

    def clear(self) -> None:
        self._file.truncate(0)
        self._file.seek(0)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.size = 0

    def close(self) -> None:
        self._file.close()
