"""Locate and drive llama.cpp's command-line tools (perplexity, quantize, imatrix, HF converter).

The tools come from ``scripts/build_llamacpp.sh``, which builds the llama.cpp vendored in the
``llama-cpp-python`` sdist into ``${LLAMA4_QUANT_CACHE:-~/.cache/llama4-quant}/llama.cpp-<version>/``.
``LLAMA_CPP_DIR`` points at any other build instead (see docs/llamacpp.md).

Everything here shells out; nothing links against llama.cpp. Every ``run_*`` helper raises
:class:`LlamaCppError` (with the command and the tail of the tool's output) when the tool fails,
including the cases where the tool exits 0 without producing its result (llama-perplexity does
that when the text is too short for the context).
"""

from __future__ import annotations

import math
import os
import re
import shlex
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from llama4_quant.errors import Llama4QuantError

# Keep in sync with LLAMA_CPP_PYTHON_VERSION in scripts/build_llamacpp.sh (a test checks this).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
#: llama.cpp commit vendored by that llama-cpp-python release (its CHANGELOG.md).
LLAMA_CPP_COMMIT = "0c1e57098"
#: What ``llama-imatrix`` writes by default in this llama.cpp: a GGUF file (``general.type=imatrix``).
#: The legacy binary ``.dat`` format is still available via ``output_format="dat"``.
IMATRIX_DEFAULT_FORMAT = "gguf"

ENV_DIR = "LLAMA_CPP_DIR"
ENV_CACHE = "LLAMA4_QUANT_CACHE"
STAMP_NAME = ".build-complete"

_REQUIRED = ("llama-perplexity", "llama-quantize", "llama-imatrix")
_OPTIONAL = ("llama-tokenize", "llama-simple", "llama-cli", "llama-completion")
_TAIL_LINES = 25


class LlamaCppError(Llama4QuantError):
    """A llama.cpp tool failed or produced output we could not understand."""


def cache_root() -> Path:
    """``$LLAMA4_QUANT_CACHE`` or ``~/.cache/llama4-quant``."""
    env = os.environ.get(ENV_CACHE)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "llama4-quant"


def default_install_dir() -> Path:
    """Where scripts/build_llamacpp.sh installs the pinned build."""
    return cache_root() / f"llama.cpp-{LLAMA_CPP_PYTHON_VERSION}"


@dataclass(frozen=True)
class LlamaCpp:
    """Paths of one usable llama.cpp build."""

    root: Path
    bin_dir: Path
    perplexity: Path
    quantize: Path
    imatrix: Path
    tokenize: Path | None = None
    simple: Path | None = None
    cli: Path | None = None
    #: llama.cpp's ``convert_hf_to_gguf.py`` (None when the build has no converter next to it)
    convert_hf: Path | None = None
    #: the ``gguf-py`` directory matching the converter (prepended to PYTHONPATH when converting)
    gguf_py: Path | None = None
    #: key=value pairs from BUILD_INFO (empty for builds not made by our script)
    info: dict[str, str] = field(default_factory=dict)

    def converter_env(self, base: dict[str, str] | None = None) -> dict[str, str]:
        """Environment for running the converter with *our* interpreter but llama.cpp's gguf-py.

        ``convert_hf_to_gguf.py`` imports ``gguf`` (and its sibling ``conversion`` package); the
        vendored gguf-py must win over any ``gguf`` wheel installed in the venv, since the converter
        and gguf-py are released together.
        """
        env = dict(os.environ if base is None else base)
        env.pop("NO_LOCAL_GGUF", None)
        paths = [str(p) for p in (self.gguf_py, self.convert_hf.parent if self.convert_hf else None) if p]
        if env.get("PYTHONPATH"):
            paths.append(env["PYTHONPATH"])
        env["PYTHONPATH"] = os.pathsep.join(paths)
        return env

    def version(self) -> str:
        """First line of ``llama-perplexity --version`` (e.g. ``version: 0.5.0-dev (build 0, commit 0c1e57098)``)."""
        proc = _run([str(self.perplexity), "--version"], what="llama-perplexity --version", timeout=60)
        text = (proc.stdout + proc.stderr).strip().splitlines()
        return next((line for line in text if line.startswith("version")), text[0] if text else "")


# ---------------------------------------------------------------------------------------------
# locating a build
# ---------------------------------------------------------------------------------------------


def _read_info(root: Path) -> dict[str, str]:
    info: dict[str, str] = {}
    path = root / "BUILD_INFO"
    if path.is_file():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                info[key.strip()] = value.strip()
    return info


def _exe(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _from_dir(root: Path) -> tuple[LlamaCpp | None, str]:
    """Interpret *root* as one of the supported layouts; (build, "") or (None, why not)."""
    root = root.expanduser().resolve()
    if not root.is_dir():
        return None, f"{root} is not a directory"
    # our cache layout / `cmake --install` prefix, a source checkout built with cmake, a flat dir of binaries
    candidates = [root / "bin", root / "build" / "bin", root / "build" / "bin" / "Release", root]
    bin_dir = next((d for d in candidates if _exe(d / "llama-perplexity")), None)
    if bin_dir is None:
        return None, f"no executable llama-perplexity under {root} (looked in {', '.join(str(c) for c in candidates)})"
    missing = [name for name in _REQUIRED if not _exe(bin_dir / name)]
    if missing:
        return None, f"{bin_dir} lacks {', '.join(missing)}"
    opt = {name: (bin_dir / name if _exe(bin_dir / name) else None) for name in _OPTIONAL}
    conv = root / "convert_hf_to_gguf.py"
    gguf_py = root / "gguf-py"
    return (
        LlamaCpp(
            root=root,
            bin_dir=bin_dir,
            perplexity=bin_dir / "llama-perplexity",
            quantize=bin_dir / "llama-quantize",
            imatrix=bin_dir / "llama-imatrix",
            tokenize=opt["llama-tokenize"],
            simple=opt["llama-simple"],
            cli=opt["llama-cli"] or opt["llama-completion"],
            convert_hf=conv if conv.is_file() else None,
            gguf_py=gguf_py if (gguf_py / "gguf" / "__init__.py").is_file() else None,
            info=_read_info(root),
        ),
        "",
    )


def explain_missing() -> str:
    """Why :func:`find_llamacpp` returns None (for skip messages)."""
    override = os.environ.get(ENV_DIR)
    if override:
        found, why = _from_dir(Path(override))
        return "" if found else f"{ENV_DIR}={override}: {why}"
    root = default_install_dir()
    if not (root / STAMP_NAME).is_file():
        return f"no completed llama.cpp build at {root} (run scripts/build_llamacpp.sh, or set {ENV_DIR})"
    found, why = _from_dir(root)
    return "" if found else why


def find_llamacpp() -> LlamaCpp | None:
    """The llama.cpp build to use, or None.

    1. ``$LLAMA_CPP_DIR`` if set: a cache-layout dir (``bin/`` + converter), a llama.cpp source
       checkout built with cmake (``build/bin/``), or a plain directory of binaries. When it is set
       but unusable this warns and returns None; it never silently falls back to the cache.
    2. ``<cache>/llama.cpp-<pinned version>/``, only if its ``.build-complete`` stamp exists.
    """
    override = os.environ.get(ENV_DIR)
    if override:
        found, why = _from_dir(Path(override))
        if found is None:
            warnings.warn(f"{ENV_DIR} is set but unusable: {why}", RuntimeWarning, stacklevel=2)
        return found
    root = default_install_dir()
    if not (root / STAMP_NAME).is_file():
        return None
    found, _ = _from_dir(root)
    return found


def require_llamacpp() -> LlamaCpp:
    """Like :func:`find_llamacpp` but raises :class:`LlamaCppError` with the reason."""
    found = find_llamacpp()
    if found is None:
        raise LlamaCppError(f"llama.cpp tools not found: {explain_missing()}")
    return found


def _resolve(llama: LlamaCpp | None) -> LlamaCpp:
    return llama if llama is not None else require_llamacpp()


# ---------------------------------------------------------------------------------------------
# running tools
# ---------------------------------------------------------------------------------------------


def _tail(text: str, n: int = _TAIL_LINES) -> str:
    lines = [line for line in text.rstrip().splitlines() if line.strip()]
    return "\n".join(lines[-n:])


def _fail(what: str, cmd: Sequence[str], why: str, proc: subprocess.CompletedProcess | None) -> LlamaCppError:
    msg = f"{what} {why}\n  command: {shlex.join(str(c) for c in cmd)}"
    if proc is not None:
        tail = _tail(proc.stderr) or _tail(proc.stdout)
        if tail:
            msg += "\n  output tail:\n" + "\n".join("    " + line for line in tail.splitlines())
    return LlamaCppError(msg)


def _run(
    cmd: Sequence[str],
    *,
    what: str,
    timeout: float | None = None,
    env: dict[str, str] | None = None,
    ok_codes: tuple[int, ...] = (0,),
) -> subprocess.CompletedProcess:
    cmd = [str(c) for c in cmd]
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, errors="replace", timeout=timeout, env=env, stdin=subprocess.DEVNULL
        )
    except FileNotFoundError as exc:
        raise _fail(what, cmd, f"could not start: {exc}", None) from None
    except subprocess.TimeoutExpired as exc:
        out = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        raise _fail(what, cmd, f"timed out after {timeout}s", subprocess.CompletedProcess(cmd, -1, "", out)) from None
    if proc.returncode not in ok_codes:
        how = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit status {proc.returncode}"
        raise _fail(what, cmd, f"failed ({how})", proc)
    return proc


def _threads_args(threads: int | None) -> list[str]:
    return ["-t", str(threads)] if threads else []


# ---- perplexity -----------------------------------------------------------------------------

_RE_FINAL = re.compile(r"Final estimate: PPL = ([^\s]+) \+/- ([^\s]+)")
_RE_RUNNING = re.compile(r"\[(\d+)\]([-+]?(?:nan|inf|[0-9.]+(?:[eE][-+]?\d+)?)),", re.IGNORECASE)
_RE_SETUP = re.compile(r"(?:calculating perplexity|computing) over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)")
_RE_TOO_FEW = re.compile(r"you need at least (\d+) tokens.*?\n.*?tokenizes to only (\d+) tokens", re.S)


def parse_perplexity_output(text: str) -> dict[str, Any]:
    """Parse llama-perplexity's plain-mode output (stdout and stderr together).

    Returns ``ppl`` and ``ppl_stderr`` (the "Final estimate" line), ``running_ppl`` (the
    ``[i]x,`` values exactly as printed: the PPL over chunks 1..i, cumulative), ``chunk_ppl`` (the
    PPL of each chunk alone, recovered from consecutive running values; exact up to the 4 printed
    decimals), ``n_chunks`` and, when printed, ``n_chunks_planned``, ``n_ctx``, ``batch_size``, ``n_seq``.

    An unpatched llama.cpp can lose its last log lines at exit (its logger thread is not flushed).
    If only the "Final estimate" line is missing but every planned chunk was printed, ``ppl`` is
    the last running value, ``ppl_stderr`` is NaN and ``final_line_missing`` is True.
    Raises :class:`LlamaCppError` when there is no usable result.
    """
    few = _RE_TOO_FEW.search(text)
    if few:
        raise LlamaCppError(
            f"llama-perplexity: the text tokenizes to only {few.group(2)} tokens, it needs at least "
            f"{few.group(1)} (2 x ctx); use a longer text or a smaller ctx"
        )
    final = _RE_FINAL.search(text)
    setup = _RE_SETUP.search(text)
    running: dict[int, float] = {}
    for m in _RE_RUNNING.finditer(text):
        running[int(m.group(1))] = float(m.group(2))
    idx = sorted(running)
    running_ppl = [running[i] for i in idx]
    if idx and idx != list(range(1, len(idx) + 1)):
        raise LlamaCppError(f"llama-perplexity printed chunk indices {idx}, expected 1..{len(idx)}")
    chunk_ppl: list[float] = []
    prev = 0.0  # i * ln(running_i): total NLL over chunks 1..i, in units of tokens-per-chunk
    for i, r in enumerate(running_ppl, start=1):
        total = i * math.log(r) if r > 0 and math.isfinite(r) else float("nan")
        chunk_ppl.append(math.exp(total - prev) if math.isfinite(total) and math.isfinite(prev) else float("nan"))
        prev = total
    if final is not None:
        ppl, ppl_stderr = float(final.group(1)), float(final.group(2))
    elif setup is not None and running_ppl and len(running_ppl) == int(setup.group(1)):
        ppl, ppl_stderr = running_ppl[-1], float("nan")
    else:
        raise LlamaCppError(
            "llama-perplexity output has no 'Final estimate: PPL = ...' line "
            f"({len(running_ppl)} of {setup.group(1) if setup else '?'} chunks printed)"
        )
    out: dict[str, Any] = {
        "ppl": ppl,
        "ppl_stderr": ppl_stderr,
        "running_ppl": running_ppl,
        "chunk_ppl": chunk_ppl,
        "n_chunks": len(running_ppl),
        "final_line_missing": final is None,
    }
    if setup:
        out.update(
            n_chunks_planned=int(setup.group(1)),
            n_ctx=int(setup.group(2)),
            batch_size=int(setup.group(3)),
            n_seq=int(setup.group(4)),
        )
    return out


def run_perplexity(
    gguf_path: str | os.PathLike,
    text_file: str | os.PathLike,
    ctx: int,
    chunks: int | None = None,
    threads: int = 2,
    *,
    batch: int | None = None,
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    retries: int | None = None,
    llama: LlamaCpp | None = None,
) -> dict[str, Any]:
    """Plain perplexity of *gguf_path* over *text_file* with context *ctx* (see parse_perplexity_output).

    The text must tokenize to at least ``2*ctx`` tokens (llama.cpp needs one chunk to score plus
    a second one; with fewer tokens it prints an error but exits 0 -- reported here as LlamaCppError).
    The first half of every chunk is context only; the PPL is over the second half of each chunk.
    ``batch`` defaults to ``ctx`` (one sequence per decode: results independent of batching).
    The result also has ``seconds`` (wall time), ``attempts`` and ``command``.

    ``retries``: extra runs when the output looks cut off at exit (no final line, no error
    message) -- the llama.cpp logger race; default 0 for builds from scripts/build_llamacpp.sh,
    which patches it (BUILD_INFO ``log_flush_patch=yes``), else 2 (and OMP_WAIT_POLICY=passive).
    """
    lc = _resolve(llama)
    if ctx < 8:
        raise LlamaCppError(f"run_perplexity: ctx={ctx} is too small")
    b = batch or ctx
    cmd = [lc.perplexity, "-m", gguf_path, "-f", text_file, "-c", str(ctx), "-b", str(b), "--no-warmup"]
    cmd += _threads_args(threads)
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    cmd += list(extra_args)
    env = None
    patched = lc.info.get("log_flush_patch") == "yes"
    if not patched:
        # idle OpenMP threads that spin (the default) starve the logger thread at exit; passive
        # waiting makes lost output rarer (1/20 vs 4/20 runs here), retries cover the rest
        env = {"OMP_WAIT_POLICY": "passive", **os.environ}
    if retries is None:
        retries = 0 if patched else 2
    for attempt in range(1, retries + 2):
        t0 = time.monotonic()
        proc = _run(cmd, what="llama-perplexity", timeout=timeout, env=env)
        text = proc.stdout + "\n" + proc.stderr
        try:
            result = parse_perplexity_output(text)
        except LlamaCppError as exc:
            cut_off = not any(s in text for s in ("Final estimate", "you need at least", "failed to decode", "Unexpected"))
            if cut_off and attempt <= retries:
                continue
            raise _fail("llama-perplexity", cmd, f"gave no result: {exc}", proc) from None
        result["seconds"] = time.monotonic() - t0
        result["attempts"] = attempt
        result["command"] = [str(c) for c in cmd]
        return result
    raise AssertionError("unreachable")


# ---- quantize / imatrix / tokenize -----------------------------------------------------------


def run_quantize(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    type: str,  # noqa: A002 - mirrors llama-quantize's positional argument
    imatrix: str | os.PathLike | None = None,
    *,
    threads: int | None = 2,
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    llama: LlamaCpp | None = None,
) -> Path:
    """``llama-quantize [--imatrix F] src dst TYPE [threads]``; returns *dst*.

    *type* is any name llama-quantize accepts (``Q4_K_M``, ``Q8_0``, ``IQ4_XS``, ``BF16``, ...).
    Types such as IQ2_XXS/IQ1_S refuse to run without an imatrix; that failure surfaces as LlamaCppError.
    """
    lc = _resolve(llama)
    dst = Path(dst)
    cmd: list[Any] = [lc.quantize]
    if imatrix is not None:
        cmd += ["--imatrix", imatrix]
    cmd += list(extra_args) + [src, dst, type]
    if threads:
        cmd.append(str(threads))
    proc = _run(cmd, what="llama-quantize", timeout=timeout)
    if not dst.is_file() or dst.stat().st_size == 0:
        raise _fail("llama-quantize", [str(c) for c in cmd], f"exited 0 but wrote no {dst}", proc)
    return dst


def run_imatrix(
    gguf: str | os.PathLike,
    text_file: str | os.PathLike,
    out: str | os.PathLike,
    ctx: int,
    chunks: int | None = None,
    *,
    threads: int = 2,
    output_format: str = IMATRIX_DEFAULT_FORMAT,
    compute_ppl: bool = False,
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    llama: LlamaCpp | None = None,
) -> Path:
    """Compute an importance matrix with llama-imatrix; returns *out*.

    This llama.cpp writes the GGUF imatrix format by default (``output_format="gguf"``; name the
    file ``*.gguf``); ``output_format="dat"`` writes the legacy binary format. llama-quantize reads
    both. Like perplexity, the text must have at least ``2*ctx`` tokens. ``compute_ppl=False``
    passes ``--no-ppl`` (skips the softmax over the vocabulary that llama-imatrix does by default).
    """
    lc = _resolve(llama)
    if output_format not in ("gguf", "dat"):
        raise LlamaCppError(f"run_imatrix: output_format must be 'gguf' or 'dat', not {output_format!r}")
    out = Path(out)
    cmd: list[Any] = [lc.imatrix, "-m", gguf, "-f", text_file, "-o", out, "-c", str(ctx), "-b", str(ctx)]
    cmd += ["--output-format", output_format] + _threads_args(threads)
    if chunks is not None:
        cmd += ["--chunks", str(chunks)]
    if not compute_ppl:
        cmd.append("--no-ppl")
    cmd += list(extra_args)
    proc = _run(cmd, what="llama-imatrix", timeout=timeout)
    if not out.is_file() or out.stat().st_size == 0:
        raise _fail("llama-imatrix", [str(c) for c in cmd], f"exited 0 but wrote no {out}", proc)
    if output_format == "gguf" and out.read_bytes()[:4] != b"GGUF":
        raise _fail("llama-imatrix", [str(c) for c in cmd], f"{out} is not a GGUF file", proc)
    return out


def count_tokens(
    gguf: str | os.PathLike, text_file: str | os.PathLike, *, timeout: float | None = None, llama: LlamaCpp | None = None
) -> int:
    """Number of tokens (BOS included, as llama-perplexity counts) *text_file* has under *gguf*'s vocab."""
    lc = _resolve(llama)
    if lc.tokenize is None:
        raise LlamaCppError(f"count_tokens: this llama.cpp build ({lc.bin_dir}) has no llama-tokenize")
    cmd = [lc.tokenize, "-m", gguf, "-f", text_file, "--ids", "--show-count", "--log-disable"]
    proc = _run(cmd, what="llama-tokenize", timeout=timeout)
    m = re.search(r"Total number of tokens: (\d+)", proc.stdout)
    if m is None:
        raise _fail("llama-tokenize", [str(c) for c in cmd], "printed no token count", proc)
    return int(m.group(1))


# ---- HF -> GGUF converter ---------------------------------------------------------------------


def run_convert_hf(
    model_dir: str | os.PathLike,
    out_path: str | os.PathLike,
    outtype: str = "bf16",
    *,
    python: str | os.PathLike | None = None,
    extra_args: Sequence[str] = (),
    timeout: float | None = None,
    llama: LlamaCpp | None = None,
) -> Path:
    """Run llama.cpp's own ``convert_hf_to_gguf.py`` on an HF checkpoint dir; returns *out_path*.

    Uses this interpreter (our venv) with the build's vendored gguf-py first on PYTHONPATH.
    *outtype*: f32, f16, bf16, q8_0, tq1_0, tq2_0 or auto. The converter also needs torch,
    numpy, transformers, sentencepiece and safetensors (all in the project's test extras).
    """
    lc = _resolve(llama)
    if lc.convert_hf is None:
        raise LlamaCppError(f"run_convert_hf: no convert_hf_to_gguf.py in {lc.root}")
    out = Path(out_path)
    cmd = [python or sys.executable, lc.convert_hf, model_dir, "--outfile", out, "--outtype", outtype]
    cmd += list(extra_args)
    proc = _run(cmd, what="convert_hf_to_gguf.py", timeout=timeout, env=lc.converter_env())
    if not out.is_file() or out.stat().st_size == 0:
        raise _fail("convert_hf_to_gguf.py", [str(c) for c in cmd], f"exited 0 but wrote no {out}", proc)
    return out


__all__ = [
    "IMATRIX_DEFAULT_FORMAT",
    "LLAMA_CPP_COMMIT",
    "LLAMA_CPP_PYTHON_VERSION",
    "LlamaCpp",
    "LlamaCppError",
    "cache_root",
    "count_tokens",
    "default_install_dir",
    "explain_missing",
    "find_llamacpp",
    "parse_perplexity_output",
    "require_llamacpp",
    "run_convert_hf",
    "run_imatrix",
    "run_perplexity",
    "run_quantize",
]
