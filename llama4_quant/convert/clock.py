"""Wall time per decoder layer and the time-left estimate the progress bar shows.

After each layer: the seconds per unit of work of the layers done so far times the work left (the layers' and,
after the last layer, the head's). Work is counted per quantized tensor:

- GPTQ: rows x cols^2 (one block update per column pair), and `DESCENT_WORK` times that again where GPTQ's
  coordinate descent on the codes runs (the router-aware residual writers);
- rounding only: rows x cols times the exporter's cost per element for the tensor's type (`encode_cost`; with
  reading included, a Q4_K element with importance weights costs 2.3 times a Q6_K one).

Layers differ: in q4_k_m some layers' down projections are Q6_K and others Q4_K, and only the Q4_K ones, in
layers that have a later MoE layer, get the descent; so the first layer's seconds scale to each later layer by its
work. Without per-layer work every layer counts the same (the mean layer time times the layers left). The
embedding table, done before the first layer, is not part of any estimate. The conversion's report records what
was estimated against what followed, so the estimate's error is measured on every run (bench/bench_scale.py
prints it).
"""

from __future__ import annotations

import math
import time
from typing import Any, Iterable


# the descent's cost against its GPTQ job's, same matrix (its G = D H product plus two sweeps): 2 Scout-shaped
# q4_k_m layers, layer 0 with Q4_K down projections and the descent, layer 1 with Q6_K ones and none, differ by
# 389 s, 22.4 s per 5120 x 8192 descent against 13.3 s for the job's own work at layer 1's pace (docs/performance.md)
DESCENT_WORK = 1.7


def tensor_work(shape: tuple[int, ...], copies: int, calibrated: bool, descent: bool = False,
                cost: float = 1.0) -> float:
    """The work of quantizing `copies` matrices of `shape` ([out, in]); `descent`: GPTQ's coordinate descent too;
    `cost`: for rounding only, the exporter's relative time per element for the tensor's type (encode_cost)."""
    rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    cols = shape[-1]
    if not calibrated:
        return float(copies) * rows * cols * cost
    work = float(copies) * rows * cols * cols
    return work * (1 + DESCENT_WORK) if descent else work


def tail_share(layer_work: Iterable[float], tail_work: float) -> float:
    """The work after the last layer, in units of a mean layer's."""
    works = list(layer_work)
    mean = sum(works) / len(works) if works else 0.0
    return tail_work / mean if mean > 0 else 0.0


class LayerClock:
    """`tail`: the head's work in mean layers; `works`: each layer's work (None: all alike)."""

    def __init__(self, num_layers: int, tail: float = 0.0, now=time.perf_counter, works: list[float] | None = None):
        self.num_layers, self.tail, self._now = num_layers, tail, now
        if works is not None and (len(works) != num_layers or min(works, default=1.0) <= 0):
            works = None
        self.works = works
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
        works = self.works or [1.0] * self.num_layers
        mean_work = sum(works) / len(works) if works else 1.0
        did = sum(works[:done]) if done <= len(works) else float(done) * mean_work
        left = sum(works[done:]) + self.tail * mean_work
        eta = (t - self.starts[0]) / did * left
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
