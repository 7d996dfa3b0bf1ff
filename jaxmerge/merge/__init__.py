"""Merge methods (one tensor) and their mapping over whole models (layer-wise)."""

from jaxmerge.merge.methods import METHODS, MergeMethod, Options, Parameter, get_method, merge_tensor
from jaxmerge.merge.tree import (
    broadcast_params, flat_params, merge_params, prepare, stack_sources, with_params,
)

__all__ = [
    "METHODS", "MergeMethod", "Options", "Parameter", "broadcast_params", "flat_params", "get_method",
    "merge_params", "merge_tensor", "prepare", "stack_sources", "with_params",
]
