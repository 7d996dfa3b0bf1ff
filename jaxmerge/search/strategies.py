"""Search strategies by name: one registry.

    cma_es, sep_cma_es, snes, xnes, pgpe, ...   evosax's distribution-based algorithms (its own
                                                 `distribution_based_algorithms` registry), named in
                                                 lower case
    nsga2                                        jaxmerge's Pareto search (`jaxmerge.search.pareto`)
    register_strategy(name, factory)             one's own

A factory makes the algorithm for a search: `factory(population_size=P, solution=zeros[n])`,
plus `num_objectives=M` when the search has M > 1 objectives; an evosax algorithm class is
one as it is. `run_search` drives it as evosax's distribution-based algorithms are driven:
`init(key, mean, params)`, `ask`, `tell` (fitness minimised), with `params.std_init` the
search's sigma. (evosax's population-based algorithms start from a scored population instead,
which a search from one initial genome does not have: wrap one in a factory to use it.)

evosax starts JAX's backend when it is imported, which a multi-host process must not do
before `jax.distributed.initialize()`: it is imported only when a name is looked up that is
not registered here, or the names are listed.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax

from jaxmerge.search.pareto import NSGA2

PARETO = "nsga2"  # jaxmerge's own: evosax has no multi-objective algorithm
# An archive of fused models (`jaxmerge.search.niche_search`): a search loop of its own, not an
# ask/tell algorithm, so not in the registry; `jaxmerge evolve` runs it by this name.
NATURAL_NICHES = "natural_niches"


class StrategyFactory(Protocol):
    def __call__(self, *, population_size: int, solution: jax.Array) -> Any: ...  # num_objectives=M where M > 1


_REGISTERED: dict[str, StrategyFactory] = {}  # jaxmerge's and the user's; evosax's are read from evosax


def register_strategy(name: str, factory: StrategyFactory, *, replace: bool = False) -> StrategyFactory:
    """Adds a strategy under `name` (one already registered only with replace=True) and returns
    the factory. A registered name is looked up before evosax's."""
    if not (isinstance(name, str) and name.isidentifier()):
        raise ValueError(f"a strategy's name must be an identifier, got {name!r}")
    if not callable(factory):
        raise ValueError(f"strategy {name!r}: the factory must be callable, got {factory!r}")
    if name in _REGISTERED and not replace:
        raise ValueError(f"strategy {name!r} is already registered (pass replace=True to replace it)")
    _REGISTERED[name] = factory
    return factory


def unregister_strategy(name: str) -> StrategyFactory:
    """Removes a registered strategy (a test's, say) and returns its factory."""
    if name not in _REGISTERED:
        raise KeyError(f"strategy {name!r} is not registered (registered: {', '.join(sorted(_REGISTERED))})")
    return _REGISTERED.pop(name)


def evosax_strategies() -> dict[str, StrategyFactory]:
    """evosax's distribution-based algorithms by their names in lower case (imports evosax)."""
    from evosax.algorithms.distribution_based import distribution_based_algorithms

    return {name.lower(): algorithm for name, algorithm in distribution_based_algorithms.items()}


def strategy_names() -> tuple[str, ...]:
    """Every strategy's name, sorted (imports evosax)."""
    return tuple(sorted({**evosax_strategies(), **_REGISTERED}))


def get_strategy(name: str) -> StrategyFactory:
    """The factory of a strategy by name; an unknown name's error lists the known ones."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    algorithms = evosax_strategies()
    if name not in algorithms:
        raise ValueError(f"unknown strategy {name!r} (known: {', '.join(strategy_names())}; or an evosax algorithm "
                         "class or instance, or one's own through register_strategy)")
    return algorithms[name]


def _nsga2(*, population_size: int, solution: jax.Array, num_objectives: int = 1) -> NSGA2:
    return NSGA2(population_size=population_size, solution=solution, num_objectives=num_objectives)


register_strategy(PARETO, _nsga2)
