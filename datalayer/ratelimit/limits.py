"""Limits, decisions, and the ``DATALAYER_RATE_LIMITS`` syntax.

A :class:`Limit` of ``rate`` requests per ``period_s`` with ``burst`` is turned once into
two integers every backend computes with: ``interval_us``, the credit one request costs
(``period_s / rate``, rounded to a whole microsecond, at least 1), and ``capacity``,
``rate + burst`` requests. A fresh key can spend ``capacity`` at once; after that one
request passes per ``interval_us``. All backends do the same integer arithmetic on the
server's clock in microseconds, so they agree to the request.

Settings syntax (entries separated by ``;`` or new lines)::

    NAME=RATE/PERIOD [burst B] [token_bucket|gcra] [fail_open|fail_closed] [by DIM[,DIM…]]

``PERIOD`` is a number with a unit (``ms``, ``s``, ``m``, ``h``, ``d``); the number may be
left out (``100/s``). ``DIM`` is ``org``, ``user`` or ``ip``. ``default`` names the limit
of operations without their own. Example::

    login=5/60s burst 0 fail_closed by ip; api=100/1s burst 50 gcra; default=1000/1m
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

from datalayer.core.errors import ConfigError, ValidationError

__all__ = [
    "ALGORITHMS",
    "DEFAULT_RATE_LIMITS",
    "DIMENSIONS",
    "Algorithm",
    "Decision",
    "Dimension",
    "Limit",
    "Outcome",
    "parse_limits",
]

Algorithm = Literal["token_bucket", "gcra"]
Dimension = Literal["org", "user", "ip"]
ALGORITHMS: tuple[Algorithm, ...] = ("token_bucket", "gcra")
DIMENSIONS: tuple[Dimension, ...] = ("org", "user", "ip")
DEFAULT_RATE_LIMITS = "default=100/1s burst 50"

# Redis scripts compute in Lua numbers (doubles): integers are exact below 2**53, and so
# must be every value a check can produce (epoch microseconds are about 2**51).
_MAX_CREDIT_US = 2**50
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_OPERATION = re.compile(r"[A-Za-z0-9_.:-]{1,64}")
_ENTRY = re.compile(r"(?P<name>[^=\s]+)\s*=\s*(?P<rate>\d+)\s*/\s*(?P<num>\d+(?:\.\d+)?)?"
                    r"(?P<unit>ms|s|m|h|d)\b\s*(?P<rest>.*)")


@dataclass(frozen=True, slots=True)
class Limit:
    """``rate`` requests per ``period_s`` seconds, plus ``burst`` on top for a fresh key.

    ``fail_open``: when the backend cannot be reached within its timeout, allow (True) or
    deny (False). ``by`` picks the key's dimensions (each then required); None keys by
    whichever of organization, user and IP the caller passes.
    """

    rate: int
    period_s: float
    burst: int = 0
    algorithm: Algorithm = "token_bucket"
    fail_open: bool = True
    by: tuple[Dimension, ...] | None = None
    interval_us: int = field(init=False, repr=False, compare=False)
    capacity: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.rate, bool) or not isinstance(self.rate, int) or self.rate < 1:
            raise ValidationError("Limit.rate must be an integer >= 1")
        if isinstance(self.burst, bool) or not isinstance(self.burst, int) or self.burst < 0:
            raise ValidationError("Limit.burst must be an integer >= 0")
        if not isinstance(self.period_s, int | float) or not self.period_s > 0:
            raise ValidationError("Limit.period_s must be > 0 seconds")
        if self.algorithm not in ALGORITHMS:
            raise ValidationError(f"Limit.algorithm must be one of {', '.join(ALGORITHMS)}")
        if self.by is not None:
            if not self.by or any(d not in DIMENSIONS for d in self.by) \
                    or len(set(self.by)) != len(self.by):
                raise ValidationError("Limit.by must name distinct dimensions of "
                                      f"{', '.join(DIMENSIONS)}")
            object.__setattr__(self, "by", tuple(d for d in DIMENSIONS if d in self.by))
        interval = round(self.period_s * 1_000_000 / self.rate)
        if interval < 1:
            raise ValidationError("Limit: more than one request per microsecond "
                                  "(rate / period_s above 1,000,000/s)")
        capacity = self.rate + self.burst
        if capacity * interval > _MAX_CREDIT_US:
            raise ValidationError("Limit: (rate + burst) * period / rate is too large "
                                  "(over ~35 years of credit)")
        object.__setattr__(self, "interval_us", interval)
        object.__setattr__(self, "capacity", capacity)

    @classmethod
    def parse(cls, text: str) -> Limit:
        """``RATE/PERIOD [burst B] [algorithm] [fail mode] [by DIMS]``; ConfigError if bad."""
        limits = parse_limits(f"x={text}", variable="limit")
        return limits["x"]


@dataclass(frozen=True, slots=True)
class Decision:
    """The answer to one check. Times are seconds.

    ``remaining``: requests that could pass right after this one. ``retry_after``: until a
    request of this cost could pass (0 when allowed). ``reset_after``: until the key is
    back to a full bucket. ``degraded``: decided without the backend (it was unreachable),
    by the limit's fail mode.
    """

    allowed: bool
    remaining: int
    retry_after: float
    reset_after: float
    degraded: bool = False


class Outcome(NamedTuple):
    """What a backend returns: microseconds, and the server time the check used."""

    allowed: bool
    remaining: int
    retry_after_us: int
    reset_after_us: int
    now_us: int


def parse_limits(text: str, *, variable: str = "DATALAYER_RATE_LIMITS") -> dict[str, Limit]:
    """Parse the settings syntax (module docstring) into ``{operation: Limit}``.

    Raises ``ConfigError`` naming ``variable`` and the entry at fault.
    """
    limits: dict[str, Limit] = {}
    entries = [e.strip() for e in re.split(r"[;\n]", text)]
    for i, entry in enumerate((e for e in entries if e), start=1):
        where = f"{variable} entry {i} ({entry!r})"
        m = _ENTRY.fullmatch(entry)
        if m is None:
            raise ConfigError(f"{where} must look like 'name=RATE/PERIOD [burst B] "
                              "[token_bucket|gcra] [fail_open|fail_closed] [by org,user,ip]', "
                              "e.g. 'login=5/60s burst 0'")
        name = m["name"]
        if not _OPERATION.fullmatch(name):
            raise ConfigError(f"{where}: the name must be 1-64 letters, digits or ._:-")
        if name in limits:
            raise ConfigError(f"{variable} names {name!r} twice")
        kwargs: dict[str, object] = {}
        words = m["rest"].replace(",", " , ").split()
        j = 0
        while j < len(words):
            word = words[j]
            if word == "burst" and j + 1 < len(words) and words[j + 1].isdigit():
                kwargs["burst"] = int(words[j + 1])
                j += 2
            elif word in ALGORITHMS:
                kwargs["algorithm"] = word
                j += 1
            elif word in ("fail_open", "fail_closed"):
                kwargs["fail_open"] = word == "fail_open"
                j += 1
            elif word == "by":
                dims: list[str] = []
                j += 1
                while j < len(words) and (words[j] in DIMENSIONS or words[j] == ","):
                    if words[j] != ",":
                        dims.append(words[j])
                    j += 1
                if not dims:
                    raise ConfigError(f"{where}: 'by' needs one or more of org, user, ip")
                kwargs["by"] = tuple(dims)
            else:
                raise ConfigError(f"{where}: unexpected {word!r} (known: burst N, "
                                  "token_bucket, gcra, fail_open, fail_closed, by DIMS)")
        period = float(m["num"] or 1) * _UNITS[m["unit"]]
        try:
            limits[name] = Limit(int(m["rate"]), period, **kwargs)  # type: ignore[arg-type]
        except ValidationError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return limits
