"""The published Llama 4 configs (text tower and vision tower), for planning before a download."""

from __future__ import annotations

_VISION = {
    "model_type": "llama4_vision_model", "hidden_size": 1408, "num_hidden_layers": 34, "num_attention_heads": 16,
    "intermediate_size": 5632, "vision_output_dim": 4096, "image_size": 336, "patch_size": 14,
    "projector_input_dim": 4096, "projector_output_dim": 4096, "pixel_shuffle_ratio": 0.5, "num_channels": 3,
    "norm_eps": 1e-5, "rope_theta": 10000,
}

_TEXT = {
    "model_type": "llama4_text", "vocab_size": 202048, "hidden_size": 5120, "intermediate_size": 8192,
    "intermediate_size_mlp": 16384, "num_hidden_layers": 48, "num_attention_heads": 40, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-5, "num_experts_per_tok": 1, "rope_theta": 500000.0,
    "no_rope_layer_interval": 4, "attention_chunk_size": 8192, "attn_temperature_tuning": True,
    "floor_scale": 8192, "attn_scale": 0.1, "bos_token_id": 200000, "eos_token_id": [200001, 200007, 200008],
    "pad_token_id": 200018, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}

PRESETS: dict[str, dict] = {
    "scout": {
        "repo_id": "meta-llama/Llama-4-Scout-17B-16E-Instruct",
        "config": {
            "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "text_config": {**_TEXT, "num_local_experts": 16, "interleave_moe_layer_step": 1, "use_qk_norm": True,
                            "max_position_embeddings": 10485760,
                            "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 1.0, "original_max_position_embeddings": 8192}},
            "vision_config": _VISION,
        },
    },
    "maverick": {
        "repo_id": "meta-llama/Llama-4-Maverick-17B-128E-Instruct",
        "config": {
            "architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "text_config": {**_TEXT, "num_local_experts": 128, "interleave_moe_layer_step": 2, "use_qk_norm": False,
                            "max_position_embeddings": 1048576},
            "vision_config": _VISION,
        },
    },
}


def vision_param_count(vc: dict, text_hidden: int) -> int:
    """Parameters of the vision tower + projector (shapes as in transformers' Llama4VisionModel)."""
    d, inter, p = vc["hidden_size"], vc["intermediate_size"], vc["patch_size"]
    npos = (vc["image_size"] // p) ** 2 + 1
    per_layer = 4 * (d * d + d) + (inter * d + inter) + (d * inter + d) + 4 * d
    total = d + npos * d + d * vc.get("num_channels", 3) * p * p + 4 * d
    total += vc["projector_input_dim"] * inter + vc["projector_output_dim"] ** 2
    total += text_hidden * vc["vision_output_dim"]
    return total + vc["num_hidden_layers"] * per_layer
