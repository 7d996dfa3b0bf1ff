"""The evolutionary merge pipeline: configuration, run directories, results, `evolve`."""

from jaxmerge.pipeline.config import ConfigError, DfsSettings, EvolveConfig, GenomeConfig, SearchSettings, load_config
from jaxmerge.pipeline.runner import EvolveResult, evolve

__all__ = ["ConfigError", "DfsSettings", "EvolveConfig", "EvolveResult", "GenomeConfig", "SearchSettings", "evolve",
           "load_config"]
