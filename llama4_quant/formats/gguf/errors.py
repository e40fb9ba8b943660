"""The GGUF writer's error type."""

from ...errors import Llama4QuantError


class GGUFWriteError(Llama4QuantError):
    pass
