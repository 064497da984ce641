"""TensorBoard event files of a run: ``tensorboard --logdir <run or sweep folder>`` shows each step's loss,
learning rate, tokens/s, step time, memory and communication, one TensorBoard run per job of a sweep.

Written here without TensorBoard or TensorFlow (nothing to import in the workers): an event file is a sequence
of TFRecords (length, masked CRC-32C of the length, the bytes, masked CRC-32C of the bytes), each holding an
``Event`` protocol buffer; a scalar is ``Event{wall_time=1, step=2, summary=5{value=1{tag=1, simple_value=2}}}``.
The file is named ``events.out.tfevents.<time>.<host>``, as TensorBoard's reader looks for it.
"""
from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path


def _crc32c_table() -> list[int]:
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    c = crc32c(data)
    return struct.pack("<I", (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    out = bytearray()
    n &= (1 << 64) - 1
    while True:
        b, n = n & 0x7F, n >> 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:  # a length-delimited field (wire type 2)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def event(step: int, scalars: dict[str, float] | None = None, version: str | None = None) -> bytes:
    """One ``Event`` message: the file's version record, or the scalars of one step."""
    out = b"\x09" + struct.pack("<d", time.time())  # wall_time: field 1, 64-bit
    out += _varint(2 << 3) + _varint(step)  # step: field 2, varint
    if version is not None:
        out += _field(3, version.encode())
    if scalars:
        values = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", float(v)))
                          for tag, v in scalars.items())
        out += _field(5, values)
    return out


class Board:
    """Rank 0's event file in the run folder (``enabled=False``: writes nothing)."""

    def __init__(self, folder: Path | None, enabled: bool = True):
        self.file = None
        if folder is not None and enabled:
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
            self.file = open(Path(folder) / name, "ab")
            self._write(event(0, version="brain.Event:2"))

    def _write(self, data: bytes) -> None:
        head = struct.pack("<Q", len(data))
        self.file.write(head + _masked(head) + data + _masked(data))

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.file is not None:
            self._write(event(step, {k: v for k, v in values.items() if v is not None}))
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
