"""What llama.cpp fixes for arch `llama4`: the architecture name, alignment, and the attention settings
src/models/llama4.cpp hard-codes (a checkpoint whose config differs runs differently there)."""

ARCH = "llama4"
ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT; we never write general.alignment

LLAMACPP_CHUNK = 8192
LLAMACPP_FLOOR_SCALE = 8192.0
LLAMACPP_ATTN_SCALE = 0.1
LLAMACPP_NOPE_INTERVAL = 4
