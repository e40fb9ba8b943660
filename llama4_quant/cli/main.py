"""The `llama4-quant` command: one Click group, one module per subcommand."""

from __future__ import annotations

import importlib

import click

from .. import __version__

# name -> "module:function"; modules are imported only when their command runs, so --help stays fast.
COMMANDS = {
    "inspect": "llama4_quant.cli.inspect_cmd:inspect_cmd",
    "eval": "llama4_quant.cli.eval_cmd:eval_cmd",
    "verify": "llama4_quant.cli.verify_cmd:verify_cmd",
    "convert": "llama4_quant.cli.convert_cmd:convert_cmd",
    "download": "llama4_quant.cli.download_cmd:download_cmd",
    "demo": "llama4_quant.cli.demo_cmd:demo_cmd",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return [n for n in COMMANDS if self._available(n)]

    @staticmethod
    def _available(name: str) -> bool:
        mod = COMMANDS[name].split(":")[0]
        return importlib.util.find_spec(mod) is not None

    def get_command(self, ctx, name):
        if name not in COMMANDS or not self._available(name):
            return None
        mod, attr = COMMANDS[name].split(":")
        return getattr(importlib.import_module(mod), attr)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="llama4-quant")
def cli():
    """Quantize Meta Llama 4 checkpoints (Scout, Maverick) to INT4/FP8 safetensors and GGUF,
    with calibration, and verify the result's perplexity against the original."""
