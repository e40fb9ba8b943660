"""Importance matrices: llama-imatrix's statistic (mean x^2 per input column of every Linear; per routed expert
over the tokens routed to it) as one type, and the GGUF file llama-imatrix writes (`--output-format gguf`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ...errors import Llama4QuantError
from ...model.config import Llama4Config
from .names import canonical_name


@dataclass
class Imatrix:
    """Per canonical Linear: sum of x^2 per input column and the token count; routed experts per expert."""

    sums: dict[str, torch.Tensor]  # [cols] or [E, cols] float64
    counts: dict[str, torch.Tensor]  # [] or [E] int64

    def get(self, canonical: str, expert: int | None = None) -> np.ndarray | None:
        """mean x^2 per column (None when no token reached it)."""
        s, c = self.sums.get(canonical), self.counts.get(canonical)
        if s is None:
            return None
        if expert is not None:
            s, c = s[expert], c[expert]
        if int(c) == 0:
            return None
        return (s / float(c)).float().numpy()

    def tokens_per_expert(self, layer: int) -> list[int] | None:
        c = self.counts.get(f"layers.{layer}.experts.gate")
        return None if c is None else [int(x) for x in c]


def load_imatrix_file(path: str | Path, cfg: Llama4Config) -> Imatrix:
    """An importance matrix written by llama-imatrix (its GGUF format: `<tensor>.in_sum2` [E, cols] and
    `<tensor>.counts` [E] per matrix), keyed by our canonical names."""
    from gguf import GGUFReader


    path = Path(path)
    try:
        r = GGUFReader(str(path), "r")
    except Exception as e:  # gguf-py raises ValueError/IndexError/... on non-GGUF input
        raise Llama4QuantError(f"{path}: not a GGUF imatrix file ({e}); write it with llama-imatrix "
                               "--output-format gguf") from None
    kind = r.fields.get("general.type")
    if kind is None or kind.contents() != "imatrix":
        raise Llama4QuantError(f"{path}: not an imatrix GGUF (general.type is not 'imatrix')")
    data = {t.name: np.asarray(t.data, dtype=np.float64) for t in r.tensors}
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}
    for name, arr in data.items():
        if not name.endswith(".in_sum2"):
            continue
        base = name[: -len(".in_sum2")]
        try:
            canon = canonical_name(base)
        except KeyError:
            continue
        c = data.get(base + ".counts")
        if c is None:
            raise Llama4QuantError(f"{path}: {base} has sums but no counts")
        experts = canon.split(".")[-2] == "experts" if canon.startswith("layers.") else False
        s = torch.from_numpy(arr.reshape(-1, arr.shape[-1]) if experts else arr.reshape(-1))
        cnt = torch.from_numpy(np.rint(c.reshape(-1)).astype(np.int64))
        if experts and s.shape[0] != cfg.num_experts:
            raise Llama4QuantError(f"{path}: {base} has {s.shape[0]} experts, the model {cfg.num_experts}")
        sums[canon] = s
        counts[canon] = cnt if experts else cnt.reshape(())
    if not sums:
        raise Llama4QuantError(f"{path}: no entries for this model's tensors")
    return Imatrix(sums, counts)
