"""llama4-quant: quantize Meta Llama 4 checkpoints to INT4/FP8 safetensors and GGUF."""

__version__ = "0.1.0"
