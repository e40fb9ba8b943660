"""Read the next decoder layer's bytes from disk while the current one is quantized.

A conversion reads every byte of the checkpoint once, in layer order, and on a machine whose disk is slower than
its quantizer (a 215 GB checkpoint on a network volume, or 60 MB/s here) the reads would otherwise wait in turn
with the compute. `Readahead` reads file ranges in one background thread into a small buffer of its own, which
leaves them in the kernel's page cache: the reader's own pread of the same bytes then copies from memory.

Nothing it reads stays in this process (the buffer is reused; page cache is not resident memory of a process,
and the kernel drops it first under pressure), so peak RSS is unchanged. `posix_fadvise(WILLNEED)` would be the
one-line way, but on the kernels measured it returned at once and read nothing ahead.

Errors are the reader's to report: a range that cannot be read (a truncated or vanished file) is skipped here,
and the main thread's own read of it raises the readable error.
"""

from __future__ import annotations

import os
import queue
import threading
from pathlib import Path

#: bytes read per call: large enough for the disk, small enough to stop promptly
CHUNK = 8 << 20

Range = tuple[Path, int, int]  # (file, offset, length)


def coalesce(ranges: list[Range], gap: int = 1 << 20) -> list[Range]:
    """The ranges sorted by file and offset, neighbours closer than `gap` bytes merged into one."""
    out: list[list] = []
    for path, off, n in sorted(ranges, key=lambda r: (str(r[0]), r[1])):
        if n <= 0:
            continue
        if out and out[-1][0] == path and off <= out[-1][1] + out[-1][2] + gap:
            out[-1][2] = max(out[-1][2], off + n - out[-1][1])
        else:
            out.append([path, off, n])
    return [(p, o, n) for p, o, n in out]


class Readahead:
    """One daemon thread that reads the ranges handed to `want`, in order, until `close`."""

    def __init__(self) -> None:
        self._todo: queue.Queue[list[Range] | None] = queue.Queue()
        self._stop = threading.Event()
        self.bytes_read = 0
        self._thread = threading.Thread(target=self._work, name="readahead", daemon=True)
        self._thread.start()

    def want(self, ranges: list[Range]) -> None:
        if ranges and not self._stop.is_set():
            self._todo.put(coalesce(ranges))

    def close(self) -> None:
        self._stop.set()
        self._todo.put(None)
        self._thread.join(timeout=5)

    def __enter__(self) -> "Readahead":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _work(self) -> None:
        buf = bytearray(CHUNK)
        view = memoryview(buf)
        while not self._stop.is_set():
            batch = self._todo.get()
            if batch is None:
                return
            for path, off, n in batch:
                if self._stop.is_set():
                    return
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError:
                    continue
                try:
                    end = off + n
                    while off < end and not self._stop.is_set():
                        got = os.preadv(fd, [view[: min(CHUNK, end - off)]], off)
                        if got <= 0:
                            break
                        off += got
                        self.bytes_read += got
                except OSError:
                    pass
                finally:
                    os.close(fd)
