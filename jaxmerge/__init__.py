"""jaxmerge: evolutionary model merging, JAX-native.

    jaxmerge.load / save        Hugging Face checkpoints as Flax models, and back
    jaxmerge.generate           jitted greedy decoding (LLMs and LLaVA VLMs)
    jaxmerge.evolve             an evolutionary merge end to end (`EvolveConfig`, or a YAML
                                file through `load_config` / `jaxmerge evolve CONFIG.yml`)
    jaxmerge.merge              merge operators as pure jitted functions (`merge_params`)
    jaxmerge.search             the search engine (`run_search`, genome spaces)
    jaxmerge.eval               tasks, prompts and metrics
"""

from jaxmerge.checkpoint import load, save
from jaxmerge.errors import CheckpointError
from jaxmerge.eval.data import DataSource
from jaxmerge.eval.prompts import PromptSpec
from jaxmerge.eval.tasks import TaskData, TaskSpec
from jaxmerge.generation import generate
from jaxmerge.pipeline import (ConfigError, DfsSettings, EvolveConfig, EvolveResult, GenomeConfig, SearchSettings,
                               evolve, load_config)

__all__ = ["CheckpointError", "ConfigError", "DataSource", "DfsSettings", "EvolveConfig", "EvolveResult",
           "GenomeConfig", "PromptSpec", "SearchSettings", "TaskData", "TaskSpec", "evolve", "generate", "load",
           "load_config", "save"]
__version__ = "0.1.0"
