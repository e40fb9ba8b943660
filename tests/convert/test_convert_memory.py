"""Peak RSS of `convert` does not grow with the number of layers: the pipeline holds one layer at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# Runs the CLI as a child and prints the child's peak RSS (KiB): a fresh parent per measurement, so no
# other subprocess of the test session pollutes RUSAGE_CHILDREN.
_MEASURE = (
    "import resource, subprocess, sys;"
    "r = subprocess.run([sys.executable, '-m', 'llama4_quant', *sys.argv[1:]], capture_output=True, text=True);"
    "sys.stderr.write(r.stderr);"
    "print(json.dumps({'rc': r.returncode, 'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))"
)


def _peak(args: list[str]) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", "import json;" + _MEASURE, *args], capture_output=True, text=True,
                       env=env, timeout=600)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["rc"] == 0, r.stderr
    print(args[2], res["maxrss_kib"] >> 10, "MiB")
    return res["maxrss_kib"] * 1024


def _size(path) -> int:
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


@pytest.mark.slow
def test_peak_rss_independent_of_depth(model_factory, tmp_path):
    kw = dict(hidden=256, inter=512, experts=4, max_shard_bytes=8 << 20)
    small = model_factory(tmp_path / "l4", layers=4, **kw)
    big = model_factory(tmp_path / "l16", layers=16, **kw)
    common = ["--calib", str(small / "calib.txt"), "--calib-samples", "4", "--calib-seqlen", "64",
              "--max-shard-size", "16MB", "--device", "cpu"]
    peak_small = _peak(["convert", str(small), str(tmp_path / "o4"), *common])
    peak_big = _peak(["convert", str(big), str(tmp_path / "o16"), *common])
    grown = _size(big) - _size(small)
    assert grown > 48 << 20  # the 16-layer model is ~53 MB bigger (bf16)
    # one layer is ~4.4 MB in bf16 (~9 MB as fp32 compute copies): allow well under the size difference
    assert peak_big - peak_small < grown / 4, (peak_small, peak_big, grown)
