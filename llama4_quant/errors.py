"""Errors that reach the user as one readable line and a non-zero exit code."""


class Llama4QuantError(Exception):
    """A problem with the user's input or environment, explained in one line."""

    exit_code = 1


class CheckpointError(Llama4QuantError):
    """The checkpoint is missing, corrupt, or not a Llama 4 model."""


class ConfigError(CheckpointError):
    """config.json / params.json is not a Llama 4 text config we understand."""
