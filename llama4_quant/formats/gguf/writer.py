"""Write llama4 GGUF files the way llama.cpp reads them, streamed and atomic (see docs/gguf.md).

:class:`GGUFFileWriter`: header, metadata and tensor infos through gguf-py's ``GGUFWriter`` before any data
exists; then tensor data written at precomputed offsets as it is produced (a routed-expert tensor one expert
slab at a time, in any order), so nothing is held longer than one tensor (one expert). Output goes to a hidden
temporary directory next to OUT and is renamed into place only after every tensor was written and the files were
read back and checked (headers always, data CRCs for files up to ``verify_data_max_bytes``). Split output follows
llama.cpp's ``gguf-split`` format (``split.no``/``split.count``/``split.tensors.count``, ``NAME-0000k-of-0000N.gguf``).

The rest of a file lives beside it: the tensor plan (mix.py), metadata keys and rope_freqs (metadata.py), the
tokenizer (vocab.py).
"""

from __future__ import annotations

import os
import re
import shutil
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from gguf import SHARD_NAME_FORMAT, GGMLQuantizationType as T, GGUFReader, GGUFWriter

from ...fsutil import pid_alive
from .constants import ALIGNMENT, ARCH
from .errors import GGUFWriteError
from .mix import PlannedTensor

_SPLIT_NAME = re.compile(r"^(?P<stem>.*)-(?P<k>\d{5})-of-(?P<n>\d{5})\.gguf$")


# ---------------------------------------------------------------------------------------------------
# output paths
# ---------------------------------------------------------------------------------------------------


def split_names(out: Path, n: int) -> list[Path]:
    if n == 1:
        return [out]
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return [out.with_name(SHARD_NAME_FORMAT.format(stem, k + 1, n)) for k in range(n)]


def existing_outputs(out: Path) -> list[Path]:
    """OUT itself and any OUT-stem split set next to it."""
    found = [out] if out.exists() else []
    stem = out.name[:-5] if out.name.endswith(".gguf") else out.name
    if out.parent.is_dir():
        for p in out.parent.iterdir():
            m = _SPLIT_NAME.match(p.name)
            if m and m.group("stem") == stem:
                found.append(p)
    return sorted(found)


def check_destination(out: Path, force: bool) -> None:
    """Refuse an OUT that is a directory, has no parent, or exists (unless `force`), before any work."""
    if out.is_dir():
        raise GGUFWriteError(f"{out} is a directory; give a file name ending in .gguf")
    if not out.parent.exists():
        raise GGUFWriteError(f"{out.parent}: no such directory")
    existing = existing_outputs(out)
    if existing and not force:
        raise GGUFWriteError(f"{existing[0]} exists (use --force to replace it)")


def _clean_stale_partials(out: Path) -> None:
    prefix = f".{out.name}.partial-"
    if not out.parent.is_dir():
        return
    for p in out.parent.iterdir():
        if p.name.startswith(prefix) and p.is_dir():
            try:
                pid = int(p.name[len(prefix):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not pid_alive(pid):
                shutil.rmtree(p, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Slot:
    info: PlannedTensor
    shard: int
    offset: int  # absolute file offset of the tensor's data
    written: list[int | None] = field(default_factory=list)  # crc32 per slab (None: not yet written)
    row_parts: list[tuple[int, int, int]] = field(default_factory=list)  # write_rows: (first byte, bytes, crc32)


class GGUFFileWriter:
    """Streamed, atomic GGUF output (see module docstring). Usage::

        w = GGUFFileWriter(out, plan, split_max_size=0, force=False)
        w.open(lambda gw: add_model_metadata(gw, ...))
        w.write(name, array)              # whole tensor
        w.write(name, slab, expert=e)     # one expert of a routed-expert tensor
        w.write_rows(name, r0, rows)      # rows r0.. of a 2-D tensor, in order (the embeddings, the head)
        files = w.commit()                # or w.abort()
    """

    def __init__(self, out: str | Path, plan: list[PlannedTensor], split_max_size: int = 0, force: bool = False,
                 verify_data_max_bytes: int = 4 << 30):
        self.out = Path(out)
        self.plan = plan
        self.split_max_size = int(split_max_size or 0)
        self.force = force
        self.verify_data_max_bytes = verify_data_max_bytes
        self.tmpdir: Path | None = None
        self.files: list[Path] = []  # temp files
        self.final: list[Path] = []
        self.slots: dict[str, _Slot] = {}
        self._fds: list[int] = []
        self._sizes: list[int] = []
        self._data_start: list[int] = []
        self.committed = False
        names = [p.name for p in plan]
        if len(set(names)) != len(names):
            raise GGUFWriteError("duplicate tensor names in the GGUF plan")
        if not self.out.name.endswith(".gguf"):
            raise GGUFWriteError(f"{self.out}: the output file name must end in .gguf")
        self.check_destination()

    def check_destination(self) -> None:
        check_destination(self.out, self.force)

    @property
    def total_bytes(self) -> int:
        return sum(self._sizes)

    def open(self, add_metadata) -> None:
        """Create the temp files: header, metadata (``add_metadata(GGUFWriter)``), tensor infos."""
        _clean_stale_partials(self.out)
        self.tmpdir = self.out.parent / f".{self.out.name}.partial-{os.getpid()}-{id(self) & 0xFFFF:x}"
        self.tmpdir.mkdir()
        try:
            gw = GGUFWriter(self.tmpdir / self.out.name, ARCH, split_max_size=self.split_max_size)
            add_metadata(gw)
            for p in self.plan:
                gw.add_tensor_info(p.name, p.shape, np.dtype(np.float32), p.nbytes, raw_dtype=p.qtype)
            n_shards = len(gw.tensors)
            shard_of = {name: k for k, ts in enumerate(gw.tensors) for name in ts}
            rel: dict[str, int] = {}
            sizes = [0] * n_shards
            for k, ts in enumerate(gw.tensors):
                for name, ti in ts.items():
                    rel[name] = sizes[k]
                    sizes[k] += GGUFWriter.ggml_pad(ti.nbytes, ALIGNMENT)
            self.files = gw.format_shard_names(self.tmpdir / self.out.name)
            self.final = split_names(self.out, n_shards)
            gw.write_header_to_file()
            gw.write_kv_data_to_file()
            gw.write_ti_data_to_file()
            assert gw.fout is not None
            for k, f in enumerate(gw.fout):
                f.flush()
                start = GGUFWriter.ggml_pad(f.tell(), ALIGNMENT)
                self._data_start.append(start)
                self._sizes.append(start + sizes[k])
            gw.close()
            free = shutil.disk_usage(self.tmpdir).free
            if free < self.total_bytes:
                raise GGUFWriteError(f"{self.out.parent}: {free / 2**30:.1f} GiB free, the output needs "
                                     f"{self.total_bytes / 2**30:.1f} GiB")
            for k, path in enumerate(self.files):
                fd = os.open(path, os.O_RDWR)
                self._fds.append(fd)
                _reserve(fd, self._sizes[k])
            for p in self.plan:
                k = shard_of[p.name]
                self.slots[p.name] = _Slot(p, k, self._data_start[k] + rel[p.name], [None] * max(1, p.n_experts))
        except BaseException:
            self.abort()
            raise

    def write(self, name: str, data: np.ndarray, expert: int | None = None) -> None:
        """Write a whole tensor (or, with `expert`, slab `expert` of a routed-expert tensor): the bytes
        of `data` (any dtype, C order) must be exactly the tensor's (slab's) GGML encoding."""
        slot = self.slots.get(name)
        if slot is None:
            raise GGUFWriteError(f"tensor {name} is not in the GGUF plan")
        info = slot.info
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        if expert is None:
            if info.n_experts:
                if buf.nbytes != info.nbytes:
                    raise GGUFWriteError(f"{name}: got {buf.nbytes} bytes, expected {info.nbytes}")
                for e in range(info.n_experts):
                    self._put(slot, e, buf[e * info.slab_bytes:(e + 1) * info.slab_bytes])
                return
            if buf.nbytes != info.nbytes:
                raise GGUFWriteError(f"{name}: got {buf.nbytes} bytes, expected {info.nbytes} ({info.qtype.name} {info.shape})")
            self._put(slot, 0, buf)
            return
        if not info.n_experts or not 0 <= expert < info.n_experts:
            raise GGUFWriteError(f"{name}: no expert slab {expert}")
        if buf.nbytes != info.slab_bytes:
            raise GGUFWriteError(f"{name}[{expert}]: got {buf.nbytes} bytes, expected {info.slab_bytes}")
        self._put(slot, expert, buf)

    def write_rows(self, name: str, row0: int, data: np.ndarray) -> None:
        """Write the encoded rows ``row0 ..`` of a 2-D tensor; blocks must come in order, each starting where
        the last one ended; the tensor counts as written when the last row is in."""
        slot = self.slots.get(name)
        if slot is None:
            raise GGUFWriteError(f"tensor {name} is not in the GGUF plan")
        info = slot.info
        rows = info.shape[0]
        if info.n_experts or len(info.shape) != 2:
            raise GGUFWriteError(f"{name}: write_rows takes a 2-D tensor")
        row_bytes = info.nbytes // rows
        done = sum(n for _, n, _ in slot.row_parts)
        if slot.written[0] is not None or row0 * row_bytes != done:
            raise GGUFWriteError(f"{name}: rows from {row0} written out of order")
        buf = memoryview(np.ascontiguousarray(data)).cast("B")
        if buf.nbytes == 0 or buf.nbytes % row_bytes or done + buf.nbytes > info.nbytes:
            raise GGUFWriteError(f"{name}: got {buf.nbytes} bytes at row {row0} ({row_bytes} per row, {rows} rows)")
        fd = self._fds[slot.shard]
        off = slot.offset + done
        n = 0
        while n < buf.nbytes:
            n += os.pwrite(fd, buf[n:], off + n)
        slot.row_parts.append((done, buf.nbytes, zlib.crc32(buf)))
        if done + buf.nbytes == info.nbytes:
            slot.written[0] = 0  # complete; the parts' CRCs are checked on read-back

    def _put(self, slot: _Slot, k: int, buf: memoryview) -> None:
        if slot.written[k] is not None or slot.row_parts:
            raise GGUFWriteError(f"{slot.info.name}: slab {k} written twice")
        fd = self._fds[slot.shard]
        off = slot.offset + k * slot.info.slab_bytes
        done = 0
        while done < buf.nbytes:
            done += os.pwrite(fd, buf[done:], off + done)
        slot.written[k] = zlib.crc32(buf)

    def missing(self) -> list[str]:
        return [f"{s.info.name}" + (f"[{k}]" if s.info.n_experts else "")
                for s in self.slots.values() for k, c in enumerate(s.written) if c is None]

    def commit(self) -> list[Path]:
        """Verify and publish; returns the final file paths."""
        try:
            missing = self.missing()
            if missing:
                raise GGUFWriteError(f"{len(missing)} tensor(s) never written, e.g. {missing[0]}")
            for fd in self._fds:
                os.fsync(fd)
                os.close(fd)
            self._fds = []
            self.verify()
            if self.force:
                for p in existing_outputs(self.out):
                    p.unlink()
            else:
                self.check_destination()
            # the first shard last: llama.cpp opens a split set through it
            for tmp, final in reversed(list(zip(self.files, self.final))):
                os.replace(tmp, final)
            _fsync_dir(self.out.parent)
            self.committed = True
            return list(self.final)
        except BaseException:
            self.abort()
            raise
        finally:
            if self.tmpdir is not None and self.committed:
                shutil.rmtree(self.tmpdir, ignore_errors=True)
                self.tmpdir = None

    def verify(self) -> None:
        """Read the temp files back with gguf-py: tensor names, types, shapes, offsets, split keys; data CRCs
        too when the output is at most `verify_data_max_bytes`."""
        check_data = self.total_bytes <= self.verify_data_max_bytes
        seen = set()
        for k, path in enumerate(self.files):
            try:
                r = GGUFReader(path, "r")
            except Exception as e:  # gguf-py raises plain ValueError/IndexError/...
                raise GGUFWriteError(f"written GGUF does not read back ({e})") from None
            if os.path.getsize(path) != self._sizes[k]:
                raise GGUFWriteError(f"{path.name}: size {os.path.getsize(path)} != planned {self._sizes[k]}")
            if len(self.files) > 1:
                f_no = r.fields.get("split.no")
                if f_no is None or f_no.contents() != k or r.fields["split.count"].contents() != len(self.files):
                    raise GGUFWriteError(f"{path.name}: split keys missing or wrong")
            for t in r.tensors:
                slot = self.slots.get(t.name)
                if slot is None or slot.shard != k:
                    raise GGUFWriteError(f"{path.name}: unexpected tensor {t.name}")
                shape = tuple(int(x) for x in reversed(t.shape.tolist()))
                if T(int(t.tensor_type)) != slot.info.qtype or shape != slot.info.shape:
                    raise GGUFWriteError(f"{t.name}: reads back as {T(int(t.tensor_type)).name} {shape}, "
                                         f"wrote {slot.info.qtype.name} {slot.info.shape}")
                if int(t.data_offset) != slot.offset or int(t.n_bytes) != slot.info.nbytes:
                    raise GGUFWriteError(f"{t.name}: data offset/size mismatch on read-back")
                if check_data:
                    raw = np.asarray(r.data[t.data_offset:t.data_offset + t.n_bytes])
                    for start, n, crc in slot.row_parts:
                        if zlib.crc32(memoryview(raw[start:start + n])) != crc:
                            raise GGUFWriteError(f"{t.name}: data read back differs from what was written")
                    sb = slot.info.slab_bytes
                    for e, crc in enumerate([] if slot.row_parts else slot.written):
                        if zlib.crc32(memoryview(raw[e * sb:(e + 1) * sb])) != crc:
                            raise GGUFWriteError(f"{t.name}: data read back differs from what was written")
                seen.add(t.name)
            del r
        if seen != set(self.slots):
            raise GGUFWriteError(f"read-back is missing {sorted(set(self.slots) - seen)[:3]}")

    def abort(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if self.tmpdir is not None and not self.committed:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None


def _reserve(fd: int, size: int) -> None:
    """Give the file its final size (sparse: the data is written at offsets later)."""
    os.ftruncate(fd, size)


def _fsync_dir(d: Path) -> None:
    try:
        fd = os.open(d, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
