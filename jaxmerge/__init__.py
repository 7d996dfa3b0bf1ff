"""jaxmerge: evolutionary model merging, JAX-native.

    jaxmerge.load / save        Hugging Face checkpoints as Flax models, and back
    jaxmerge.generate           jitted greedy decoding (LLMs and LLaVA VLMs)
    jaxmerge.evolve             an evolutionary merge end to end (`EvolveConfig`, or a YAML
                                file through `load_config` / `jaxmerge evolve CONFIG.yml`)
    jaxmerge.merge              merge operators as pure jitted functions (`merge_params`)
    jaxmerge.search             the search engine (`run_search`, genome spaces)
    jaxmerge.eval               tasks, prompts and metrics
"""

import importlib

from jaxmerge.checkpoint import load, save
from jaxmerge.errors import CheckpointError
from jaxmerge.generation import generate

# Imported on first use: evosax computes on import, which a multi-host run must not do
# before `jax.distributed.initialize()` (and `jaxmerge merge` never needs the search).
_LAZY = {
    "ConfigError": "jaxmerge.pipeline", "DfsSettings": "jaxmerge.pipeline", "EvolveConfig": "jaxmerge.pipeline",
    "EvolveResult": "jaxmerge.pipeline", "GenomeConfig": "jaxmerge.pipeline", "SearchSettings": "jaxmerge.pipeline",
    "evolve": "jaxmerge.pipeline", "load_config": "jaxmerge.pipeline", "DataSource": "jaxmerge.eval.data",
    "PromptSpec": "jaxmerge.eval.prompts", "TaskData": "jaxmerge.eval.tasks", "TaskSpec": "jaxmerge.eval.tasks",
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'jaxmerge' has no attribute {name!r}")


__all__ = ["CheckpointError", "generate", "load", "save", *_LAZY]
__version__ = "0.1.0"
