"""Expert-parallel conversion on torch.distributed (launched by `torchrun`): the same pipeline on every rank, the
routed experts of each MoE layer split across ranks.

    torchrun --nproc-per-node N -m llama4_quant convert MODEL OUT --to safetensors|gguf ...

Every rank runs the layer-wise calibration forward of the shared parts (attention, shared expert, dense MLPs,
head: identical work, identical results), so every rank holds the same hidden states. Expert e of a layer belongs
to rank e % N: only that rank reads its weights, accumulates its Hessians from the routed tokens and runs GPTQ on
it, and computes its output; the outputs are summed across ranks, which is exact for Llama 4's top-1 routing (each
token receives one expert's output plus zeros), so the next layer sees bit for bit what one process would see.
The quantized experts travel to rank 0, which alone writes the artifact, in the single-process order: the files
are byte-identical to a one-process run with the same options. Backend: NCCL on CUDA, gloo on CPU.

Memory per rank: a rank holds the Hessians, weights and compute copies of its own experts only (1/N of a chunk's),
and the results go to rank 0 in rounds of one expert per rank, each matrix point to point and written before the
next arrives, so rank 0 never holds more than one peer matrix at a time (docs/distributed.md has the numbers).

A rank that fails, or a peer that disappears, ends the run on every rank with one error line; rank 0 removes its
temporary output, so no artifact appears."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from ..errors import Llama4QuantError


@dataclass
class Ranks:
    """This process's place in the run (rank 0 of 1 when not launched by torchrun)."""

    rank: int = 0
    world: int = 1
    comm_device: str = "cpu"  # where tensors travel: the rank's GPU under NCCL

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writer(self) -> bool:
        return self.rank == 0

    def owns(self, expert: int) -> bool:
        return expert % self.world == self.rank

    def share(self, experts: list[int]) -> list[list[int]]:
        """Each rank's experts among `experts`, in order (rank r's at index r)."""
        return [[e for e in experts if e % self.world == r] for r in range(self.world)]

    # -- collectives (no-ops in one process) -------------------------------------------------------------------
    def all_sum(self, t) -> None:
        if self.active:
            import torch.distributed as dist

            _guard(lambda: dist.all_reduce(t, op=dist.ReduceOp.SUM))

    def gather(self, obj: Any) -> list[Any] | None:
        """Every rank's `obj` on rank 0 (in rank order), None elsewhere."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world if self.writer else None
        _guard(lambda: dist.gather_object(obj, out, dst=0))
        return out

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        _guard(lambda: dist.broadcast_object_list(box, src=0))
        return box[0]

    def send(self, t, dst: int = 0) -> None:
        """One tensor to rank `dst` (blocks until it is taken; pairs with `recv` there, messages in order)."""
        import torch.distributed as dist

        t = t.to(self.comm_device).contiguous()
        _guard(lambda: dist.send(t, dst))

    def recv(self, shape, dtype, src: int, device):
        """The next tensor `src` sends this rank, on `device`."""
        import torch
        import torch.distributed as dist

        t = torch.empty(shape, dtype=dtype, device=self.comm_device)
        _guard(lambda: dist.recv(t, src))
        return t.to(device)

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            _guard(dist.barrier)


def _guard(fn):
    try:
        return fn()
    except Llama4QuantError:
        raise
    except Exception as e:  # gloo/NCCL report a lost peer as RuntimeError / DistBackendError
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise Llama4QuantError(f"rank {os.environ.get('RANK', '?')}: lost contact with the other ranks ({msg[:200]}); "
                               "no artifact was written") from None


def from_environment(device: str = "auto") -> Ranks:
    """Join the process group torchrun set up (WORLD_SIZE > 1), or run alone."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Ranks()
    import torch
    import torch.distributed as dist

    rank = int(os.environ["RANK"])
    if not dist.is_initialized():
        cuda = device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        timeout = timedelta(seconds=float(os.environ.get("LLAMA4_QUANT_DIST_TIMEOUT", "600")))
        try:
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timeout)
        except Exception as e:
            raise Llama4QuantError(f"rank {rank}: could not join the other {world - 1} rank(s) "
                                   f"({str(e).splitlines()[0][:200]})") from None
    return Ranks(rank, world, "cuda" if dist.get_backend() == "nccl" else "cpu")


def pack(obj: Any) -> bytes:
    """`obj` (tensors anywhere in it) as bytes for gather/broadcast; `unpack` puts its tensors on a device."""
    import io

    import torch

    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def unpack(blob: bytes, device) -> Any:
    import io

    import torch

    return torch.load(io.BytesIO(blob), map_location=device, weights_only=False)  # from our own peers


def shutdown(ranks: Ranks) -> None:
    if ranks.active:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


class ShadowExporter:
    """What ranks other than 0 hand the pipeline: the real exporter's naming, grids and runtime weights, without
    ever writing (rank 0 writes the artifact)."""

    def __init__(self, real):
        self.real = real

    @property
    def artifact(self):
        return self.real.artifact

    def prepare(self, source) -> None:
        self.real.prepare(source)

    def grid_for(self, spec):
        return self.real.grid_for(spec)

    def runtime_weight(self, spec, result, grid):
        return self.real.runtime_weight(spec, result, grid)

    def __getattr__(self, name: str):
        if name == "runtime_rows":  # only where the real exporter has it (pipeline._runtime_embeddings)
            return getattr(self.real, name)
        raise AttributeError(name)

    def begin(self, source, plan) -> None:
        pass

    def write_tensor(self, spec, tensor) -> None:
        pass

    def write_quantized(self, spec, expert, result, grid) -> None:
        pass

    def end_layer(self, layer: int) -> None:
        pass

    def finish(self, report):
        return report

    def abort(self) -> None:
        pass
