"""Evolutionary search over merge recipes."""

from jaxmerge.search.evolution import (SearchConfig, SearchResult, evaluate_population, resolved_chunk_size,
                                       run_search)
from jaxmerge.search.genome import GenomeSpace, default_population_size

__all__ = ["GenomeSpace", "SearchConfig", "SearchResult", "default_population_size", "evaluate_population",
           "resolved_chunk_size", "run_search"]
