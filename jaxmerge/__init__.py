"""jaxmerge: evolutionary model merging, JAX-native."""

from jaxmerge.checkpoint import load, save
from jaxmerge.errors import CheckpointError
from jaxmerge.generation import generate

__all__ = ["CheckpointError", "generate", "load", "save"]
__version__ = "0.1.0"
