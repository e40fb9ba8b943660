"""Reading the next layer ahead: the ranges an HF reader gives are exactly its tensors' bytes, the background
reader reads them (and shrugs off files it cannot read), and a conversion asks for every layer, then the head, in
order, one step ahead of the layer it works on."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from llama4_quant.convert import pipeline as pipeline_mod
from llama4_quant.model.readahead import Readahead, coalesce
from llama4_quant.model.readers import open_checkpoint
from support.convert import convert


def test_coalesce_sorts_and_merges_neighbours(tmp_path: Path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    got = coalesce([(b, 0, 10), (a, 100, 50), (a, 0, 100), (a, 10, 5), (a, 5000, 1), (b, 20, 0)], gap=1000)
    assert got == [(a, 0, 150), (a, 5000, 1), (b, 0, 10)]
    assert coalesce([(a, 0, 10), (a, 11, 10)], gap=0) == [(a, 0, 10), (a, 11, 10)]


def _wait(ahead: Readahead, want: int, timeout: float = 10.0) -> None:
    t0 = time.monotonic()
    while ahead.bytes_read < want and time.monotonic() - t0 < timeout:
        time.sleep(0.01)


def test_reads_every_byte_asked_and_skips_what_it_cannot(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("llama4_quant.model.readahead.CHUNK", 4096)  # many chunks per range
    f = tmp_path / "data.bin"
    f.write_bytes(bytes(range(256)) * 1000)  # 256,000 bytes
    with Readahead() as ahead:
        ahead.want([(tmp_path / "missing.bin", 0, 100), (f, 1000, 50_000)])
        ahead.want([(f, 200_000, 100_000)])  # runs past the end of the file: reads what is there
        _wait(ahead, 50_000 + 56_000)
        assert ahead.bytes_read == 50_000 + 56_000
    ahead.want([(f, 0, 10)])  # after close: ignored, no error
    assert ahead.bytes_read == 106_000


def test_close_is_prompt_with_work_queued(tmp_path: Path) -> None:
    f = tmp_path / "big.bin"
    with open(f, "wb") as fh:
        fh.truncate(64 << 20)  # sparse
    ahead = Readahead()
    ahead.want([(f, 0, 64 << 20)] * 20)
    t0 = time.monotonic()
    ahead.close()
    assert time.monotonic() - t0 < 5
    assert not ahead._thread.is_alive()


def _tensor_bytes(path: Path) -> dict[str, tuple[str, int, int]]:
    """{hf name: (file, absolute offset, length)} read from the shards' own headers."""
    out = {}
    for f in sorted(path.glob("*.safetensors")):
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        for k, v in header.items():
            if k != "__metadata__":
                b, e = v["data_offsets"]
                out[k] = (f.name, 8 + n + b, e - b)
    return out


def test_hf_file_ranges_are_the_layer_tensors(tiny_checkpoints) -> None:
    path = tiny_checkpoints[("scout", "hf")]
    truth = _tensor_bytes(path)
    with open_checkpoint(path) as r:
        seen = set()
        for layer in range(r.config.num_layers):
            got = {(p.name, o, n) for p, o, n in r.file_ranges(layer)}
            want = {v for k, v in truth.items() if f"layers.{layer}." in k and "vision" not in k}
            assert got == want and want, layer
            seen |= got
        head = {(p.name, o, n) for p, o, n in r.file_ranges(None)}
        assert head == {v for k, v in truth.items() if k.endswith("lm_head.weight") or k.endswith("model.norm.weight")}
        assert len(head) == 2 and not head & seen
        emb = {(p.name, o, n) for p, o, n in r.file_ranges("embeddings")}
        assert emb == {v for k, v in truth.items() if k.endswith("embed_tokens.weight")} and len(emb) == 1


@pytest.mark.parametrize("layout", ["meta"])
def test_readers_without_byte_ranges_give_none(tiny_checkpoints, layout: str) -> None:
    with open_checkpoint(tiny_checkpoints[("scout", layout)]) as r:
        assert r.file_ranges(0) == [] and r.file_ranges(None) == []


def test_conversion_reads_one_layer_ahead(tiny_checkpoints, tmp_path: Path, monkeypatch) -> None:
    events: list = []
    real_want, real_layer = Readahead.want, pipeline_mod.Pipeline._layer

    def want(self, ranges):
        events.append(("want", sorted({p.name for p, _, _ in ranges}), sum(n for _, _, n in ranges)))
        real_want(self, ranges)

    def layer(self, i, *a, **kw):
        events.append(("layer", i))
        return real_layer(self, i, *a, **kw)

    monkeypatch.setattr(Readahead, "want", want)
    monkeypatch.setattr(pipeline_mod.Pipeline, "_layer", layer)
    path = tiny_checkpoints[("scout", "hf")]
    with open_checkpoint(path) as r:
        n_layers = r.config.num_layers
        sizes = [sum(n for _, _, n in r.file_ranges(i)) for i in ["embeddings", *range(n_layers), None]]
    convert(path, tmp_path / "out", scheme="w4a16", method="rtn", group_size=32)
    wants = [e[2] for e in events if e[0] == "want"]
    assert wants == sizes  # the embeddings and layer 0 before anything, then i + 1 as layer i starts, the head last
    layers_at = [k for k, e in enumerate(events) if e[0] == "layer"]
    want_at = [k for k, e in enumerate(events) if e[0] == "want"]
    assert all(want_at[i + 2] < layers_at[i] for i in range(n_layers))
