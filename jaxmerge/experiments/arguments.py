"""The experiments' shared command line: search, DFS and device options, turned into the
pipeline's configuration sections (`SearchSettings`, `DfsSettings`)."""

from __future__ import annotations

import argparse

from jaxmerge.eval.tasks import TaskSpec
from jaxmerge.pipeline.config import DfsSettings, EvolveConfig, GenomeConfig, SearchSettings


def add_search_arguments(parser: argparse.ArgumentParser, experiment: str, method_default: str | None = "dare_ties",
                         method_help: str = "merge operator to evolve (default: dare_ties)") -> None:
    parser.add_argument("--out", help=f"run directory (default: a fresh runs/{experiment}-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="toy world, data split and search seed")
    parser.add_argument("--generations", type=int, default=40)
    parser.add_argument("--population", type=int, help="default: 4 + floor(3 ln n)")
    # No argparse choices: the names are jaxmerge.search.strategies' registry, evosax's among them, and
    # listing evosax's imports it, which a --distributed run must not do before joining; validation
    # (EvolveConfig) names the known ones.
    parser.add_argument("--strategy", default="cma_es", metavar="NAME",
                        help="cma_es, sep_cma_es, snes, another of evosax's distribution-based algorithms in lower "
                        "case (xnes, pgpe, ...), one registered with register_strategy, or nsga2: a Pareto search, "
                        "every fitness task an objective, no layer-path searches (default: cma_es)")
    parser.add_argument("--method", default=method_default, help=method_help)
    parser.add_argument("--layer-groups", type=int, help="genome granularity (default: per layer on the toy, 1 "
                        "(one weight and density per model, the reported EvoLLM-JP recipe) on real models)")
    parser.add_argument("--initial-weight", type=float, default=None,
                        help="initial mixing weight (paper: 0.5; default 1.0 on the toy, see the README)")
    parser.add_argument("--test-size", type=int, default=300, help="toy test items per task")
    parser.add_argument("--fitness-items", type=int, metavar="K",
                        help="score candidates on K fitness rows per task, chosen once by item response theory, as "
                        "estimates of the whole fitness set (default: every row, in minibatches)")
    parser.add_argument("--chunk-size", type=int, help="candidates evaluated at once (default: one at a time on CPU, "
                        "the whole population on GPU/TPU)")
    parser.add_argument("--layout", metavar="POPULATIONxMODEL",
                        help="devices: the population split over POPULATION devices, each model array over MODEL "
                        "(default: every device on the population axis; see `jaxmerge plan` for 7B models)")
    parser.add_argument("--distributed", action="store_true",
                        help="join a multi-host run first (jax.distributed; TPU pods find each other)")


def add_dfs_arguments(parser: argparse.ArgumentParser) -> None:
    dfs = parser.add_argument_group("data-flow-space (DFS) and PS+DFS merging")
    dfs.add_argument("--no-dfs", action="store_true", help="skip the DFS and PS+DFS rows")
    dfs.add_argument("--dfs-generations", type=int,
                     help="generations of each DFS search (default: 100 on real models, as in the paper; 20 on "
                     "the toy)")
    dfs.add_argument("--dfs-population", type=int,
                     help="candidates per DFS generation (default: 128 on real models, as in the paper; "
                     "4 + floor(3 ln n) on the toy)")
    dfs.add_argument("--dfs-repeats", type=int, default=3, help="r: the layer slots are the M layers r times")
    dfs.add_argument("--dfs-scales", default="matrix", choices=("matrix", "network", "none"),
                     help="input scales: an M x M matrix (paper), a small network of (i, j, hop), or none")
    dfs.add_argument("--dfs-off-init", type=float, default=None,
                     help="initial indicator of the slots off model A's first repetition (paper: 0, on with "
                     "probability 1/2; default -1/3 on the toy, 0 on real models)")


def search_settings(args: argparse.Namespace, real: bool, minibatch: int, validation_size: int) -> SearchSettings:
    """The paper's defaults on real models (initial weight 0.5), the toy's otherwise (1.0)."""
    initial = args.initial_weight if args.initial_weight is not None else (0.5 if real else 1.0)
    return SearchSettings(strategy=args.strategy, generations=args.generations, population=args.population,
                          initial=(("weight", initial),), seed=args.seed, minibatch=minibatch,
                          validation_size=validation_size, chunk_size=args.chunk_size,
                          fitness_items=args.fitness_items)


def dfs_settings(args: argparse.Namespace, real: bool) -> DfsSettings:
    """DFS then PS+DFS unless --no-dfs: the paper's 100 generations of 128 on real models, a
    short search on the toy."""
    off = args.no_dfs or args.strategy in ("nsga2", "natural_niches")  # layer paths follow one PS merge
    return DfsSettings(mode="off" if off else "both", generations=args.dfs_generations or (100 if real else 20),
                       population=args.dfs_population or (128 if real else None), repeats=args.dfs_repeats,
                       scales=args.dfs_scales,
                       off_init=args.dfs_off_init if args.dfs_off_init is not None else (0.0 if real else -1 / 3),
                       chunk_size=args.chunk_size or 1)


def evolve_config(args: argparse.Namespace, name: str, genome: GenomeConfig, tasks: tuple[TaskSpec, ...], real: bool,
                  minibatch: int) -> EvolveConfig:
    """An experiment's command line with its genome and tasks, as `evolve` takes it."""
    return EvolveConfig(genome=genome, tasks=tasks,
                        search=search_settings(args, real, minibatch, args.validation_size),
                        dfs=dfs_settings(args, real), layout=args.layout, distributed=args.distributed, out=args.out,
                        name=name)
