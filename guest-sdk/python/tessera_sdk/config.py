"""A strategy's configuration: the manifest's `[config]`, overridden by the
request's decoding parameters and its `config` pairs, read with typed,
range-checked accessors whose errors name the key, the value and the fix.
Pure Python: usable and testable outside a component.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Tuple, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value that cannot be used; `str()` names the key, the
    value and what to write instead. The SDK's exports turn it into the
    host's `invalid-params` error (the caller's fault)."""


def invalid(key: str, value: object, why: str) -> ConfigError:
    """The error for `key` = `value`, saying `why`."""
    return ConfigError(f"config `{key}` = `{value}`: {why}")


_TYPE_NAMES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("true", "1", "yes"):
        return True
    if t in ("false", "0", "no"):
        return False
    raise ValueError(text)


class Config:
    """Key/value pairs where the last one given for a key wins."""

    def __init__(self, pairs: Sequence[Tuple[str, str]] = ()):
        self.pairs: List[Tuple[str, str]] = list(pairs)

    @classmethod
    def for_request(cls, req) -> "Config":
        """The request's decoding parameters (`max_tokens`, `temperature`,
        `top_p`, `top_k`) as pairs, then its `config` pairs (which win)."""
        p = req.params
        pairs: List[Tuple[str, str]] = []
        for key in ("max_tokens", "temperature", "top_p", "top_k"):
            v = getattr(p, key)
            if v is not None:
                pairs.append((key, str(v)))
        pairs.extend(req.config)
        return cls(pairs)

    def get(self, key: str) -> Optional[str]:
        """The raw value of `key`, if given."""
        for k, v in reversed(self.pairs):
            if k == key:
                return v
        return None

    def parse(self, key: str, default: T, kind: Optional[Callable[[str], T]] = None) -> T:
        """`key` read as the type of `default` (or `kind`), `default` when absent."""
        raw = self.get(key)
        if raw is None:
            return default
        kind = kind or type(default)
        if kind is bool:
            kind = _bool
        try:
            return kind(raw.strip())
        except (TypeError, ValueError):
            name = _TYPE_NAMES.get(type(default), getattr(kind, "__name__", "value"))
            raise ConfigError(f"config `{key}` = `{raw}` is not a valid {name}") from None

    def parse_within(self, key: str, default: T, low: T, high: T, why: str, *, open_low: bool = False) -> T:
        """`parse`, then checked against [low, high] (or (low, high] with
        `open_low`); the error says `why`."""
        v = self.parse(key, default)
        if (v > low if open_low else v >= low) and v <= high:
            return v
        raise invalid(key, v, why)

    def numbers(self, key: str, count: int, what: str) -> Optional[List[float]]:
        """A comma-separated list of exactly `count` numbers, one per `what`."""
        raw = (self.get(key) or "").strip()
        if not raw:
            return None
        try:
            values = [float(x.strip()) for x in raw.split(",")]
        except ValueError:
            raise invalid(key, raw, "use comma-separated numbers") from None
        if len(values) != count:
            raise invalid(key, raw, f"give {count} numbers, one per {what} (got {len(values)})")
        return values
