"""Byte sizes as users write them: 80GB / 80G (10^9), 78GiB (2^30), 512M, 1T; a unit is required (a bare
`--gpu-mem 80` is ambiguous: 80 bytes? 80 GB? 80 GiB?). `human` prints decimal units (GB = 10^9 bytes), the same system as the input."""

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
    """Decimal units, as sizes are given (80GB = 80 * 10^9 bytes): what every command prints."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}" if unit != "TB" else f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


class SizeType(click.ParamType):
    name = "size"

    def convert(self, value, param, ctx):
        if isinstance(value, int):
            return value
        try:
            return parse_size(value)
        except click.BadParameter as e:
            self.fail(str(e), param, ctx)
