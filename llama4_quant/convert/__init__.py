"""`llama4-quant convert`: the format-independent sequential pipeline (pipeline.py) and its exporters."""
