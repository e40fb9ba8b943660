from .cli.main import cli

cli(prog_name="llama4-quant")
