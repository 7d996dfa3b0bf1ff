"""The evolutionary search: evosax ask/tell around one jitted population evaluation.

    result = run_search(space, paths, score_fn, data, fitness_batches, validation_batch,
                        config=SearchConfig(generations=100), out_dir="runs/x")

score_fn(params, data, batch, key) -> scalar, higher is better: merge with `params`
(from the genome) and score the merged model on `batch`. With `host_fitness`, score_fn may
return any pytree instead (generated tokens, say), and host_fitness(outputs, batch_index)
turns the population's outputs (numpy, leading axis P) into scores [P] on the host, for
metrics that cannot run in jit (batch_index: the minibatch's index, None for validation).
`space` is any `SearchSpace` (parameter-space `GenomeSpace`, layer-path `PathSpace`);
`config.strategy` an evosax algorithm's name, class or instance. `data` (models, statistics) is
passed as an argument, never closed over, so that XLA neither copies it into the program
nor recompiles. Each generation draws the next minibatch of `fitness_batches`; the
generation's best candidate is scored on `validation_batch`, and the candidate with the
best validation score is the result, as in the paper. Selection, by the strategy and on
validation, sees each score less `space.cost(genome)` (a sparsity prior:
`GenomeSpace.source_cost`): the log's scores are the scores themselves, its
`best_validation` (and `SearchResult.best_validation`) the best one's less its cost.
A Pareto search (`strategy="nsga2"`, `objectives=M`: score_fn returns [M] scores,
host_fitness [P, M]) keeps no leader: its result is the final population's front on the
validation batch (`SearchResult.front`). Every generation is checkpointed with orbax;
running the same command again resumes and ends exactly as an uninterrupted run would
(keys and minibatches derive from the seed and the generation number).
Each checkpoint step carries the SHA-256 of every array it holds (in orbax's step metadata,
committed with the step); a resume uses the newest step that restores and matches them, says
which steps it skipped and why, and stops with a ValueError when none does.

With `SearchConfig(layout=Layout(population, model))` each generation runs on a device
mesh (`jaxmerge.parallel`): candidates split over the population axis, model arrays
sharded over the model axis. The result does not depend on the layout (tested: 1 and 8
devices). In a multi-host run every process calls `run_search` alike; the primary process
writes the log, all take part in checkpoints.

With a `pool` (`jaxmerge.search.pool.SourcePool`) the sources stay in host memory: `data`
holds the rest, and each generation's candidates are scored in groups whose sources fit the
pool's device slots (`space.sources_used`), score_fn finding the group's arrays and their
pool indices ("slots") in `data`; candidates then go `chunk_size` at a time (default 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from jaxmerge.parallel import POPULATION, Layout, global_array, is_primary, replicated, shard_data
from jaxmerge.search.genome import SearchSpace, default_population_size
from jaxmerge.search.pareto import NSGA2, pareto_ranks
from jaxmerge.search.pool import SourcePool

# evosax's algorithms by name, imported when a search starts: evosax computes on import,
# which a multi-host process must not do before `jax.distributed.initialize()`.
STRATEGIES = {"cma_es": "CMA_ES", "sep_cma_es": "Sep_CMA_ES", "snes": "SNES"}
PARETO = "nsga2"  # jaxmerge's own (jaxmerge.search.pareto): evosax has no multi-objective algorithm


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    generations: int = 100
    strategy: str | Any = "cma_es"  # a name in STRATEGIES or PARETO, an evosax algorithm class, or an instance
    population_size: int | None = None  # None: 4 + floor(3 ln n)
    sigma: float = 1 / 6
    seed: int = 0
    # candidates per vmapped batch (per device); None: one at a time on CPU, where XLA runs a
    # population's batched matmuls (each candidate has its own weights) slower than the same
    # candidates one after another, and the whole population at once on GPU/TPU
    chunk_size: int | None = None
    layout: Layout | None = None  # devices: population x model axes; None: the default device
    objectives: int = 1  # scores per candidate; more than one needs a Pareto strategy ("nsga2")


@dataclasses.dataclass
class SearchResult:
    best_genome: np.ndarray
    best_validation: float  # a Pareto search: the best front member's first objective
    history: list[dict]
    out_dir: Path
    front: np.ndarray | None = None  # a Pareto search: the final population's front on validation [F, D]
    front_validation: np.ndarray | None = None  # [F, M], each member's validation scores
    population_validation: np.ndarray | None = None  # [P, M], the whole final population's


def strategy_name(strategy) -> str:
    if isinstance(strategy, str):
        return strategy
    return strategy.__name__ if isinstance(strategy, type) else type(strategy).__name__


def resolved_chunk_size(chunk_size: int | None) -> int | None:
    """`SearchConfig.chunk_size` with its platform default filled in (None: all at once)."""
    if chunk_size is not None:
        return chunk_size
    return 1 if jax.default_backend() == "cpu" else None


def make_strategy(space: SearchSpace, config: SearchConfig):
    """The evosax algorithm (by name, an evosax algorithm class, or an instance made for
    this space's `num_dims`) and its parameters."""
    if isinstance(config.strategy, str) and config.strategy not in (*STRATEGIES, PARETO):
        raise ValueError(f"unknown strategy {config.strategy!r} (supported: {', '.join(STRATEGIES)}, {PARETO}, or "
                         "an evosax algorithm class or instance)")
    size = config.population_size or default_population_size(space.num_dims)
    if config.strategy == PARETO:
        strategy = NSGA2(population_size=size, solution=jnp.zeros(space.num_dims), num_objectives=config.objectives)
    elif isinstance(config.strategy, (str, type)):
        if isinstance(config.strategy, str):
            import evosax.algorithms

            algorithm = getattr(evosax.algorithms, STRATEGIES[config.strategy])
        else:
            algorithm = config.strategy
        strategy = algorithm(population_size=size, solution=jnp.zeros(space.num_dims))
    else:
        strategy = config.strategy
        if strategy.num_dims != space.num_dims:
            raise ValueError(f"the strategy instance searches {strategy.num_dims} numbers; the space has "
                             f"{space.num_dims}")
    if config.objectives > 1 and not isinstance(strategy, NSGA2):
        raise ValueError(f"{config.objectives} objectives need a Pareto strategy (\"nsga2\"), not "
                         f"{strategy_name(config.strategy)}: or combine them into one score")
    params = strategy.default_params.replace(std_init=jnp.asarray(config.sigma, jnp.float32))
    return strategy, params


@functools.partial(jax.jit, static_argnames=("space", "paths", "score_fn", "chunk_size", "mesh"))
def evaluate_population(space: SearchSpace, paths: tuple[str, ...], score_fn: Callable, chunk_size: int | None,
                        population: jax.Array, data: Any, batch: Any, keys: jax.Array, mesh=None) -> Any:
    """Scores [P] (or score_fn's outputs, each with a leading P axis) of genomes [P, n], each
    with its key [P]: vmapped, in chunks of chunk_size where memory demands;
    chunk_size 1: one candidate after another, unbatched (so that `lax.cond` in a model,
    such as a layer path's padding hops, skips work instead of computing both branches).
    With a mesh, the population is split over its population axis (padded to a multiple)."""
    size = population.shape[0]

    def local(population, keys, data, batch):  # data and batch as arguments: inside shard_map, never closed over
        def one(genome, k):
            return score_fn(space.decode(genome, paths), data, batch, k)

        n = population.shape[0]
        if chunk_size is None or chunk_size >= n:
            return jax.vmap(one)(population, keys)
        if chunk_size == 1:
            return jax.lax.map(lambda gk: one(*gk), (population, keys))
        if n % chunk_size:
            raise ValueError(f"population {n} (per device) is not a multiple of chunk_size {chunk_size}")
        chunks = (population.reshape(-1, chunk_size, population.shape[-1]), keys.reshape(-1, chunk_size))
        out = jax.lax.map(lambda c: jax.vmap(one)(*c), chunks)
        return jax.tree.map(lambda x: x.reshape(n, *x.shape[2:]), out)

    if mesh is None or mesh.shape[POPULATION] == 1:
        return local(population, keys, data, batch)
    devices = mesh.shape[POPULATION]
    padded = -(-size // devices) * devices
    population = jnp.concatenate([population, jnp.repeat(population[:1], padded - size, axis=0)])
    keys = jnp.concatenate([keys, jnp.repeat(keys[:1], padded - size, axis=0)])
    split = jax.shard_map(local, mesh=mesh, in_specs=(P(POPULATION), P(POPULATION), P(), P()),
                          out_specs=P(POPULATION), axis_names=frozenset({POPULATION}), check_vma=False)
    outputs = jax.tree.map(lambda x: x[:size], split(population, keys, data, batch))
    return jax.lax.with_sharding_constraint(outputs, replicated(mesh))  # every host reads all scores


# The key, in each checkpoint step's custom metadata, of {array path: SHA-256}: orbax's
# compressed chunks carry no checksum, so a flipped bit can restore as a different number.
CHECKSUMS = "sha256"


def _checkpoint_manager(out_dir: Path) -> ocp.CheckpointManager:
    # Three steps: if the newest is damaged, the one before may be too (same disk, same moment).
    options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=False)
    return ocp.CheckpointManager((out_dir / "checkpoints").resolve(), options=options)


def _checksums(tree) -> dict[str, str]:
    """{array path: SHA-256 of its dtype, shape and bytes}, for the arrays of a checkpoint."""
    def digest(leaf) -> str:
        array = np.ascontiguousarray(np.asarray(leaf))
        return hashlib.sha256(f"{array.dtype.str}{array.shape}".encode() + array.tobytes()).hexdigest()

    return {jax.tree_util.keystr(path, simple=True, separator="."): digest(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _short(error: Exception) -> str:
    """An error in one line: tensorstore's messages run to pages."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0][:300] if lines else ''}"


def _restore_step(manager: ocp.CheckpointManager, step: int, template) -> tuple[Any, str]:
    """(the step's contents, "") when it restores and matches its checksums, else (None, why not)."""
    try:
        expected = (manager.metadata(step).custom_metadata or {}).get(CHECKSUMS)
        if not expected:  # nothing to check it against: trusting it would let a damaged step through
            return None, ("no checksum in its metadata (written by an older jaxmerge, or the metadata is damaged), "
                          "so it cannot be verified")
        restored = manager.restore(step, args=ocp.args.StandardRestore(template))
    except Exception as error:  # damaged files fail in orbax, tensorstore or json, with many exception types
        return None, f"it cannot be read ({_short(error)})"
    actual = _checksums(restored)
    differ = sorted(path for path in expected.keys() | actual.keys() if expected.get(path) != actual.get(path))
    if differ:
        return None, f"its arrays {', '.join(differ)} do not match their checksums"
    return restored, ""


def _restore_newest_good(manager: ocp.CheckpointManager, template) -> Any:
    """The newest checkpoint step that restores and matches its checksums. The newer, rejected
    steps are deleted (the resumed run saves them again) after a warning naming them; with no
    good step, a ValueError naming the directory and each step's fault. Every process of a
    multi-host run reads the same files, so all choose (and delete) alike."""
    rejected: list[tuple[int, str]] = []
    for step in sorted(manager.all_steps(), reverse=True):
        restored, problem = _restore_step(manager, step, template)
        if restored is None:
            rejected.append((step, problem))
            continue
        if rejected:
            warnings.warn(f"{manager.directory}: resuming from checkpoint step {step}, not the newest: "
                          + "; ".join(f"step {s}: {p}" for s, p in rejected)
                          + ". Those steps are deleted and their generations run again.", stacklevel=3)
            for bad, _ in rejected:
                manager.delete(bad)
        return restored
    raise ValueError(f"no usable checkpoint in {manager.directory}: "
                     + "; ".join(f"step {s}: {p}" for s, p in rejected)
                     + ". Move the directory away to start the search afresh.")


def _read_log(path: Path, generations: int) -> list[dict]:
    """The log's entries for generations [0, generations), those the restored checkpoint covers.
    Lines past them are dropped unread: a kill between the log append and the checkpoint (or
    mid-append) leaves one behind, perhaps cut short. A bad or missing line before them is
    corruption, reported with the file and line."""
    lines = path.read_text().splitlines() if path.exists() else []
    entries = []
    for number, line in enumerate(lines, start=1):
        if len(entries) == generations:
            break
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}, line {number}: not a log entry ({error}), but the checkpoint covers "
                             f"generations 0-{generations - 1}, whose lines must be whole") from None
        if not isinstance(entry, dict) or entry.get("generation") != len(entries):
            raise ValueError(f"{path}, line {number}: expected generation {len(entries)}'s entry, found {line[:80]!r}")
        entries.append(entry)
    if len(entries) < generations:
        raise ValueError(f"{path} holds {len(entries)} generations, but the checkpoint covers {generations}")
    return entries


def _host_copy(tree):
    """Plain numpy leaves: what a multi-host checkpoint of replicated search state holds."""
    return jax.tree.map(np.asarray, tree)


def run_search(space: SearchSpace, paths, score_fn: Callable, data: Any, fitness_batches: list,
               validation_batch: Any, *, config: SearchConfig, out_dir, progress: bool = True,
               host_fitness: Callable[[Any, int | None], np.ndarray] | None = None,
               pool: SourcePool | None = None) -> SearchResult:
    out_dir = Path(out_dir)
    primary = is_primary()
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)
    paths = tuple(sorted(paths))
    strategy, params = make_strategy(space, config)
    init_key, root = jax.random.split(jax.random.key(config.seed))
    state = strategy.init(init_key, space.initial(), params)
    saved = {"state": state, "best_genome": jnp.asarray(space.initial()),
             "best_validation": jnp.float32(-jnp.inf), "generation": jnp.int32(0)}

    pareto = isinstance(strategy, NSGA2)
    mesh = config.layout.mesh() if config.layout is not None else None
    chunk_size = resolved_chunk_size(config.chunk_size)
    multihost = jax.process_count() > 1
    if mesh is not None:  # models sharded (or replicated) once; batches replicated
        data = shard_data(data, mesh)
        fitness_batches = [jax.tree.map(lambda x: global_array(x, replicated(mesh)), b) for b in fitness_batches]
        validation_batch = jax.tree.map(lambda x: global_array(x, replicated(mesh)), validation_batch)

    def run(population, keys, data, batch):
        if mesh is not None:
            population, keys = global_array(population, replicated(mesh)), global_array(keys, replicated(mesh))
        return evaluate_population(space, paths, score_fn, chunk_size, population, data, batch, keys, mesh=mesh)

    def run_pooled(population, keys, batch):
        """The population in groups whose sources fit the pool's device slots, each group's
        candidates `call` at a time (padded with its first): one program for every call."""
        used = np.asarray(jax.vmap(space.sources_used)(population))
        place = (lambda x: shard_data(x, mesh)) if mesh is not None else jax.device_put
        call = (chunk_size or 1) * (mesh.shape[POPULATION] if mesh is not None else 1)
        parts, order = [], []
        for members, slots in pool.groups(used):
            resident = pool.resident(slots, place)
            for start in range(0, len(members), call):
                chunk = members[start:start + call]
                padded = np.concatenate([chunk, np.repeat(chunk[:1], call - len(chunk))])
                out = run(population[padded], keys[padded], {**data, **resident}, batch)
                parts.append(jax.tree.map(lambda x, n=len(chunk): np.asarray(x)[:n], out))
                order.append(chunk)
        inverse = np.argsort(np.concatenate(order))
        return jax.tree.map(lambda *xs: np.concatenate(xs)[inverse], *parts)

    def evaluate(population, batch_index: int | None, key):
        batch = validation_batch if batch_index is None else fitness_batches[batch_index]
        keys = jax.random.split(key, population.shape[0])
        if pool is None:
            outputs = run(population, keys, data, batch)
        else:
            outputs = run_pooled(population, keys, batch)
        if host_fitness is not None:
            return jnp.asarray(host_fitness(jax.tree.map(np.asarray, outputs), batch_index), jnp.float32)
        return jnp.asarray(np.asarray(outputs)) if multihost or pool is not None else outputs

    def priced(population):  # [P], or [P, 1] against a Pareto search's [P, M] scores
        cost = jax.vmap(space.cost)(population)
        return cost[:, None] if pareto else cost

    manager = _checkpoint_manager(out_dir)
    if manager.all_steps():  # resume
        saved = _restore_newest_good(manager, _host_copy(saved) if multihost else saved)
    start = int(saved["generation"])
    log_path = out_dir / "generations.jsonl"
    history = _read_log(log_path, start)
    if primary:  # replaced whole, not truncated: other processes may be reading it
        staging = log_path.with_name(log_path.name + ".tmp")
        staging.write_text("".join(json.dumps(entry) + "\n" for entry in history))
        os.replace(staging, log_path)
    state = saved["state"]
    best_genome, best_validation = saved["best_genome"], float(saved["best_validation"])

    with tqdm(total=config.generations, initial=start, desc="generations", disable=not (progress and primary)) \
            as bar, (log_path.open("a") if primary else contextlib.nullcontext()) as log:
        for generation in range(start, config.generations):
            began = time.perf_counter()
            key = jax.random.fold_in(root, generation)
            ask_key, tell_key, eval_key, val_key = jax.random.split(key, 4)
            population, state = strategy.ask(ask_key, state, params)
            scores = evaluate(population, generation % len(fitness_batches), eval_key)
            fitness = scores - priced(population)  # what selection sees; logs keep the scores
            state, metrics = strategy.tell(tell_key, population, -fitness, state, params)  # evosax minimises
            if pareto:  # the front is chosen on validation once, at the end
                entry = {"generation": generation, "best_fitness": np.max(scores, axis=0).tolist(),
                         "mean_fitness": np.mean(scores, axis=0).tolist(),
                         "front_size": int(metrics["front_size"]),  # of the parents kept
                         "seconds": time.perf_counter() - began}
            else:
                leader = population[jnp.argmax(fitness)]
                validation = float(evaluate(leader[None], None, val_key)[0])
                priced_validation = validation - float(space.cost(leader))
                if priced_validation > best_validation:
                    best_genome, best_validation = leader, priced_validation
                entry = {"generation": generation, "best_fitness": float(jnp.max(scores)),
                         "mean_fitness": float(jnp.mean(scores)), "validation": validation,
                         "best_validation": best_validation, "seconds": time.perf_counter() - began,
                         "leader": space.describe(leader)}
            # Log, then checkpoint: a kill between the two leaves a log line past the
            # checkpoint, which the resume drops and redoes.
            if primary:
                log.write(json.dumps(entry) + "\n")
                log.flush()
            checkpoint = {"state": state, "best_genome": best_genome, "best_validation": jnp.float32(best_validation),
                          "generation": jnp.int32(generation + 1)}
            # The checksums go into the step's own metadata, written before orbax commits the
            # step: there is no committed step without them.
            manager.save(generation + 1, args=ocp.args.StandardSave(_host_copy(checkpoint) if multihost
                                                                    else checkpoint),
                         custom_metadata={CHECKSUMS: _checksums(checkpoint)}, force=True)
            manager.wait_until_finished()
            history.append(entry)
            if pareto:
                bar.set_postfix(best=" ".join(f"{v:.3f}" for v in entry["best_fitness"]), front=entry["front_size"])
            else:
                bar.set_postfix(fitness=f"{entry['best_fitness']:.3f}", validation=f"{best_validation:.3f}")
            bar.update(1)
    manager.close()
    if pareto:
        return pareto_result(strategy.parents(state), evaluate, priced, jax.random.fold_in(root, config.generations),
                             history, out_dir)
    return SearchResult(np.asarray(best_genome), best_validation, history, out_dir)


def pareto_result(population: jax.Array, evaluate: Callable, priced: Callable, key: jax.Array, history: list[dict],
                  out_dir: Path) -> SearchResult:
    """A Pareto search's result: its final population scored on validation, and the members
    no other one dominates there less their cost (duplicates once), best first objective
    first; the scores reported are the validation scores themselves."""
    scores = np.asarray(evaluate(population, None, key), np.float64)  # [P, M]
    ranked = scores - np.asarray(priced(population), np.float64)
    members = np.flatnonzero(np.asarray(pareto_ranks(jnp.asarray(ranked))) == 0)
    _, first = np.unique(np.asarray(population)[members], axis=0, return_index=True)
    members = members[np.sort(first)]
    members = members[np.argsort(-scores[members, 0], kind="stable")]
    return SearchResult(np.asarray(population[members[0]]), float(scores[members[0], 0]), history, out_dir,
                        front=np.asarray(population)[members], front_validation=scores[members],
                        population_validation=scores)
