"""Layer-wise execution: all sequences go through layer 0, then layer 1, ... with only one decoder
layer's weights resident at a time. Hidden states of every sequence are kept (in RAM, or in a file on
disk when larger than a budget), so peak memory is one layer + activations, never the model."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator

import numpy as np
import torch

from .config import Llama4Config
from .forward import LayerWeights, Observer, WeightSource, decoder_layer, rms_norm

DEFAULT_SPILL_BYTES = int(os.environ.get("LLAMA4_QUANT_SPILL_BYTES", 4 << 30))
EMBED_BLOCK_ELEMENTS = 1 << 25  # embed() reads the table's rows in blocks of about this many weights


class ActivationStore:
    """Hidden states [N, T, H] (float32) for N sequences; memory-mapped to a temp file when large."""

    def __init__(self, n: int, T: int, H: int, spill_bytes: int = DEFAULT_SPILL_BYTES, spill_dir: str | None = None):
        self.shape = (n, T, H)
        nbytes = n * T * H * 4
        self._file = None
        if nbytes > spill_bytes:
            self._file = tempfile.NamedTemporaryFile(prefix="llama4q-act-", suffix=".f32", dir=spill_dir)
            arr = np.memmap(self._file.name, dtype=np.float32, mode="w+", shape=self.shape)
            self.data = torch.from_numpy(arr)
        else:
            self.data = torch.empty(self.shape, dtype=torch.float32)

    @property
    def spilled(self) -> bool:
        return self._file is not None

    def __len__(self) -> int:
        return self.shape[0]

    def get(self, sl: slice, device, dtype) -> torch.Tensor:
        return self.data[sl].to(device=device, dtype=dtype)

    def put(self, sl: slice, value: torch.Tensor) -> None:
        self.data[sl] = value.to("cpu", torch.float32)

    def close(self) -> None:
        self.data = None
        if self._file is not None:
            self._file.close()
            self._file = None


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        from ..errors import Llama4QuantError

        raise Llama4QuantError("--device cuda requested but no CUDA device is available")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[dtype]


def release(source) -> None:
    """Let a reader drop the memory maps of the layer just done (see CheckpointReader.release)."""
    fn = getattr(source, "release", None)
    if fn is not None:
        fn()


class LayerwiseRunner:
    """Runs token sequences [N, T] through a checkpoint one decoder layer at a time."""

    def __init__(self, source: WeightSource, device="cpu", dtype=torch.float32, batch_size: int = 4,
                 keep_experts: bool = True, spill_bytes: int = DEFAULT_SPILL_BYTES):
        self.source = source
        self.cfg: Llama4Config = source.config
        self.device = torch.device(device)
        self.dtype = dtype
        self.batch_size = batch_size
        self.keep_experts = keep_experts
        self.spill_bytes = spill_bytes

    def batches(self, n: int) -> Iterator[slice]:
        for s in range(0, n, self.batch_size):
            yield slice(s, min(n, s + self.batch_size))

    def embed(self, tokens: torch.Tensor) -> ActivationStore:
        return self.fill(*self.embedding_rows(tokens))

    def embedding_rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows [U, H] float32: the embedding of each distinct token id, inverse [N, T]: the row of each token).
        Only the rows the tokens use are read, a block of the table at a time: memory stays at one block, not the
        202,048 x 5,120 table (2 GB in bf16)."""
        N, T = tokens.shape
        if int(tokens.max()) >= self.cfg.vocab_size or int(tokens.min()) < 0:
            from ..errors import Llama4QuantError

            raise Llama4QuantError(
                f"token id {int(tokens.max())} is outside the model's vocabulary of {self.cfg.vocab_size}"
                " (tokenizer does not match the model?)"
            )
        ids, inverse = torch.unique(tokens.reshape(-1), return_inverse=True)
        inverse = inverse.view(N, T)
        read_rows = getattr(self.source, "read_rows", None)
        if read_rows is None:
            return self.source.read("tok_embeddings")[ids].float(), inverse
        rows = torch.empty(ids.numel(), self.cfg.hidden_size, dtype=torch.float32)
        step = max(1, EMBED_BLOCK_ELEMENTS // self.cfg.hidden_size)
        for k0 in range(0, ids.numel()):
            if k0 and ids[k0 - 1] // step == ids[k0] // step:
                continue
            b0 = int(ids[k0]) // step * step
            b1 = min(self.cfg.vocab_size, b0 + step)
            block = read_rows("tok_embeddings", b0, b1)
            sel = torch.nonzero((ids >= b0) & (ids < b1)).squeeze(1)
            rows[sel] = block[ids[sel] - b0].float()
            del block
        return rows, inverse

    def fill(self, rows: torch.Tensor, inverse: torch.Tensor) -> ActivationStore:
        """A store of the hidden states rows[inverse] (see embedding_rows)."""
        N, T = inverse.shape
        store = ActivationStore(N, T, self.cfg.hidden_size, self.spill_bytes)
        for sl in self.batches(N):
            store.put(sl, rows[inverse[sl]])
        return store

    @contextmanager
    def layer(self, i: int) -> Iterator[LayerWeights]:
        w = LayerWeights(self.source, i, self.device, self.dtype, keep_experts=self.keep_experts)
        try:
            yield w
        finally:
            w.free()

    def forward_layer(self, i: int, w: LayerWeights, store: ActivationStore, out: ActivationStore | None = None,
                      observer: Observer | None = None, observe_all_experts: bool = False) -> None:
        """h <- layer_i(h) for every sequence (in place unless `out` is given)."""
        out = out or store
        with torch.no_grad():
            for sl in self.batches(len(store)):
                h = store.get(sl, self.device, self.dtype)
                out.put(sl, decoder_layer(self.cfg, i, w, h, observer, observe_all_experts))

    def run_layers(self, store: ActivationStore, on_layer: Callable[[int], None] | None = None) -> None:
        for i in range(self.cfg.num_layers):
            with self.layer(i) as w:
                self.forward_layer(i, w, store)
            release(self.source)
            if on_layer:
                on_layer(i)

    def head(self, store: ActivationStore, on_logits: Callable[[int, torch.Tensor], None]) -> None:
        """Final norm + lm_head, one sequence at a time: on_logits(n, logits [T, V] float32)."""
        norm = self.source.read("norm").to(self.device, self.dtype)
        out = self.source.read("output").to(self.device, self.dtype)
        with torch.no_grad():
            for n in range(len(store)):
                h = store.get(slice(n, n + 1), self.device, self.dtype)[0]
                logits = torch.nn.functional.linear(rms_norm(h, norm, self.cfg.rms_norm_eps), out)
                on_logits(n, logits.float())

    def logits(self, tokens: torch.Tensor, on_logits: Callable[[int, torch.Tensor], None],
               on_layer: Callable[[int], None] | None = None) -> None:
        store = self.embed(tokens)
        try:
            self.run_layers(store, on_layer)
            self.head(store, on_logits)
        finally:
            store.close()
