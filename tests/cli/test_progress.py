"""The convert progress bar's ETA: convert.clock's estimate (mean seconds per layer since the first layer began,
times the layers left, plus the head's share of a layer's work), drawn by the CLI's bar, and recorded in the
conversion's report against what followed."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import Progress

from llama4_quant.cli.common import EtaColumn
from llama4_quant.cli.convert_cmd import RichProgress
from llama4_quant.convert.clock import DESCENT_WORK, LayerClock, tail_share, tensor_work
from support.convert import convert, gguf


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_eta_is_the_mean_layer_time_times_what_is_left_plus_the_tail():
    now = FakeTime()
    clock = LayerClock(10, tail=0.5, now=now)
    now.t += 30  # embeddings: before the first layer, not counted
    etas = []
    for seconds in (20.0, 40.0, 30.0):
        clock.layer_start()
        now.t += seconds
        etas.append(clock.layer_done())
    assert etas == [20.0 * 9.5, 30.0 * 8.5, 30.0 * 7.5]
    now.t += 5
    rep = clock.report()
    assert rep["layer_seconds"] == [20.0, 40.0, 30.0]
    assert rep["eta_seconds"] == etas
    assert rep["remaining_seconds"] == [75.0, 35.0, 5.0]


def test_eta_scales_the_seconds_per_unit_of_work_to_the_work_left():
    """Layers of unequal work (q4_k_m: Q4_K down projections with the router-aware descent in some layers, Q6_K
    in others): the first layer's seconds per unit of work, times the work of the layers left and the head."""
    now = FakeTime()
    clock = LayerClock(3, tail=0.5, now=now, works=[3.0, 1.0, 2.0])  # mean work 2: the tail is 1 unit
    clock.layer_start()
    now.t += 30.0  # 10 s per unit
    assert clock.layer_done() == 10.0 * (1.0 + 2.0 + 1.0)
    clock.layer_start()
    now.t += 10.0
    assert clock.layer_done() == 40.0 / 4.0 * (2.0 + 1.0)
    # unusable work lists fall back to counting layers alike
    assert LayerClock(3, works=[1.0, 0.0, 1.0]).works is None and LayerClock(3, works=[1.0]).works is None


def test_work_counts_gptq_as_rows_times_cols_squared():
    assert tensor_work((8, 4), 1, calibrated=False) == 32
    assert tensor_work((8, 4), 3, calibrated=True) == 3 * 8 * 16
    assert tensor_work((8, 4), 1, calibrated=True, descent=True) == (1 + DESCENT_WORK) * 8 * 16
    assert tensor_work((8, 4), 1, calibrated=False, descent=True) == 32
    assert tail_share([10.0, 30.0], 10.0) == 0.5
    assert tail_share([], 10.0) == 0.0


def test_the_bar_shows_the_pipelines_eta():
    prog = Progress(EtaColumn(), console=Console(file=open("/dev/null", "w")), disable=True)
    rp = RichProgress(prog)
    rp.start(10, tokens=1000)
    rp.layer_start(0, 4)
    for e in range(4):
        rp.expert_done(0, e)
    rp.layer_done(0, 3725.0)
    task = prog.tasks[0]
    assert task.fields["eta"] == 3725.0 and task.completed == 1
    assert "tok/s" in task.description
    assert str(EtaColumn().render(task)) == "1:02:05"


def test_a_conversion_reports_its_estimates(tiny_checkpoints, trained_model, tmp_path):
    summary = convert(tiny_checkpoints[("scout", "hf")], tmp_path / "out", scheme="w4a16", method="rtn",
                      group_size=32)
    rtn_tail = summary["timing"]["tail_layers"]
    assert 0 < rtn_tail < 1  # the head, copied: its elements against a layer's
    summary = gguf(trained_model, tmp_path / "m.gguf", scheme="q4_k_m", method="rtn")
    timing = summary["timing"]
    n = len(timing["layer_seconds"])
    assert n >= 2 and len(timing["eta_seconds"]) == n == len(timing["remaining_seconds"])
    assert timing["remaining_seconds"] == sorted(timing["remaining_seconds"], reverse=True)
    assert timing["tail_layers"] > 0  # the quantized head
    assert all(x >= 0 for x in timing["eta_seconds"])


def test_gguf_work_per_element_follows_the_type_and_the_importance(trained_model, tmp_path):
    """Rounding-only GGUF: a Q4_K search costs more per element than Q6_K's, three times as much with importance
    weights, so the clock weighs layers with Q6_K down projections and the Q6_K head below Q4_K layers."""
    from llama4_quant.convert.gguf import GGUFExporter
    from llama4_quant.model.readers import open_checkpoint
    from llama4_quant.model.tensors import tensor_specs

    with open_checkpoint(trained_model) as src:
        ex = GGUFExporter(tmp_path / "m.gguf", "q4_k_m")
        ex.prepare(src)
        specs = {s.name: s for s in tensor_specs(src.config)}
        types = {n: ex.plan[n].qtype.name for n in specs if n in ex.plan}
        q4 = next(specs[n] for n, t in types.items() if t == "Q4_K" and specs[n].num_experts)
        head = specs["output"]
        assert types["output"] == "Q6_K"
        plain = ex.encode_cost(q4), ex.encode_cost(head)
        ex.imatrix = object()  # any importance: only its presence changes the search
        weighted = ex.encode_cost(q4), ex.encode_cost(head)
    assert plain[0] > plain[1] and weighted[1] == plain[1] and weighted[0] > 1.5 * plain[0]
