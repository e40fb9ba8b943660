"""The convert progress bar's ETA: mean seconds per layer since the first layer began, times the layers left."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import Progress

from llama4_quant.cli.common import EtaColumn
from llama4_quant.cli.convert_cmd import RichProgress


def test_eta_after_the_first_layer_is_the_mean_layer_time_times_what_is_left():
    prog = Progress(EtaColumn(), console=Console(file=open("/dev/null", "w")), disable=True)
    rp = RichProgress(prog)
    rp.start(10)
    time.sleep(0.3)  # embeddings: not a layer, must not count
    for i, seconds in enumerate((0.2, 0.4)):
        rp.layer_start(i, 4)
        for e in range(4):
            rp.expert_done(i, e)
        time.sleep(seconds)
        rp.layer_done(i)
        task = prog.tasks[0]
        mean = (0.2, 0.3)[i]
        assert abs(task.fields["eta"] - mean * (10 - i - 1)) < 0.25 * mean * (10 - i - 1), task.fields
    assert str(EtaColumn().render(task)) == time.strftime("%-H:%M:%S", time.gmtime(round(task.fields["eta"])))
