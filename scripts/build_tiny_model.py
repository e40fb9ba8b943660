"""Retrain the shipped tiny Llama 4 (llama4_quant/data/tiny-llama4) from its recipe and report whether the
weights reproduce the shipped sha256 bit for bit (they do with the same torch build and CPU kind; another
torch or CPU can round differently, which is why the weights ship instead of being trained at run time).

    python scripts/build_tiny_model.py            # retrain in place
    python scripts/build_tiny_model.py --out DIR  # retrain into DIR, leave the shipped model alone
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from llama4_quant.tiny.trained import MODEL_DIR, RECIPE_FILE, build


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=MODEL_DIR)
    args = ap.parse_args()
    old = MODEL_DIR / RECIPE_FILE
    before = json.loads(old.read_text())["sha256"] if old.is_file() else None
    info = build(args.out, log=lambda m: print(f"train: {m}", file=sys.stderr))
    print(json.dumps(info, indent=2))
    if before is not None:
        same = before == info["sha256"]
        print(f"weights {'identical to' if same else 'differ from'} the shipped sha256", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
