#!/usr/bin/env bash
# Build the llama.cpp tools the tests need (llama-perplexity, llama-quantize, llama-imatrix, ...)
# from the llama.cpp source vendored in the `llama-cpp-python` sdist on PyPI, and cache the result.
#
#   scripts/build_llamacpp.sh            # build (or reuse) $CACHE/llama.cpp-<version>/
#   scripts/build_llamacpp.sh --print-dir   # only print the install dir (no build)
#
# Result layout (see docs/llamacpp.md):
#   ${LLAMA4_QUANT_CACHE:-$HOME/.cache/llama4-quant}/llama.cpp-<llama-cpp-python version>/
#     bin/llama-perplexity bin/llama-quantize bin/llama-imatrix bin/llama-tokenize bin/llama-simple
#     convert_hf_to_gguf.py conversion/ gguf-py/ requirements.txt requirements/
#     BUILD_INFO             key=value facts about this build
#     .build-complete        written last; its absence means "(re)build"
#
# Environment knobs:
#   LLAMA4_QUANT_CACHE      cache root (default ~/.cache/llama4-quant)
#   LLAMACPP_JOBS           parallel compile jobs (default 2)
#   LLAMACPP_NATIVE=1       tune for this CPU (-march=native) instead of the portable x86-64-v3 baseline
#   LLAMACPP_LOG_TAIL=N     on failure, also print the last N lines of the build log (default 0)
#   LLAMACPP_KEEP_WORK=1    keep the source/build tree after a failed build (for debugging)
#   LLAMACPP_KEEP_SDIST=1   keep the downloaded sdist in $CACHE/downloads (default: deleted after a build)
#   PYTHON                  interpreter whose pip downloads the sdist (default: python3)
#
# Exit status: 0 = tools ready; non-zero = failed, after printing exactly one line starting with
# "build_llamacpp: FAILED". Callers that can live without llama.cpp should treat that as "skip".
set -euo pipefail

# ---- pins ---------------------------------------------------------------------------------------
# llama-cpp-python 0.3.36 vendors ggml-org/llama.cpp@0c1e57098 (see its CHANGELOG.md): has
# LLM_ARCH_LLAMA4 ("llama4") in src/llama-arch.cpp, GGUF-format imatrix output, and the split
# `conversion/` package used by convert_hf_to_gguf.py.
LLAMA_CPP_PYTHON_VERSION="0.3.36"
LLAMA_CPP_COMMIT="0c1e57098"
SDIST_SHA256="832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
TARGETS=(llama-perplexity llama-quantize llama-imatrix llama-tokenize llama-simple)

CACHE_ROOT="${LLAMA4_QUANT_CACHE:-$HOME/.cache/llama4-quant}"
PREFIX="$CACHE_ROOT/llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
STAMP="$PREFIX/.build-complete"
LOG="$CACHE_ROOT/llama.cpp-$LLAMA_CPP_PYTHON_VERSION.build.log"
JOBS="${LLAMACPP_JOBS:-2}"
PYTHON="${PYTHON:-python3}"
NICE=(nice -n 10)

if [[ "${1:-}" == "--print-dir" ]]; then
    echo "$PREFIX"
    exit 0
fi

T0=$(date +%s)
STEP="startup"
fail() {  # fail <message>: the one clear line
    local tail_n="${LLAMACPP_LOG_TAIL:-0}"
    if [[ "$tail_n" != 0 && -f "$LOG" ]]; then
        tail -n "$tail_n" "$LOG" | sed 's/^/  | /' >&2 || true
    fi
    # don't leave a half-built tree in the (possibly CI-cached) cache dir
    [[ -n "${WORK:-}" && "${LLAMACPP_KEEP_WORK:-0}" != 1 ]] && rm -rf "$WORK"
    echo "build_llamacpp: FAILED during '$STEP' after $(( $(date +%s) - T0 ))s: $1 (log: $LOG)" >&2
    exit 1
}
WORK=""
trap 'fail "command exited with status $?"' ERR
say() { echo "build_llamacpp: $*"; }
step() {  # step <name>: start a timed step
    STEP="$1"; STEP_T0=$(date +%s)
    echo "==== $(date -u +%FT%TZ) $1" >>"$LOG"
}
step_done() { say "$STEP: done in $(( $(date +%s) - STEP_T0 ))s"; }

# Which CPU baseline to compile for. The default is portable (the cache may be restored on a
# different CI runner): GGML_NATIVE=OFF, which on x86-64 means SSE4.2/AVX/AVX2/BMI2/FMA/F16C.
# A host without those gets a -march=native build instead; the choice is recorded in BUILD_INFO.
host_has_x86_64_v3() {
    [[ "$(uname -m)" == "x86_64" ]] || return 1
    local f; f=$(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null) || return 1
    for x in avx avx2 fma f16c bmi2 sse4_2; do [[ " $f " == *" $x "* ]] || return 1; done
}
if [[ "${LLAMACPP_NATIVE:-0}" == 1 ]]; then
    CPU_TARGET="native"
elif [[ "$(uname -m)" != "x86_64" ]] || host_has_x86_64_v3; then
    CPU_TARGET="portable"
else
    CPU_TARGET="native"
fi
cpu_sig() { grep -m1 '^model name' /proc/cpuinfo 2>/dev/null | sed 's/.*: //' || uname -m; }

# ---- cache hit? ---------------------------------------------------------------------------------
if [[ -f "$STAMP" ]]; then
    built_for=$(sed -n 's/^cpu_target=//p' "$PREFIX/BUILD_INFO" 2>/dev/null || true)
    built_sig=$(sed -n 's/^cpu_model=//p' "$PREFIX/BUILD_INFO" 2>/dev/null || true)
    if [[ "$built_for" == "portable" && "$CPU_TARGET" == "portable" ]] \
        || [[ "$built_for" == "native" && "$built_sig" == "$(cpu_sig)" ]]; then
        say "cached build found: $PREFIX (0s)"
        exit 0
    fi
    say "cached build at $PREFIX was made for another CPU ($built_for: $built_sig); rebuilding"
    rm -f "$STAMP"
fi

mkdir -p "$CACHE_ROOT" || { echo "build_llamacpp: FAILED: cannot create cache dir $CACHE_ROOT" >&2; exit 1; }
: >"$LOG" || { echo "build_llamacpp: FAILED: cannot write $LOG" >&2; exit 1; }

# One builder at a time per cache dir (parallel CI jobs sharing a cache); the loser reuses the result.
if command -v flock >/dev/null 2>&1; then
    exec 9>"$CACHE_ROOT/.llama.cpp-$LLAMA_CPP_PYTHON_VERSION.lock"
    flock 9
    if [[ -f "$STAMP" ]]; then say "built by a concurrent run: $PREFIX"; exit 0; fi
fi

step "check toolchain"
for tool in cmake c++ cc tar "$PYTHON"; do
    command -v "$tool" >/dev/null 2>&1 || fail "required tool '$tool' not found on PATH"
done
GENERATOR=()
command -v ninja >/dev/null 2>&1 && GENERATOR=(-G Ninja)
step_done

WORK="$CACHE_ROOT/.work-llama.cpp-$LLAMA_CPP_PYTHON_VERSION"
DL="$CACHE_ROOT/downloads"
SDIST="$DL/llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION.tar.gz"
mkdir -p "$DL"

# ---- 1. fetch the sdist (kept in $CACHE/downloads so a rebuild doesn't re-download) -------------
step "download llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION sdist"
if [[ ! -f "$SDIST" ]] || ! echo "$SDIST_SHA256  $SDIST" | sha256sum -c --status; then
    rm -f "$SDIST"
    "$PYTHON" -m pip download --disable-pip-version-check --no-binary :all: --no-deps \
        "llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION" -d "$DL" >>"$LOG" 2>&1 \
        || fail "pip download of llama-cpp-python==$LLAMA_CPP_PYTHON_VERSION failed"
fi
[[ -f "$SDIST" ]] || fail "pip download did not produce $SDIST"
echo "$SDIST_SHA256  $SDIST" | sha256sum -c --status \
    || fail "sha256 of $SDIST does not match the pinned $SDIST_SHA256"
step_done

# ---- 2. extract vendor/llama.cpp ----------------------------------------------------------------
step "extract vendor/llama.cpp"
rm -rf "$WORK"
mkdir -p "$WORK/src"
tar -xzf "$SDIST" -C "$WORK/src" --strip-components=3 \
    "llama_cpp_python-$LLAMA_CPP_PYTHON_VERSION/vendor/llama.cpp" >>"$LOG" 2>&1 \
    || fail "could not extract vendor/llama.cpp from $SDIST"
SRC="$WORK/src"
grep -q 'LLM_ARCH_LLAMA4' "$SRC/src/llama-arch.cpp" \
    || fail "vendored llama.cpp has no LLM_ARCH_LLAMA4"
step_done

# ---- 2b. patch: flush llama.cpp's async logger at exit -----------------------------------------
# llama.cpp's common logger prints from a background thread and its singleton is deliberately
# leaked (upstream: no flush at exit), so the last lines a tool logs -- llama-perplexity's
# "Final estimate: PPL = ..." -- are lost when the process exits before that thread runs. Here that
# happened in ~20% of runs on a busy 2-core machine. One added line (an atexit handler that drains
# the queue) fixes it for every tool. Not fatal if the source changed: the Python side retries.
step "patch common/log.cpp (flush logger at exit)"
LOG_FLUSH_PATCH=no
if "$PYTHON" - "$SRC/common/log.cpp" >>"$LOG" 2>&1 <<'PY'
import sys
path = sys.argv[1]
src = open(path, encoding="utf-8").read()
anchor = "log = new common_log;"
if src.count(anchor) != 1:
    sys.exit(f"anchor {anchor!r} not found exactly once in {path}")
hook = "\n        std::atexit([]() { common_log_pause(common_log_main()); }); // llama4-quant: flush at exit"
src = src.replace(anchor, anchor + hook, 1)
if "#include <cstdlib>" not in src:
    src = "#include <cstdlib>\n" + src
open(path, "w", encoding="utf-8").write(src)
PY
then
    LOG_FLUSH_PATCH=yes
else
    say "warning: could not patch common/log.cpp; tools may drop their last log lines (see $LOG)"
fi
step_done

# ---- 3. configure -------------------------------------------------------------------------------
step "cmake configure ($CPU_TARGET CPU baseline)"
CMAKE_ARGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF          # self-contained binaries: relocatable, no rpath games
    -DLLAMA_CURL=OFF                 # (deprecated/ignored in this version; kept for older pins)
    -DLLAMA_OPENSSL=OFF              # no HTTPS model download support needed
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=ON        # only for llama-simple; other examples are configured, not built
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=OFF         # llama-cli/llama-server (big, need the web UI) are not built
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_COMMIT="$LLAMA_CPP_COMMIT"
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_BLAS=OFF
    -DGGML_CCACHE=OFF
)
if [[ "$CPU_TARGET" == "native" ]]; then CMAKE_ARGS+=(-DGGML_NATIVE=ON); else CMAKE_ARGS+=(-DGGML_NATIVE=OFF); fi
"${NICE[@]}" cmake -S "$SRC" -B "$WORK/build" "${GENERATOR[@]}" "${CMAKE_ARGS[@]}" >>"$LOG" 2>&1 \
    || fail "cmake configure failed"
step_done

# ---- 4. build -----------------------------------------------------------------------------------
step "build ${TARGETS[*]} (-j$JOBS)"
"${NICE[@]}" cmake --build "$WORK/build" --config Release -j "$JOBS" --target "${TARGETS[@]}" >>"$LOG" 2>&1 \
    || fail "compilation failed"
step_done

# ---- 5. install into the cache ------------------------------------------------------------------
step "install into $PREFIX"
rm -rf "$PREFIX"
mkdir -p "$PREFIX/bin"
for t in "${TARGETS[@]}"; do
    [[ -x "$WORK/build/bin/$t" ]] || fail "built tree has no bin/$t"
    cp "$WORK/build/bin/$t" "$PREFIX/bin/"
done
# The HF -> GGUF converter and everything it imports from the source tree.
cp "$SRC/convert_hf_to_gguf.py" "$PREFIX/"
[[ -d "$SRC/conversion" ]] && cp -r "$SRC/conversion" "$PREFIX/"
cp -r "$SRC/gguf-py" "$PREFIX/"
[[ -f "$SRC/requirements.txt" ]] && cp "$SRC/requirements.txt" "$PREFIX/"
[[ -d "$SRC/requirements" ]] && cp -r "$SRC/requirements" "$PREFIX/"
cp "$SRC/LICENSE" "$PREFIX/LICENSE.llama.cpp"
find "$PREFIX" -name __pycache__ -type d -prune -exec rm -rf {} +
"$PREFIX/bin/llama-quantize" --help >>"$LOG" 2>&1 || true   # exits non-zero by design; just log it
"$PREFIX/bin/llama-perplexity" --version >>"$LOG" 2>&1 \
    || fail "installed llama-perplexity does not run"
step_done

BUILD_S=$(( $(date +%s) - T0 ))
{
    echo "llama_cpp_python_version=$LLAMA_CPP_PYTHON_VERSION"
    echo "llama_cpp_commit=$LLAMA_CPP_COMMIT"
    echo "sdist_sha256=$SDIST_SHA256"
    echo "cpu_target=$CPU_TARGET"
    echo "cpu_model=$(cpu_sig)"
    echo "targets=${TARGETS[*]}"
    echo "imatrix_format=gguf"
    echo "log_flush_patch=$LOG_FLUSH_PATCH"
    echo "compiler=$(c++ --version | head -n1)"
    echo "built_at=$(date -u +%FT%TZ)"
    echo "build_seconds=$BUILD_S"
} >"$PREFIX/BUILD_INFO"
rm -rf "$WORK"
[[ "${LLAMACPP_KEEP_SDIST:-0}" == 1 ]] || rm -f "$SDIST"   # 74 MB; keeps a CI cache of this dir small
date -u +%FT%TZ >"$STAMP"   # last: marks the build complete
trap - ERR
say "llama.cpp tools ready in $PREFIX (total ${BUILD_S}s)"
