"""Which files `--layout` and `--include` select, on file lists shaped like the real Llama 4 repos."""

from __future__ import annotations

import pytest

from llama4_quant.hub.layout import select_files

SHARDS = [f"model-{i:05d}-of-00050.safetensors" for i in range(1, 51)]
HF_SIDE = [
    "LICENSE",
    "README.md",
    "USE_POLICY.md",
    "chat_template.json",
    "config.json",
    "generation_config.json",
    "model.safetensors.index.json",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    *SHARDS,
]
ORIGINAL = [f"original/consolidated.{i:02d}.pth" for i in range(8)] + [
    "original/params.json",
    "original/tokenizer.model",
]
NOISE = [".gitattributes", "assets/figure.png", "onnx/model.onnx", "pytorch_model.bin"]
SCOUT = HF_SIDE + ORIGINAL + NOISE


def test_hf_layout():
    assert select_files(SCOUT, "hf") == sorted(HF_SIDE)


def test_original_layout():
    assert select_files(SCOUT, "original") == sorted(ORIGINAL)


def test_both():
    assert select_files(SCOUT, "both") == sorted(HF_SIDE + ORIGINAL)


def test_meta_format_repo_with_files_at_the_root():
    meta = [
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
        "tokenizer.model",
        "README.md",
        ".gitattributes",
    ]
    assert select_files(meta, "original") == [
        "consolidated.00.pth",
        "consolidated.01.pth",
        "params.json",
        "tokenizer.model",
    ]


def test_additional_chat_templates_folder_is_hf():
    assert select_files(["config.json", "additional_chat_templates/tool_use.jinja"], "hf") == [
        "additional_chat_templates/tool_use.jinja",
        "config.json",
    ]


@pytest.mark.parametrize(
    "layout,include,expected",
    [
        ("hf", ["*.json"], sorted(p for p in HF_SIDE if p.endswith(".json"))),
        ("hf", ["model-0000[1-2]-*"], SHARDS[:2]),
        ("both", ["params.json"], ["original/params.json"]),  # bare names match in any folder
        ("both", ["original/"], sorted(ORIGINAL)),  # a trailing slash means the whole folder
        ("original", ["config.json"], []),  # include narrows the layout, never widens it
    ],
)
def test_include(layout, include, expected):
    assert select_files(SCOUT, layout, include) == expected


def test_unknown_layout():
    with pytest.raises(ValueError):
        select_files(SCOUT, "gguf")
