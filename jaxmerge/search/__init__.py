"""Evolutionary search over merge recipes: genome spaces, the search loop, strategies; natural
niches (an archive of models fused pairwise, `run_natural_niches`)."""

from jaxmerge.search.evolution import SearchConfig, SearchResult, evaluate_population, resolved_chunk_size, run_search
from jaxmerge.search.genome import GenomeSpace, default_population_size
from jaxmerge.search.natural_niches import NicheConfig
from jaxmerge.search.niche_search import NicheResult, NicheSearchConfig, run_natural_niches
from jaxmerge.search.strategies import get_strategy, register_strategy, strategy_names, unregister_strategy
from jaxmerge.search.tracking import TrackingConfig

__all__ = ["GenomeSpace", "NicheConfig", "NicheResult", "NicheSearchConfig", "SearchConfig", "SearchResult",
           "default_population_size", "evaluate_population", "get_strategy", "register_strategy",
           "resolved_chunk_size", "run_natural_niches", "run_search", "strategy_names", "TrackingConfig",
           "unregister_strategy"]
