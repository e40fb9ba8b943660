"""Byte sizes as users write them: 80GB / 80G (10^9), 78GiB (2^30), 512M, 1T; a unit is required (a bare
`--gpu-mem 80` is ambiguous: 80 bytes? 80 GB? 80 GiB?). `human` prints GiB-based units, named as such."""

from __future__ import annotations

import re

import click

_UNITS = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "b": 1}


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text or "")
    if m and not m.group(2):
        raise click.BadParameter(f"{text!r} has no unit: write {text}GB (10^9 bytes) or {text}GiB (2^30 bytes)")
    if not m or m.group(2).lower() not in _UNITS:
        raise click.BadParameter(f"{text!r} is not a size (examples: 80GB, 78GiB, 512M)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return str(n)


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as e:
            self.fail(str(e), param, ctx)
