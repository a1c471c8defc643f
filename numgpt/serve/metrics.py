"""Thread-safe counters, gauges and histograms rendered in the Prometheus text format.

The server's engine thread and its event loop both update these, so every update takes a
lock. No dependency: the text exposition format (version 0.0.4) is a few lines of code.
Misuse (wrong label names, a NaN observation, two metrics of one name) raises a
``numgpt.errors`` error naming the value and the fix, never a bare ``KeyError``::

    # HELP numgpt_tokens_generated_total Tokens generated.
    # TYPE numgpt_tokens_generated_total counter
    numgpt_tokens_generated_total 42
"""

from __future__ import annotations

import math
import threading
from typing import Iterable

from ..errors import ConfigError, InputError

__all__ = ["Counter", "Gauge", "Histogram", "Registry", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def _labels(names: tuple[str, ...], values: tuple[str, ...]) -> str:
    """``{a="x",b="y"}`` with Prometheus escaping, or ``""`` when there are no labels."""
    if not names:
        return ""
    esc = (v.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"') for v in values)
    return "{" + ",".join(f'{n}="{v}"' for n, v in zip(names, esc)) + "}"


def _num(x: float) -> str:
    """A sample value as Prometheus writes it (``+Inf``, integers without ``.0``)."""
    if math.isinf(x):
        return "+Inf" if x > 0 else "-Inf"
    return str(int(x)) if float(x).is_integer() else repr(float(x))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        self.name, self.help = name, help
        self.labelnames = tuple(labelnames)
        self._lock = threading.Lock()

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise InputError(f"{self.name} takes the labels {list(self.labelnames)}, got "
                             f"{sorted(labels)}; pass exactly those as keyword arguments")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    """A value that only goes up (per label set)."""

    kind = "counter"

    def __init__(self, name: str, help: str, labelnames: Iterable[str] = ()):
        super().__init__(name, help, labelnames)
        self._values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._values.items())
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {_num(v)}"
                                for k, v in items]


class Gauge(_Metric):
    """A value that goes up and down; ``set_max`` keeps the largest value seen."""

    kind = "gauge"

    def __init__(self, name: str, help: str):
        super().__init__(name, help)
        self._value = 0.0

    def set(self, value: float) -> None:
        with self._lock:
            self._value = float(value)

    def set_max(self, value: float) -> None:
        with self._lock:
            self._value = max(self._value, float(value))

    def value(self) -> float:
        with self._lock:
            return self._value

    def render(self) -> list[str]:
        return self.header() + [f"{self.name} {_num(self.value())}"]


class Histogram(_Metric):
    """Counts of observations at or below each bucket bound, plus their sum and count."""

    kind = "histogram"

    def __init__(self, name: str, help: str, buckets: Iterable[float]):
        super().__init__(name, help)
        self.bounds = tuple(sorted(float(b) for b in buckets)) + (math.inf,)
        self._counts = [0] * len(self.bounds)  # per bucket, not cumulative
        self._sum = 0.0

    def observe(self, value: float, times: int = 1) -> None:
        """Record ``value`` ``times`` times (e.g. one step time for each token it produced)."""
        if math.isnan(value):  # NaN is <= no bound, so it has no bucket to count in
            raise InputError(f"{self.name} observed NaN; observe a number (a duration, a size)")
        i = next(i for i, b in enumerate(self.bounds) if value <= b)
        with self._lock:
            self._counts[i] += times
            self._sum += value * times

    def count(self, above: float = -math.inf) -> int:
        """How many observations were strictly greater than ``above`` (bucket resolution)."""
        with self._lock:
            return sum(c for b, c in zip(self.bounds, self._counts) if b > above)

    def render(self) -> list[str]:
        with self._lock:
            counts, total = list(self._counts), self._sum
        lines, running = self.header(), 0
        for bound, c in zip(self.bounds, counts):
            running += c
            lines.append(f'{self.name}_bucket{{le="{_num(bound)}"}} {running}')
        lines += [f"{self.name}_sum {_num(total)}", f"{self.name}_count {running}"]
        return lines


class Registry:
    """An ordered collection of metrics rendered together."""

    def __init__(self) -> None:
        self._metrics: list[_Metric] = []

    def add(self, metric: _Metric) -> _Metric:
        if any(m.name == metric.name for m in self._metrics):  # Prometheus rejects the page
            raise ConfigError(f"a metric named {metric.name!r} is already registered; give the "
                              f"new one another name")
        self._metrics.append(metric)
        return metric

    def render(self) -> str:
        return "\n".join(line for m in self._metrics for line in m.render()) + "\n"
