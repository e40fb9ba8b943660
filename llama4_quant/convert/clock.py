"""Wall time per decoder layer and the time-left estimate the progress bar shows.

After each layer: the mean time of the layers done so far times the layers left, plus the work after the last
layer (the head) in units of an average layer's work (`tail`). Work is counted per quantized tensor as
GPTQ does it, rows x cols^2 (one block update per column pair), or rows x cols for a rounding-only method; the
embedding table, done before the first layer, is not part of any estimate. The conversion's report records what
was estimated against what followed, so the estimate's error is measured on every run (bench/bench_scale.py
prints it).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable


def tensor_work(shape: tuple[int, ...], copies: int, calibrated: bool) -> float:
    """The work of quantizing `copies` matrices of `shape` ([out, in])."""
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    cols = shape[-1]
    return float(copies) * rows * cols * (cols if calibrated else 1)


def tail_share(layer_work: Iterable[float], tail_work: float) -> float:
    """The work after the last layer, in units of a mean layer's."""
    works = list(layer_work)
    mean = sum(works) / len(works) if works else 0.0
    return tail_work / mean if mean > 0 else 0.0


class LayerClock:
    def __init__(self, num_layers: int, tail: float = 0.0, now=time.perf_counter):
        self.num_layers, self.tail, self._now = num_layers, tail, now
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.etas: list[float] = []

    def layer_start(self) -> None:
        self.starts.append(self._now())

    def layer_done(self) -> float:
        """Record the end of a layer; returns the estimated seconds left."""
        t = self._now()
        self.ends.append(t)
        done = len(self.ends)
        mean = (t - self.starts[0]) / done
        eta = mean * (max(0, self.num_layers - done) + self.tail)
        self.etas.append(eta)
        return eta

    def report(self) -> dict[str, Any]:
        """Seconds per layer; after each, the estimate shown and the seconds that in fact followed until now."""
        t = self._now()
        return {
            "layer_seconds": [round(e - s, 3) for s, e in zip(self.starts, self.ends)],
            "tail_layers": round(self.tail, 4),
            "eta_seconds": [round(x, 3) for x in self.etas],
            "remaining_seconds": [round(t - e, 3) for e in self.ends],
        }
