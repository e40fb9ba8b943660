"""`convert --to gguf --mmproj [PATH]` and `--mmproj-only`: the vision tower as llama.cpp's mmproj GGUF.

The file itself (keys, tensor names, types) is formats/gguf/mmproj.py. Here: where it goes (default
`mmproj-OUT.gguf` beside OUT, llama.cpp's converter's prefix), the vision tensors read from the checkpoint
reader, and publishing: the file is written to a hidden temp name beside its destination and read back before
the text model's (expensive) conversion starts, renamed into place only after the text GGUF was, and listed in
the text GGUF's sidecar manifest (`files`, `sha256`). Any failure or Ctrl-C removes the temp file; no file named
like the mmproj ever exists half-written.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import Llama4QuantError
from ..formats.gguf import mmproj as mm
from ..formats.manifest import ours
from ..fsutil import pid_alive, sha256_file, write_json_atomic

_ONLY_IGNORED = (("scheme", "--scheme"), ("calib", "--calib"), ("imatrix_file", "--imatrix"),
                 ("split_max_size", "--split-max-size"), ("tokenizer", "--tokenizer"))


def default_path(out: Path) -> Path:
    """`mmproj-OUT.gguf` beside OUT (the prefix llama.cpp's converter gives its --mmproj output)."""
    return out.with_name("mmproj-" + out.name)


def check_options(o) -> None:
    """One error for an mmproj option that does not fit the rest of the command line."""
    given = o.mmproj is not None or o.mmproj_only or o.mmproj_type is not None
    if not given:
        return
    if o.to != "gguf":
        flag = "--mmproj-only" if o.mmproj_only else ("--mmproj" if o.mmproj is not None else "--mmproj-type")
        raise Llama4QuantError(f"{flag} applies to --to gguf only (safetensors outputs carry the vision tower "
                               "unquantized in the checkpoint itself)")
    if o.mmproj_type is not None:
        if o.mmproj is None and not o.mmproj_only:
            raise Llama4QuantError("--mmproj-type needs --mmproj or --mmproj-only")
        if o.mmproj_type not in mm.TYPES:
            raise Llama4QuantError(f"unknown --mmproj-type {o.mmproj_type!r} (choose from {', '.join(mm.TYPES)})")
    if o.mmproj_only and o.verify is not None:
        raise Llama4QuantError("--verify checks a text model: --mmproj-only writes none")


def destination(o) -> Path:
    """Where the mmproj file goes: OUT itself under --mmproj-only, else --mmproj PATH or mmproj-OUT.gguf, in
    OUT's directory (the sidecar manifest lists files by name)."""
    out = Path(o.out).expanduser().absolute()
    if o.mmproj_only:
        if o.mmproj and Path(o.mmproj).expanduser().absolute() != out:
            raise Llama4QuantError("--mmproj-only writes the projector to OUT itself: drop --mmproj PATH (or give "
                                   "that path as OUT)")
        return out
    path = Path(o.mmproj).expanduser().absolute() if o.mmproj else default_path(out)
    if path == out:
        raise Llama4QuantError(f"--mmproj {o.mmproj} is OUT itself: the projector needs its own file")
    if path.parent.resolve() != out.parent.resolve():
        raise Llama4QuantError(f"--mmproj {o.mmproj}: put it in OUT's directory ({out.parent}); the sidecar manifest "
                               "lists both files by name")
    return path


def _dtype_bytes(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2,
            "U16": 2}.get(str(dtype).upper(), 1)


def vision_summary(reader) -> dict[str, Any] | None:
    """The checkpoint's vision tower for `inspect MODEL`: tensors, parameters, bytes per stored dtype, and (when
    the config describes it) the mmproj file's size per --mmproj-type. None without one."""
    infos = reader.vision_tensors()
    if not infos:
        return None
    by_dtype: dict[str, dict[str, int]] = {}
    for t in infos:
        n = math.prod(t.shape)
        e = by_dtype.setdefault(str(t.dtype), {"tensors": 0, "params": 0, "bytes": 0})
        e["tensors"] += 1
        e["params"] += n
        e["bytes"] += n * _dtype_bytes(t.dtype)
    out: dict[str, Any] = {"tensors": len(infos), "params": sum(e["params"] for e in by_dtype.values()),
                           "bytes": sum(e["bytes"] for e in by_dtype.values()), "by_dtype": by_dtype}
    try:
        vp = mm.vision_params(reader.config.vision, reader.config.hidden_size)
        out.update(layers=vp.num_layers, hidden_size=vp.hidden_size, image_size=vp.image_size,
                   patch_size=vp.patch_size, mmproj_bytes=mm.mmproj_sizes(vp))
    except Llama4QuantError as e:
        out["mmproj_error"] = str(e)
    return out


class MmprojOutput:
    """The mmproj file of one conversion: `stage(reader)` writes and checks it under a temp name, `commit()`
    renames it into place, `abort()` removes the temp file (see module docstring)."""

    def __init__(self, path: str | Path, mmproj_type: str | None = None, *, force: bool = False,
                 model_name: str | None = None):
        self.path = Path(path).expanduser().absolute()
        self.type = mmproj_type or mm.DEFAULT_TYPE
        if self.type not in mm.TYPES:
            raise Llama4QuantError(f"unknown --mmproj-type {self.type!r} (choose from {', '.join(mm.TYPES)})")
        self.force = force
        self.model_name = model_name
        self.tmp: Path | None = None
        self.plan: list[mm.MmprojTensor] = []
        self.vp: mm.VisionParams | None = None
        self.warnings: list[str] = []
        self.committed = False
        if not self.path.name.endswith(".gguf"):
            raise Llama4QuantError(f"{self.path}: the mmproj file name must end in .gguf")
        self._check_destination()

    def _check_destination(self) -> None:
        p = self.path
        if p.is_dir():
            raise Llama4QuantError(f"{p} is a directory; give a file name ending in .gguf")
        if not p.parent.is_dir():
            raise Llama4QuantError(f"{p.parent}: no such directory")
        if p.exists():
            if not self.force:
                raise Llama4QuantError(f"{p} exists (use --force to replace it)")
            ok, why = ours(p)
            if not ok:
                raise Llama4QuantError(f"--force replaces only an earlier llama4-quant output: {why}; choose another "
                                       "path or remove it yourself")

    # -- reading the checkpoint -------------------------------------------------------------------------
    def _source_tensors(self, reader) -> list[tuple[str, tuple[int, ...]]]:
        infos = reader.vision_tensors()
        cfg = reader.config
        if not infos or cfg.vision is None:
            what = ("its vision_config" if infos else "vision_model.* / multi_modal_projector.* tensors")
            layout = getattr(reader, "layout", "?")
            hint = (" (Meta's .pth layout is read for the text model only: convert the HF checkpoint)"
                    if layout == "meta" else "")
            raise Llama4QuantError(f"{reader.path}: no vision tower to write an mmproj from ({what} missing){hint}; "
                                   "--mmproj needs a multimodal Llama4ForConditionalGeneration checkpoint")
        wm = getattr(reader, "weight_map", {})
        # llama.cpp's converter goes through the shard files in order, each in its header's (name) order
        return [(t.name, tuple(t.shape)) for t in sorted(infos, key=lambda t: (wm.get(t.name, ""), t.name))]

    def prepare(self, reader) -> None:
        """Check the vision tower and plan the file (no writing)."""
        tensors = self._source_tensors(reader)
        self.vp = mm.vision_params(reader.config.vision, reader.config.hidden_size)
        self.plan = mm.plan_mmproj(tensors, self.vp, self.type)

    def stage(self, reader) -> None:
        """Write the complete file under a hidden temp name beside its destination, read it back."""
        if not self.plan:
            self.prepare(reader)
        pre = mm.load_preprocessor(reader.path)
        mean, std, found = mm.image_stats(pre)
        if not found:
            self.warnings.append(f"{reader.path}: no image_mean/image_std in preprocessor_config.json: the mmproj "
                                 f"records Llama 4's ({', '.join(f'{x:g}' for x in mean)})")
        general = self._general(reader)
        self._clean_stale()
        self.tmp = self.path.with_name(f".{self.path.name}.partial-{os.getpid()}-{id(self) & 0xFFFF:x}")
        try:
            mm.write_mmproj_file(
                self.tmp, self.plan,
                lambda gw: mm.add_mmproj_metadata(gw, self.vp, self.type, image_mean=mean, image_std=std,
                                                  general=general, quantized_by=f"llama4-quant {__version__}"),
                lambda t: reader.read_raw(t.source).float().numpy())
        except BaseException:
            self.abort()
            raise

    def _general(self, reader):
        """gguf-py's Metadata of the checkpoint directory (model card, name heuristics, sampling), completed as the
        converter completes it (default name, size label)."""
        import gguf

        total = sum(t.params for t in self.plan)
        path = Path(reader.path)
        try:
            meta = gguf.Metadata.load(None, path, self.model_name, total)
        except Exception as e:  # a model card gguf-py cannot parse
            self.warnings.append(f"{path}: model card not read ({type(e).__name__}: {e}); mmproj general.* from the "
                                 "directory name only")
            meta = gguf.Metadata(name=self.model_name)
        if meta.sampling_penalty_repeat is None:  # the pinned converter's gguf-py also reads this HF name
            g = path / "generation_config.json"
            try:
                rp = json.loads(g.read_text(encoding="utf-8")).get("repetition_penalty") if g.is_file() else None
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                rp = None
            if isinstance(rp, (int, float)) and not isinstance(rp, bool):
                meta.sampling_penalty_repeat = rp
        if meta.name is None:
            meta.name = path.name
        if meta.size_label is None and total > 0:
            meta.size_label = gguf.size_label(total, total, 0, 0)
        return meta

    def _clean_stale(self) -> None:
        prefix = f".{self.path.name}.partial-"
        for p in self.path.parent.iterdir():
            if p.name.startswith(prefix) and p.is_file():
                try:
                    pid = int(p.name[len(prefix):].split("-")[0])
                except ValueError:
                    continue
                if pid != os.getpid() and not pid_alive(pid):
                    p.unlink(missing_ok=True)

    # -- publishing -------------------------------------------------------------------------------------
    def commit(self) -> Path:
        if self.tmp is None:
            raise Llama4QuantError("mmproj: nothing staged to publish")
        try:
            if not self.force and self.path.exists():
                raise Llama4QuantError(f"{self.path} appeared while converting; not replacing it")
            os.replace(self.tmp, self.path)
            self.tmp = None
            self.committed = True
            try:
                fd = os.open(self.path.parent, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except OSError:
                pass
            return self.path
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        if self.tmp is not None:
            self.tmp.unlink(missing_ok=True)
            self.tmp = None

    def summary(self) -> dict[str, Any]:
        types: dict[str, dict[str, int]] = {}
        for t in self.plan:
            e = types.setdefault(t.qtype.name, {"tensors": 0, "bytes": 0})
            e["tensors"] += 1
            e["bytes"] += t.nbytes
        vp = self.vp
        return {
            "path": str(self.path), "type": self.type, "projector": mm.PROJECTOR, "tensors": len(self.plan),
            "params": sum(t.params for t in self.plan),
            "bytes": self.path.stat().st_size if self.committed else None, "tensor_types": types,
            "vision": {"layers": vp.num_layers, "hidden_size": vp.hidden_size, "heads": vp.num_heads,
                       "image_size": vp.image_size, "patch_size": vp.patch_size,
                       "projection_dim": vp.text_hidden_size} if vp else None,
        }


def output_for(o) -> MmprojOutput | None:
    """The MmprojOutput of a `--to gguf --mmproj` run (None without --mmproj); refuses a bad or existing
    destination before any work."""
    if o.mmproj is None:
        return None
    return MmprojOutput(destination(o), o.mmproj_type, force=o.force, model_name=_model_name(o))


def _model_name(o) -> str | None:
    """--name, or a Hub repo id (as the converter names a --remote model); None: gguf-py's heuristics on the
    checkpoint directory, as the converter applies them."""
    if o.name:
        return o.name
    m = str(o.model)
    return m if not Path(m).exists() and m.count("/") == 1 else None


def add_to_sidecar(summary: dict[str, Any], out: MmprojOutput) -> dict[str, Any]:
    """The text GGUF's summary and sidecar manifest with the published mmproj file added (`files`, `sha256`,
    `mmproj`)."""
    block = out.summary()
    summary = {**summary, "files": [*summary["files"], str(out.path)], "mmproj": block,
               "warnings": [*summary.get("warnings", []), *out.warnings]}
    mp = Path(summary["manifest"])
    m = json.loads(mp.read_text(encoding="utf-8"))
    m.update(files=summary["files"], mmproj=block, warnings=summary["warnings"])
    m.setdefault("sha256", {})[out.path.name] = sha256_file(out.path)
    write_json_atomic(mp, m)
    return summary


def run_mmproj_only(o, source=None) -> dict[str, Any]:
    """`--mmproj-only`: just the projector, to OUT, with its own sidecar manifest."""
    from ..hub.resolve import resolve_model
    from ..model.readers import open_checkpoint
    from .gguf import write_sidecar

    t0 = time.perf_counter()
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise Llama4QuantError("--mmproj-only runs in one process (no torchrun)")
    out = MmprojOutput(destination(o), o.mmproj_type, force=o.force, model_name=_model_name(o))
    warnings = [f"--mmproj-only writes no text model: {flag} ignored" for key, flag in _ONLY_IGNORED
                if getattr(o, key) is not None]
    if o.method != "auto":
        warnings.append("--mmproj-only writes no text model: --method ignored")
    reader = source if source is not None else open_checkpoint(Path(resolve_model(o.model)))
    out.stage(reader)
    out.commit()
    block = out.summary()
    summary = {
        "output": str(out.path), "files": [str(out.path)], "format": "gguf", "kind": "mmproj",
        "scheme": None, "method": None, "total_bytes": block["bytes"], "tensor_types": block["tensor_types"],
        "mmproj": block, "warnings": warnings + out.warnings, "seconds": round(time.perf_counter() - t0, 3),
    }
    summary["manifest"] = str(write_sidecar(summary))
    return summary
