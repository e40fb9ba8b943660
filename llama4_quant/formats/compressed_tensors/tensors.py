"""The compressed-tensors checkpoint layout (what vLLM and transformers load), for one Linear at a time.

Checked against compressed-tensors 0.20 (PackedQuantizationCompressor, NaiveQuantizationCompressor,
QuantizationConfig/Scheme/Args and the W4A16, W4A16_ASYM, W8A16, FP8_DYNAMIC, FP8_BLOCK presets):

pack-quantized (int4/int8 weights, 16-bit activations), per Linear `<name>.`:
  weight_packed      int32 [out, ceil(in * bits / 32)]: code + 2^(bits-1) stored unsigned, element i of
                     a row at bits (i % (32/bits)) * bits of word i // (32/bits), low bits first
  weight_scale       model dtype, [out, in / group] (group) or [out, 1] (channel)
  weight_shape       int64 [2] = (out, in)
  weight_zero_point  asymmetric only: int8 zero points [out, n_groups] packed the same way along
                     *out* (dim 0) -> int32 [ceil(out * bits / 32), n_groups]
float-quantized (fp8 e4m3):
  weight             float8_e4m3fn [out, in]
  weight_scale       model dtype, [1] (tensor), [out, 1] (channel), [ceil(out/128), ceil(in/128)] (block)
Dequantized weight = (code - zero_point) * scale in the scale dtype. No weight_g_idx is written:
act-order uses static groups (see quant/gptq.py).
"""

from __future__ import annotations

from typing import Mapping

import torch

from ...quant.scheme import IntScheme, QuantizedLinear, Scheme

INDEX = "model.safetensors.index.json"


# ---- int32 packing -----------------------------------------------------------------------------
def pack_int32(codes: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed `bits`-bit codes of a 2-D tensor into int32 words along `dim` (0 or 1)."""
    if bits not in (2, 4, 8):
        raise ValueError(f"can only pack 2, 4 or 8 bit codes, got {bits}")
    if codes.dim() != 2:
        raise ValueError("pack_int32 takes a 2-D tensor")
    if dim == 0:
        return pack_int32(codes.t(), bits, 1).t().contiguous()
    per_word = 32 // bits
    rows, cols = codes.shape
    u = (codes.to(torch.int64) + (1 << (bits - 1))) & ((1 << bits) - 1)
    words = -(-cols // per_word)
    u = torch.nn.functional.pad(u, (0, words * per_word - cols)).view(rows, words, per_word)
    shifts = torch.arange(per_word, device=codes.device, dtype=torch.int64) * bits
    packed = (u << shifts).sum(dim=-1)  # in [0, 2^32)
    packed = torch.where(packed >= 1 << 31, packed - (1 << 32), packed)  # reinterpret as int32
    return packed.to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = 1) -> torch.Tensor:
    """Inverse of pack_int32: int8 codes, `size` of them along `dim`."""
    if dim == 0:
        return unpack_int32(packed.t(), bits, size, 1).t().contiguous()
    per_word = 32 // bits
    shifts = torch.arange(per_word, device=packed.device, dtype=torch.int64) * bits
    u = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    u = u.reshape(packed.shape[0], -1)[:, :size]
    return (u - (1 << (bits - 1))).to(torch.int8)


# ---- per-Linear tensors ------------------------------------------------------------------------
def _stored_scale(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    stored = scale.to(dtype)
    if not torch.equal(stored.to(torch.float32), scale.to(torch.float32)):
        raise ValueError(f"scales are not representable in {dtype}: quantize with scale_dtype={dtype}")
    return stored


def linear_tensors(q: QuantizedLinear, scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """The tensors compressed-tensors stores for one quantized Linear, keyed by local name
    (prefix them with the module name, e.g. `model.layers.0.feed_forward.experts.3.down_proj.`)."""
    if isinstance(q.scheme, IntScheme):
        bits = q.scheme.bits
        out = {
            "weight_packed": pack_int32(q.codes, bits),
            "weight_scale": _stored_scale(q.scale, scale_dtype),
            "weight_shape": torch.tensor(list(q.codes.shape), dtype=torch.int64, device=q.codes.device),
        }
        if not q.scheme.symmetric:
            if q.zero_point is None:
                raise ValueError("asymmetric scheme without zero points")
            out["weight_zero_point"] = pack_int32(q.zero_point, bits, dim=0)
        return out
    if q.codes.dtype != torch.float8_e4m3fn:
        raise ValueError(f"fp8 codes must be float8_e4m3fn, got {q.codes.dtype}")
    return {"weight": q.codes, "weight_scale": _stored_scale(q.scale, scale_dtype)}


def read_linear_tensors(tensors: Mapping[str, torch.Tensor], scheme: Scheme) -> QuantizedLinear:
    """Inverse of linear_tensors (scales come back as float32)."""
    scale = tensors["weight_scale"].to(torch.float32)
    if isinstance(scheme, IntScheme):
        out, cols = (int(v) for v in tensors["weight_shape"].tolist())
        codes = unpack_int32(tensors["weight_packed"], scheme.bits, cols)
        zp = None
        if not scheme.symmetric:
            zp = unpack_int32(tensors["weight_zero_point"], scheme.bits, out, dim=0)
        return QuantizedLinear(codes, scale, zp, scheme)
    return QuantizedLinear(tensors["weight"], scale, None, scheme)


def torch_dtype(name: str | None) -> torch.dtype:
    """config.json's `torch_dtype` as a torch dtype (bfloat16 when absent or unknown)."""
    return {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}.get(
        str(name or "bfloat16").replace("torch.", ""), torch.bfloat16)
