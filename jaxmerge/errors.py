"""Errors raised on bad input; each message names the file, tensor or field at fault."""


class CheckpointError(ValueError):
    """A checkpoint (directory, config.json, safetensors file or tensor) cannot be used."""
