"""jaxmerge: evolutionary model merging, JAX-native.

Checkpoints
    load(path, dtype=None) / save(model, out_dir)   Hugging Face checkpoints as Flax models, and back
    generate(model, tokenizer, prompts)              jitted greedy decoding (LLMs and LLaVA VLMs)
Merging (pure functions, jittable)
    merge_params(method, base, sources, params)      one merge of flat parameter pytrees
    MergePlan, merge_plan                            the per-tensor plan a recipe or a genome becomes
    get_method, register_method, MergeMethod, Parameter   the registry of merge methods
Searching
    GenomeSpace, run_search, SearchConfig            a genome of merge parameters, searched with evosax
    register_strategy                                a search strategy of one's own
    MergeProblem                                     base, sources, genome space and method as one object
    evolve(config) / EvolveConfig / load_config      the whole evolutionary merge (`jaxmerge evolve`)
Tasks and models
    TaskSpec, PromptSpec, DataSource                 what a merge is scored on
    Metric, register_metric                          the registry of metrics
    Architecture, register_architecture, register_family   the registry of checkpoint architectures
Subpackages: jaxmerge.merge, .search, .eval, .pipeline, .models, .architectures, .testing.

The library logs through `logging` ("jaxmerge.*") and never prints; the `jaxmerge` command
shows those records (`jaxmerge.console.log_to_console`).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from jaxmerge.checkpoint import load
from jaxmerge.errors import CheckpointError
from jaxmerge.generation import generate
from jaxmerge.saving import save

# Imported on first use, so that `import jaxmerge` (and `jaxmerge merge`) stays light: the
# search brings orbax and the pipeline the evaluation stack.
_LAZY = {
    "merge_params": "jaxmerge.merge", "merge_plan": "jaxmerge.merge", "MergePlan": "jaxmerge.merge",
    "MergeMethod": "jaxmerge.merge", "Parameter": "jaxmerge.merge", "get_method": "jaxmerge.merge",
    "register_method": "jaxmerge.merge",
    "GenomeSpace": "jaxmerge.search", "SearchConfig": "jaxmerge.search", "SearchResult": "jaxmerge.search",
    "run_search": "jaxmerge.search", "register_strategy": "jaxmerge.search",
    "MergeProblem": "jaxmerge.pipeline.problem",
    "ConfigError": "jaxmerge.pipeline", "DfsSettings": "jaxmerge.pipeline", "EvolveConfig": "jaxmerge.pipeline",
    "EvolveResult": "jaxmerge.pipeline", "GenomeConfig": "jaxmerge.pipeline", "SearchSettings": "jaxmerge.pipeline",
    "evolve": "jaxmerge.pipeline", "load_config": "jaxmerge.pipeline",
    "DataSource": "jaxmerge.eval.data", "PromptSpec": "jaxmerge.eval.prompts", "TaskData": "jaxmerge.eval.tasks",
    "TaskSpec": "jaxmerge.eval.tasks", "Metric": "jaxmerge.eval.metric_registry",
    "register_metric": "jaxmerge.eval.metric_registry",
    "Architecture": "jaxmerge.architectures", "register_architecture": "jaxmerge.architectures",
    "register_family": "jaxmerge.architectures",
}
_SUBPACKAGES = ("architectures", "eval", "merge", "models", "pipeline", "search", "testing")

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from jaxmerge import architectures, eval, merge, models, pipeline, search, testing  # noqa: F401
    from jaxmerge.architectures import Architecture, register_architecture, register_family  # noqa: F401
    from jaxmerge.eval.data import DataSource  # noqa: F401
    from jaxmerge.eval.metric_registry import Metric, register_metric  # noqa: F401
    from jaxmerge.eval.prompts import PromptSpec  # noqa: F401
    from jaxmerge.eval.tasks import TaskData, TaskSpec  # noqa: F401
    from jaxmerge.merge import (  # noqa: F401
        MergeMethod,
        MergePlan,
        Parameter,
        get_method,
        merge_params,
        merge_plan,
        register_method,
    )
    from jaxmerge.pipeline import (  # noqa: F401
        ConfigError,
        DfsSettings,
        EvolveConfig,
        EvolveResult,
        GenomeConfig,
        SearchSettings,
        evolve,
        load_config,
    )
    from jaxmerge.pipeline.problem import MergeProblem  # noqa: F401
    from jaxmerge.search import GenomeSpace, SearchConfig, SearchResult, register_strategy, run_search  # noqa: F401


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in _SUBPACKAGES:
        return importlib.import_module(f"jaxmerge.{name}")
    raise AttributeError(f"module 'jaxmerge' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY, *_SUBPACKAGES])


__all__ = ["CheckpointError", "generate", "load", "save", *_LAZY]
__version__ = "0.1.0"
