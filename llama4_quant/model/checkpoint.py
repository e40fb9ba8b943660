"""The reader interface shared by every checkpoint layout (HF safetensors, Meta .pth, GGUF, compressed-tensors).

Readers speak canonical tensor names (see model/tensors.py) and never load more than the tensor asked for;
experts can be read one at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .arrays import count_nonfinite
from .config import Llama4Config
from .tensors import expected_shapes


def check_inside(root: Path, fname: str, what: str) -> None:
    """Refuse a file name that leaves the checkpoint directory `root`: absolute, with '..', or a symlink whose
    target lies outside (a Hugging Face cache snapshot's links into its repo's blobs/ are allowed). Call it
    before opening any file a checkpoint's own metadata names."""
    rel = Path(fname)
    if rel.is_absolute() or ".." in rel.parts or "\\" in fname:
        raise CheckpointError(f"{root}: {what} points outside the model directory; refusing to open it")
    base = Path(root).resolve()
    allowed = [base] + [a.parent.parent / "blobs" for a in (base, *base.parents) if a.parent.name == "snapshots"]
    target = (base / rel).resolve()
    if not any(target == a or a in target.parents for a in allowed):
        raise CheckpointError(f"{root}: {what} is a link to {target}, outside the model directory; refusing to open it")


@dataclass
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: str


class CheckpointReader:
    """Base class: subclasses implement `_read`, `_read_expert`, `_shape`, `_has`."""

    config: Llama4Config
    path: Path
    layout: str = "?"

    # -- to implement ---------------------------------------------------------------
    def _has(self, name: str) -> bool:
        raise NotImplementedError

    def _shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def _read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def _read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor:
        """Expert e's `kind` matrix ([out, in]); default slices the stacked tensor."""
        return self._read(f"layers.{layer}.experts.{kind}")[e]

    def _read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of a 2-D tensor; default reads the whole tensor (readers that can slice override it)."""
        return self._read(name)[r0:r1].clone()

    def vision_tensors(self) -> list[TensorInfo]:
        return []

    def source_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def close(self) -> None:
        pass

    def file_ranges(self, layer: int | str | None) -> list[tuple[Path, int, int]]:
        """(file, offset, length) of what decoder layer `layer` reads (None: the final norm and the head;
        "embeddings": the embedding table), for `model.readahead`; readers that do not know their byte ranges
        return none."""
        return []

    def release(self) -> None:
        """Drop memory maps of what was read so far (they reopen lazily on the next read). Called after
        every layer: mapped pages count as resident memory and would grow to the whole checkpoint."""

    # -- public ---------------------------------------------------------------------
    def read(self, name: str) -> torch.Tensor:
        if name == "output" and self.config.tie_word_embeddings:
            name = "tok_embeddings"
        t = self._read(name)
        self._check_finite(name, t)
        return t

    def read_rows(self, name: str, r0: int, r1: int) -> torch.Tensor:
        """Rows r0:r1 of the 2-D tensor `name` (the embeddings and head are read in row blocks)."""
        if name == "output" and self.config.tie_word_embeddings:
            name = "tok_embeddings"
        t = self._read_rows(name, r0, r1)
        self._check_finite(f"{name}[{r0}:{r1}]", t)
        return t

    def read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor:
        t = self._read_expert(layer, kind, e)
        self._check_finite(f"layers.{layer}.experts.{kind}[{e}]", t)
        return t

    def _check_finite(self, name: str, t: torch.Tensor) -> None:
        bad = count_nonfinite(t)
        if bad:
            raise CheckpointError(f"{self.path}: tensor {name} holds {bad} NaN/inf values (corrupt checkpoint?)")

    def validate(self) -> None:
        """Every tensor the config implies exists with the right shape (metadata only, no data read)."""
        for name, shape in expected_shapes(self.config).items():
            if not self._has(name):
                raise CheckpointError(f"{self.path}: missing tensor {self.describe(name)} (incomplete checkpoint?)")
            got = tuple(self._shape(name))
            if got != shape:
                raise CheckpointError(
                    f"{self.path}: tensor {self.describe(name)} has shape {list(got)}, config implies {list(shape)}"
                )

    def describe(self, name: str) -> str:
        """Name as the user's checkpoint spells it (for error messages)."""
        return name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TensorDictSource:
    """An in-memory WeightSource over canonical tensors (training fixtures, tests)."""

    def __init__(self, config: Llama4Config, tensors: dict[str, torch.Tensor]):
        self.config = config
        self.tensors = tensors

    def read(self, name: str) -> torch.Tensor:
        if name == "output" and self.config.tie_word_embeddings:
            name = "tok_embeddings"
        return self.tensors[name]

    def read_expert(self, layer: int, kind: str, e: int) -> torch.Tensor:
        return self.tensors[f"layers.{layer}.experts.{kind}"][e]
