"""Merge methods (one tensor) and their mapping over whole models (layer-wise)."""

from jaxmerge.merge import more_methods  # noqa: F401  (registers mergekit's other methods: nuslerp, sce, ...)
from jaxmerge.merge.methods import (
    MergeMethod,
    Options,
    Parameter,
    get_method,
    merge_tensor,
    method_names,
    register_method,
    unregister_method,
)
from jaxmerge.merge.plan import MergePlan
from jaxmerge.merge.tree import (
    broadcast_params,
    flat_params,
    merge_params,
    merge_plan,
    prepare,
    stack_sources,
    with_params,
)

__all__ = [
    "MergeMethod", "MergePlan", "Options", "Parameter", "broadcast_params", "flat_params", "get_method", "merge_params",
    "merge_plan", "merge_tensor", "method_names", "prepare", "register_method", "stack_sources", "unregister_method",
    "with_params",
]
