"""Run `llama4-quant ...` in this process while sampling anonymous resident memory (RssAnon).

File-backed pages of memory-mapped checkpoints are reclaimable page cache and would make plain peak RSS
grow with every tensor touched; what must stay bounded is the memory the process itself allocates.
Usage: python tests/support/memwatch.py ARGS...  -> prints `PEAK_ANON_KB <n>` on stderr at exit.

Under torchrun (`torchrun --nproc-per-node N tests/support/memwatch.py convert ...`) every rank watches itself
and prints `PEAK_ANON_KB <n> rank <r>` (the launcher is not measured); `peaks(stderr)` reads them back.
"""

from __future__ import annotations

import os
import re
import sys
import threading
import time


def rss_anon_kb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def peaks(stderr: str) -> dict[int, int]:
    """{rank: peak RssAnon in KiB} from the PEAK_ANON_KB lines of one run's stderr (rank 0 for a lone process)."""
    return {int(r or 0): int(kb) for kb, r in re.findall(r"PEAK_ANON_KB (\d+)(?: rank (\d+))?", stderr)}


def main(argv: list[str]) -> int:
    peak = [rss_anon_kb()]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss_anon_kb())
            time.sleep(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    from llama4_quant.cli.main import cli

    code = 0
    try:
        cli.main(argv, prog_name="llama4-quant", standalone_mode=False)
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        stop.set()
        t.join()
        peak[0] = max(peak[0], rss_anon_kb())
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1 else None
        print(f"PEAK_ANON_KB {peak[0]}" + (f" rank {rank}" if rank is not None else ""), file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
