"""Persisted `fit` state in the Rust SDK's format (`tessera_sdk::state`): a
version byte, then the value in postcard's encoding, so a Python port of a
Rust strategy writes the same bytes. postcard is written by hand here for
the shapes strategies keep (unsigned integers, booleans, strings, byte
strings, sequences, tuples and structs as their fields in order); it is
small and fixed (https://postcard.jamesmunns.com/wire-format).
Pure Python: usable and testable outside a component.
"""

from __future__ import annotations

from typing import Callable, List, Tuple, TypeVar

from .config import ConfigError

T = TypeVar("T")


class Writer:
    """Appends postcard-encoded values."""

    def __init__(self) -> None:
        self.out = bytearray()

    def varint(self, n: int) -> "Writer":
        if n < 0:
            raise ValueError("postcard varints are unsigned here")
        while True:
            b = n & 0x7F
            n >>= 7
            self.out.append(b | (0x80 if n else 0))
            if not n:
                return self

    def boolean(self, b: bool) -> "Writer":
        self.out.append(1 if b else 0)
        return self

    def string(self, s: str) -> "Writer":
        data = s.encode("utf-8")
        self.varint(len(data))
        self.out += data
        return self

    def seq(self, items, each: Callable[["Writer", object], object]) -> "Writer":
        self.varint(len(items))
        for x in items:
            each(self, x)
        return self


class Reader:
    """Reads postcard-encoded values; a malformed input raises `ValueError`."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            raise ValueError("state ends early")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def varint(self) -> int:
        n, shift = 0, 0
        while True:
            b = self.byte()
            n |= (b & 0x7F) << shift
            if not b & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise ValueError("varint too long")

    def boolean(self) -> bool:
        b = self.byte()
        if b > 1:
            raise ValueError(f"bad boolean byte {b}")
        return b == 1

    def string(self) -> str:
        n = self.varint()
        if self.pos + n > len(self.data):
            raise ValueError("string runs past the end")
        s = self.data[self.pos : self.pos + n].decode("utf-8")
        self.pos += n
        return s

    def seq(self, each: Callable[["Reader"], T]) -> List[T]:
        return [each(self) for _ in range(self.varint())]


def save(version: int, write: Callable[[Writer], object]) -> bytes:
    """The state bytes: `version`, then what `write` encodes."""
    w = Writer()
    write(w)
    return bytes([version]) + bytes(w.out)


def load(version: int, data, read: Callable[[Reader], T]):
    """The value `read` decodes from `data` (`None` when there is no state).
    Other versions or undecodable bytes are the caller's to fix (run `fit`
    again): a `ConfigError`, reported as `invalid-params`, as in Rust."""
    if data is None:
        return None
    if len(data) == 0 or data[0] != version:
        raise ConfigError(f"stored fit state is not version {version}; run fit again")
    try:
        r = Reader(bytes(data[1:]))
        return read(r)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"stored fit state does not decode ({e}); run fit again") from None
