"""`convert --verify`: the eval check run on the artifact just written, recorded in its manifest."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import Llama4QuantError
from ..fsutil import write_json_atomic


@dataclass(frozen=True)
class VerifyOptions:
    eval_data: str | None = None  # None: the calibration tokens no sample holds
    ctx: int = 512
    chunks: int = 16
    max_ppl_increase: float | None = None
    max_kld: float | None = None
    report_dir: str | None = None


def verify_artifact(model: str, artifact: str, v: VerifyOptions, *, heldout: list[int], device: str, dtype: str,
                    batch_size: int, tokenizer: str | None = None) -> dict:
    from ..eval.report import write_report
    from ..eval.run import public, run_eval

    tokens = None
    data_label = v.eval_data
    if v.eval_data is None:
        if len(heldout) < 2 * v.ctx:
            raise Llama4QuantError(f"--verify: only {len(heldout)} calibration tokens were left out of the samples "
                                   f"(need {2 * v.ctx}); pass --eval-data FILE or use fewer --calib-samples")
        tokens = heldout
        data_label = f"held-out calibration tokens ({len(heldout)})"
    try:
        result = run_eval(model, [artifact], data_label, v.ctx, v.chunks, tokenizer, device, dtype, batch_size,
                          v.max_ppl_increase, v.max_kld, tokens=tokens,
                          check_hashes=False)  # just written and read back
    except Llama4QuantError as e:
        raise Llama4QuantError(f"--verify: {e}") from None
    if v.report_dir:
        result["report"] = {k: str(p) for k, p in write_report(result, Path(v.report_dir)).items()}
    return public(result)


def record_verification(manifest_path: Path, verification: dict) -> None:
    """Add the verification result to a JSON manifest, atomically."""
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    manifest["verification"] = verification
    write_json_atomic(manifest_path, manifest)
