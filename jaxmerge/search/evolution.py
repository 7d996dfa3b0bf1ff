"""The evolutionary search: evosax ask/tell around one jitted population evaluation.

    result = run_search(space, paths, score_fn, data, fitness_batches, validation_batch,
                        config=SearchConfig(generations=100), out_dir="runs/x")

score_fn(params, data, batch, key) -> scalar, higher is better: merge with `params`
(from the genome) and score the merged model on `batch`. With `host_fitness`, score_fn may
return any pytree instead (generated tokens, say), and host_fitness(outputs, batch_index)
turns the population's outputs (numpy, leading axis P) into scores [P] on the host, for
metrics that cannot run in jit (batch_index: the minibatch's index, None for validation).
`space` is any `SearchSpace` (parameter-space `GenomeSpace`, layer-path `PathSpace`);
`config.strategy` a strategy's name (`jaxmerge.search.strategies`), an evosax algorithm class or
instance. `data` (models, statistics) is passed as an argument, never closed over, so that
XLA neither copies it into the program nor recompiles. Each generation draws the next
minibatch of `fitness_batches`; the generation's best candidate is scored on
`validation_batch`, and the candidate with the best validation score is the result, as in
the paper. Selection, by the strategy and on
validation, sees each score less `space.cost(genome)` (a sparsity prior:
`GenomeSpace.source_cost`): the log's scores are the scores themselves, its
`best_validation` (and `SearchResult.best_validation`) the best one's less its cost.
A Pareto search (`strategy="nsga2"`, `objectives=M`: score_fn returns [M] scores,
host_fitness [P, M]) keeps no leader: its result is the final population's front on the
validation batch (`SearchResult.front`). Every generation is checkpointed with orbax;
running the same command again resumes and ends exactly as an uninterrupted run would
(keys and minibatches derive from the seed and the generation number), saying where it
starts ("resuming at generation 6 of 12 (checkpoint step 5 in DIR)"). Asked for more
generations than its checkpoint holds, a search goes on to end as one started with that
many (nothing depends on the total); fewer are refused. Ctrl-C, and SIGTERM inside
`sigterm_as_interrupt()`, stop a search after its last checkpointed generation, saying
"interrupted at generation k of N; rerun the same command to resume".
Each checkpoint step carries the SHA-256 of every array it holds (in orbax's step metadata,
committed with the step); a resume uses the newest step that restores and matches them, says
which steps it skipped and why, and stops with a ValueError when none does.

Each generation is reported in one log line (this module's logger, INFO; DEBUG with
`progress=False`): generation k/N, the population's best and mean score, the leader's
validation and the best so far, sigma, the generation's seconds and an ETA (the running
mean of this session's generations after the first, which compiles). The line replaces a
progress bar: a long run's output goes to files, where a bar's redraws are noise, and on a
terminal a bar and log lines garble each other. `config.tracking` (`jaxmerge.search.tracking`)
also sends each generation to Weights & Biases or TensorBoard.

With `SearchConfig(layout=Layout(population, model))` each generation runs on a device
mesh (`jaxmerge.parallel`): candidates split over the population axis, model arrays
sharded over the model axis. The result does not depend on the layout (tested: 1 and 8
devices). In a multi-host run every process calls `run_search` alike; the primary process
writes the log and reports to the tracker, all take part in checkpoints.

With a `pool` (`jaxmerge.search.pool.SourcePool`) the sources stay in host memory: `data`
holds the rest, and each generation's candidates are scored in groups whose sources fit the
pool's device slots (`space.sources_used`), score_fn finding the group's arrays and their
pool indices ("slots") in `data`; candidates then go `chunk_size` at a time (default 1).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import hashlib
import json
import logging
import os
import signal
import threading
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import PartitionSpec as P

from jaxmerge.parallel import POPULATION, Layout, global_array, is_primary, replicated, shard_data
from jaxmerge.search.genome import SearchSpace, default_population_size
from jaxmerge.search.pareto import NSGA2, pareto_ranks
from jaxmerge.search.pool import SourcePool
from jaxmerge.search.strategies import PARETO, get_strategy
from jaxmerge.search.tracking import (
    NullTracker,
    Tracker,
    TrackingConfig,
    check_backend,
    open_tracker,
    population_metrics,
)

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class SearchConfig:
    generations: int = 100
    strategy: str | Any = "cma_es"  # a registered name (strategies.py), an evosax algorithm class, or an instance
    population_size: int | None = None  # None: 4 + floor(3 ln n)
    sigma: float = 1 / 6
    seed: int = 0
    # candidates per vmapped batch (per device); None: one at a time on CPU, where XLA runs a
    # population's batched matmuls (each candidate has its own weights) slower than the same
    # candidates one after another, and the whole population at once on GPU/TPU
    chunk_size: int | None = None
    layout: Layout | None = None  # devices: population x model axes; None: the default device
    objectives: int = 1  # scores per candidate; more than one needs a Pareto strategy ("nsga2")
    objective_names: tuple[str, ...] = ()  # the objectives' names in progress lines (a Pareto search's tasks)
    tracking: TrackingConfig = TrackingConfig()  # W&B or TensorBoard, per generation (jaxmerge.search.tracking)


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
    """The algorithm (made by a registered strategy's factory or an evosax algorithm class, or
    an instance made for this space's `num_dims`) and its parameters, std_init the sigma."""
    pareto = config.strategy in (PARETO, NSGA2) or isinstance(config.strategy, NSGA2)
    if config.objectives > 1 and not pareto:
        raise ValueError(f"{config.objectives} objectives need a Pareto strategy (\"{PARETO}\"), not "
                         f"{strategy_name(config.strategy)}: or combine them into one score")
    if isinstance(config.strategy, (str, type)):
        factory = get_strategy(config.strategy) if isinstance(config.strategy, str) else config.strategy
        size = config.population_size or default_population_size(space.num_dims)
        objectives = {"num_objectives": config.objectives} if config.objectives > 1 else {}
        strategy = factory(population_size=size, solution=jnp.zeros(space.num_dims), **objectives)
    else:
        strategy = config.strategy
        if strategy.num_dims != space.num_dims:
            raise ValueError(f"the strategy instance searches {strategy.num_dims} numbers; the space has "
                             f"{space.num_dims}")
    try:
        params = strategy.default_params.replace(std_init=jnp.asarray(config.sigma, jnp.float32))
    except TypeError:  # evosax's algorithms with a step-size schedule instead (Open_ES, ...)
        raise ValueError(f"{strategy_name(config.strategy)} takes no initial step size (its parameters have no "
                         "std_init for the search's sigma): register a factory that makes it with one") from None
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
            # The models passed through a barrier with the candidate: what score_fn computes from
            # them alone (task vectors, say) is then not hoisted out of the loop over candidates,
            # where it would be held for all of them at once (the sources' size again).
            genome, models = jax.lax.optimization_barrier((genome, data))
            return score_fn(space.decode(genome, paths), models, batch, k)

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


# A generation's bookkeeping as programs compiled once per search (run eagerly, each of its
# operations compiled on its own): its keys, what selection sees of its scores, its leader.
@jax.jit
def generation_keys(root: jax.Array, generation) -> tuple[jax.Array, ...]:
    """The keys of a generation (ask, tell, evaluate, validate): derived from the seed's root
    key and the generation's number alone, so that a resumed search draws what it would have."""
    return tuple(jax.random.split(jax.random.fold_in(root, generation), 4))


@functools.partial(jax.jit, static_argnums=0)
def candidate_costs(space: SearchSpace, population: jax.Array) -> jax.Array:
    """`space.cost` of each candidate [P]."""
    return jax.vmap(space.cost)(population)


@functools.partial(jax.jit, static_argnums=0)
def candidate_sources(space: SearchSpace, population: jax.Array) -> jax.Array:
    """`space.sources_used` of each candidate [P, N]."""
    return jax.vmap(space.sources_used)(population)


@functools.partial(jax.jit, static_argnums=(0, 1))
def ranked_scores(space: SearchSpace, pareto: bool, population: jax.Array, scores: jax.Array) -> dict:
    """What selection sees of a generation's scores [P] ([P, M]), each less its candidate's cost,
    with the scores' best and mean (per objective); one objective: also the leader (the best
    of what selection sees) [n], as a population of one [1, n], and its cost."""
    cost = candidate_costs(space, population)
    if pareto:
        return {"fitness": scores - cost[:, None], "best": jnp.max(scores, axis=0), "mean": jnp.mean(scores, axis=0)}
    fitness = scores - cost
    leader = jnp.argmax(fitness)
    return {"fitness": fitness, "best": jnp.max(scores), "mean": jnp.mean(scores),
            "leader": population[leader], "leaders": population[leader][None], "leader_cost": cost[leader]}


# The key, in each checkpoint step's custom metadata, of {array path: SHA-256}: orbax's
# compressed chunks carry no checksum, so a flipped bit can restore as a different number.
CHECKSUMS = "sha256"


def _checkpoint_manager(out_dir: Path) -> ocp.CheckpointManager:
    # Three steps: if the newest is damaged, the one before may be too (same disk, same moment).
    options = ocp.CheckpointManagerOptions(max_to_keep=3, enable_async_checkpointing=False)
    # The one item's handler named up front: without it, reading a step's metadata (before its
    # restore) logs orbax's "Item "default" was found in the checkpoint, but could not be restored".
    return ocp.CheckpointManager((out_dir / "checkpoints").resolve(), options=options,
                                 item_handlers=ocp.StandardCheckpointHandler())


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


def _restore_newest_good(manager: ocp.CheckpointManager, template) -> tuple[int, Any]:
    """(step, contents) of the newest checkpoint step that restores and matches its checksums.
    The newer, rejected steps are deleted (the resumed run saves them again) after a warning
    naming them; with no good step, a ValueError naming the directory and each step's fault.
    Every process of a multi-host run reads the same files, so all choose (and delete) alike."""
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
        return step, restored
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


def strong_types(tree):
    """Each leaf with its dtype fixed (JAX's weak types dropped; no copy where there are none):
    init's, tell's and a restored state then have one signature, so that ask and tell compile
    once in a session, resumed or not."""
    return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), tree)


def _host_copy(tree):
    """Plain numpy leaves: what a multi-host checkpoint of replicated search state holds."""
    return jax.tree.map(np.asarray, tree)


def _host_rows(tree, count: int):
    """Each leaf's first `count` rows, as numpy arrays."""
    return jax.tree.map(lambda x: np.asarray(x)[:count], tree)


@dataclasses.dataclass(eq=False)
class PopulationScorer:
    """Scores a population on a fitness minibatch (or, batch_index None, on validation): in
    one jitted program per call, on the mesh if there is one, from the pool's device slots
    if there is one, through `host_fitness` if given. Returns scores [P] (or [P, M])."""
    space: SearchSpace
    paths: tuple[str, ...]
    score_fn: Callable
    data: Any
    fitness_batches: list
    validation_batch: Any
    chunk_size: int | None
    mesh: Any = None
    host_fitness: Callable | None = None
    pool: SourcePool | None = None
    pareto: bool = False

    @classmethod
    def create(cls, space, paths, score_fn, data, fitness_batches, validation_batch, config: SearchConfig, *,
               host_fitness=None, pool=None, pareto=False) -> PopulationScorer:
        """Models sharded (or replicated) once over the layout's mesh, batches replicated."""
        mesh = config.layout.mesh() if config.layout is not None else None
        if mesh is not None:
            data = shard_data(data, mesh)
            fitness_batches = [jax.tree.map(lambda x: global_array(x, replicated(mesh)), b) for b in fitness_batches]
            validation_batch = jax.tree.map(lambda x: global_array(x, replicated(mesh)), validation_batch)
        return cls(space, tuple(sorted(paths)), score_fn, data, fitness_batches, validation_batch,
                   resolved_chunk_size(config.chunk_size), mesh, host_fitness, pool, pareto)

    def run(self, population, keys, data, batch):
        if self.mesh is not None:
            population = global_array(population, replicated(self.mesh))
            keys = global_array(keys, replicated(self.mesh))
        return evaluate_population(self.space, self.paths, self.score_fn, self.chunk_size, population, data, batch,
                                   keys, mesh=self.mesh)

    def run_pooled(self, population, keys, batch):
        """The population in groups whose sources fit the pool's device slots, each group's
        candidates `call` at a time (padded with its first): one program for every call."""
        mesh = self.mesh
        used = np.asarray(candidate_sources(self.space, population))
        place = (lambda x: shard_data(x, mesh)) if mesh is not None else jax.device_put
        call = (self.chunk_size or 1) * (mesh.shape[POPULATION] if mesh is not None else 1)
        parts, order = [], []
        for members, slots in self.pool.groups(used):
            resident = self.pool.resident(slots, place)
            for start in range(0, len(members), call):
                chunk = members[start:start + call]
                padded = np.concatenate([chunk, np.repeat(chunk[:1], call - len(chunk))])
                out = self.run(population[padded], keys[padded], {**self.data, **resident}, batch)
                parts.append(_host_rows(out, len(chunk)))  # without the padding
                order.append(chunk)
        inverse = np.argsort(np.concatenate(order))
        return jax.tree.map(lambda *xs: np.concatenate(xs)[inverse], *parts)

    def __call__(self, population, batch_index: int | None, key):
        batch = self.validation_batch if batch_index is None else self.fitness_batches[batch_index]
        keys = jax.random.split(key, population.shape[0])
        if self.pool is None:
            outputs = self.run(population, keys, self.data, batch)
        else:
            outputs = self.run_pooled(population, keys, batch)
        if self.host_fitness is not None:
            return jnp.asarray(self.host_fitness(jax.tree.map(np.asarray, outputs), batch_index), jnp.float32)
        return jnp.asarray(np.asarray(outputs)) if jax.process_count() > 1 or self.pool is not None else outputs

    def priced(self, population):
        """Each candidate's cost: [P], or [P, 1] against a Pareto search's [P, M] scores."""
        cost = candidate_costs(self.space, population)
        return cost[:, None] if self.pareto else cost


@dataclasses.dataclass
class Resumed:
    """Where a search starts: the newest good checkpoint (or the initial state, at generation
    0, `step` None) and the log's entries before it."""
    manager: ocp.CheckpointManager
    saved: dict
    history: list[dict]
    log_path: Path
    step: int | None


def resume_search(out_dir: Path, saved: dict) -> Resumed:
    """The checkpoint manager, the newest good checkpoint (or `saved`, at generation 0) and
    the log's entries before it; the log rewritten to those (replaced whole, not truncated:
    other processes may be reading it)."""
    manager = _checkpoint_manager(out_dir)
    step = None
    if manager.all_steps():
        step, restored = _restore_newest_good(manager, _host_copy(saved) if jax.process_count() > 1 else saved)
        # As uncommitted arrays, like a fresh search's state: orbax returns them committed to a
        # device, and a committed population would compile every program a second time.
        saved = jax.tree.map(lambda x: jnp.asarray(np.asarray(x)), restored)
    log_path = out_dir / "generations.jsonl"
    history = _read_log(log_path, int(saved["generation"]))
    if is_primary():
        staging = log_path.with_name(log_path.name + ".tmp")
        staging.write_text("".join(json.dumps(entry) + "\n" for entry in history))
        os.replace(staging, log_path)
    return Resumed(manager, saved, history, log_path, step)


def save_generation(manager, checkpoint: dict, generation: int) -> None:
    """The search state after `generation`. The checksums go into the step's own metadata,
    written before orbax commits the step: there is no committed step without them."""
    manager.save(generation + 1, args=ocp.args.StandardSave(_host_copy(checkpoint) if jax.process_count() > 1
                                                            else checkpoint),
                 custom_metadata={CHECKSUMS: _checksums(checkpoint)}, force=True)
    manager.wait_until_finished()


def strategy_sigma(state) -> float | None:
    """The strategy's step size (the mean over dimensions where it keeps one per dimension, as
    SNES does), or None where it has none (NSGA-II)."""
    std = getattr(state, "std", None)
    return None if std is None else float(np.mean(np.asarray(std)))


def eta_seconds(seconds: list[float], remaining: int) -> float:
    """`remaining` generations x the mean time of this session's generations (`seconds`), the
    first left out once there are others: it compiles the programs. A resumed search counts
    from the generation it resumed at."""
    steady = seconds[1:] or seconds
    return remaining * sum(steady) / len(steady)


def progress_line(entry: dict, generations: int, sigma: float | None, seconds: float, eta: float,
                  names: tuple[str, ...] = ()) -> str:
    """A generation's log entry as one line: "generation 3/40: fitness best 0.41 mean 0.3;
    validation 0.43, best so far 0.45; sigma 0.15; 1.25 s/generation, ETA 0:00:46". A Pareto
    search's scores, one per objective, are named by `names` where given: "best [ja_math
    0.41, en_math 0.9]"."""
    def numbers(value) -> str:  # one score, or a Pareto search's one per objective
        if np.ndim(value) == 0:
            return f"{value:.4g}"
        labels = names if len(names) == len(value) else ("",) * len(value)
        return "[" + ", ".join(f"{label} {v:.4g}".lstrip() for label, v in zip(labels, value, strict=True)) + "]"

    parts = [f"fitness best {numbers(entry['best_fitness'])} mean {numbers(entry['mean_fitness'])}"]
    if "front_size" in entry:
        parts.append(f"front {entry['front_size']}")
    else:
        parts.append(f"validation {entry['validation']:.4g}, best so far {entry['best_validation']:.4g}")
    if sigma is not None:
        parts.append(f"sigma {sigma:.4g}")
    parts.append(f"{seconds:.2f} s/generation, ETA {datetime.timedelta(seconds=round(eta))}")
    return f"generation {entry['generation'] + 1}/{generations}: " + "; ".join(parts)


def tracked_metrics(entry: dict, scores, sigma: float | None, seconds: float) -> dict[str, float]:
    """What a tracker records of a generation: the population's fitness statistics, sigma, the
    leader's and the best validation score (a Pareto search: the front's size), the seconds."""
    metrics = population_metrics(np.asarray(scores))
    if sigma is not None:
        metrics["sigma"] = sigma
    if "front_size" in entry:
        metrics["front_size"] = float(entry["front_size"])
    else:
        metrics["validation"], metrics["best_validation"] = entry["validation"], entry["best_validation"]
    metrics["seconds"] = seconds
    return metrics


def announce_resume(resumed: Resumed, generations: int, out_dir: Path) -> None:
    """Says where a resumed search starts (INFO on the primary process): "resuming at
    generation 6 of 12 (checkpoint step 5 in DIR)", generations counted from 1 as in the
    progress lines; a search already complete says so. A checkpoint past `generations` is
    refused (ValueError): its result is not the one a run of `generations` would find."""
    done, step, directory = int(resumed.saved["generation"]), resumed.step, resumed.manager.directory
    if done > generations:
        resumed.manager.close()
        raise ValueError(f"{out_dir}: the search's checkpoint holds {done} generations, more than the {generations} "
                         f"asked for: ask for {done} or more, or choose another directory")
    if step is None:
        return
    level = logging.INFO if is_primary() else logging.DEBUG
    if done < generations:
        log.log(level, "resuming at generation %d of %d (checkpoint step %d in %s)", done + 1, generations, step,
                directory)
    else:
        log.log(level, "the search is complete: its %d generations are in checkpoint step %d in %s; nothing to run",
                generations, step, directory)


def checkpointed_generations(out_dir) -> int:
    """The generations the newest committed checkpoint step of the search in `out_dir` holds
    (0: none), read from the step directories' names: nothing is restored, created or cleaned.
    A damaged newest step makes a resume fall back to an older one (fewer generations)."""
    checkpoints = Path(out_dir) / "checkpoints"
    return max(ocp.utils.checkpoint_steps(checkpoints), default=0) if checkpoints.is_dir() else 0


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread by `sigterm_as_interrupt`: a KeyboardInterrupt, so
    that a run stops as on Ctrl-C; `signum` for the exit status (128 + signum, by convention)."""
    signum = signal.SIGTERM


@contextlib.contextmanager
def sigterm_as_interrupt():
    """For its duration, SIGTERM (`kill`, a scheduler's stop) raises `Terminated`, a
    KeyboardInterrupt, in the main thread: a search stops as on Ctrl-C, after its last
    finished generation's checkpoint, with its files and lock released by the usual cleanup.
    The previous handler is put back at exit. Outside the main thread, where Python takes no
    signals, it does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated(f"terminated by {signal.Signals(signum).name}")

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:  # None: a handler not set from Python, which Python cannot put back; the default stands in
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def run_search(space: SearchSpace, paths, score_fn: Callable, data: Any, fitness_batches: list,
               validation_batch: Any, *, config: SearchConfig, out_dir, progress: bool = True,
               host_fitness: Callable[[Any, int | None], np.ndarray] | None = None,
               pool: SourcePool | None = None) -> SearchResult:
    out_dir = Path(out_dir)
    primary = is_primary()
    if primary:
        out_dir.mkdir(parents=True, exist_ok=True)
    strategy, params = make_strategy(space, config)
    if primary:  # a missing tracker package fails now, not after the models are placed
        check_backend(config.tracking.backend)
    init_key, root = jax.random.split(jax.random.key(config.seed))
    pareto = isinstance(strategy, NSGA2)
    scorer = PopulationScorer.create(space, paths, score_fn, data, fitness_batches, validation_batch, config,
                                     host_fitness=host_fitness, pool=pool, pareto=pareto)
    initial = {"state": strong_types(strategy.init(init_key, space.initial(), params)),
               "best_genome": jnp.asarray(space.initial()), "best_validation": jnp.float32(-jnp.inf),
               "generation": jnp.int32(0)}
    resumed = resume_search(out_dir, initial)
    manager, saved, history, log_path = resumed.manager, resumed.saved, resumed.history, resumed.log_path
    start, state = int(saved["generation"]), saved["state"]
    announce_resume(resumed, config.generations, out_dir)
    best_genome, best_validation = saved["best_genome"], float(saved["best_validation"])

    # Only the primary process reports: the others run the same generations.
    tracker: Tracker = NullTracker()
    if primary and start < config.generations:
        tracker = open_tracker(config.tracking, out_dir, start, {
            "strategy": strategy_name(config.strategy), "generations": config.generations,
            "population_size": getattr(strategy, "population_size", None), "sigma": config.sigma, "seed": config.seed,
            "num_dims": space.num_dims})
    level = logging.INFO if progress and primary else logging.DEBUG
    session_seconds: list[float] = []  # this session's generations, checkpoints included: the ETA's rate
    failed, done = True, start  # done: the generations checkpointed
    try:
        with (log_path.open("a") if primary else contextlib.nullcontext()) as log_file:
            for generation in range(start, config.generations):
                began = time.perf_counter()
                ask_key, tell_key, eval_key, val_key = generation_keys(root, generation)
                population, state = strategy.ask(ask_key, state, params)
                scores = scorer(population, generation % len(scorer.fitness_batches), eval_key)
                ranked = ranked_scores(space, pareto, population, scores)  # selection sees the scores less costs
                state, metrics = strategy.tell(tell_key, population, -ranked["fitness"], state, params)  # minimises
                state = strong_types(state)
                if pareto:  # the front is chosen on validation once, at the end
                    entry = {"generation": generation, "best_fitness": np.asarray(ranked["best"]).tolist(),
                             "mean_fitness": np.asarray(ranked["mean"]).tolist(),
                             "front_size": int(metrics["front_size"]),  # of the parents kept
                             "seconds": time.perf_counter() - began}
                else:
                    leader = ranked["leader"]
                    validation = float(np.asarray(scorer(ranked["leaders"], None, val_key))[0])
                    priced_validation = validation - float(ranked["leader_cost"])
                    if priced_validation > best_validation:
                        best_genome, best_validation = leader, priced_validation
                    entry = {"generation": generation, "best_fitness": float(ranked["best"]),
                             "mean_fitness": float(ranked["mean"]), "validation": validation,
                             "best_validation": best_validation, "seconds": time.perf_counter() - began,
                             "leader": space.describe(leader)}
                # Log, then checkpoint: a kill between the two leaves a log line past the
                # checkpoint, which the resume drops and redoes.
                if primary:
                    log_file.write(json.dumps(entry) + "\n")
                    log_file.flush()
                save_generation(manager, {"state": state, "best_genome": best_genome,
                                           "best_validation": jnp.float32(best_validation),
                                           "generation": jnp.int32(generation + 1)}, generation)
                done = generation + 1
                history.append(entry)
                session_seconds.append(time.perf_counter() - began)
                sigma = strategy_sigma(state)
                if primary:
                    tracker.log_generation(generation, tracked_metrics(entry, scores, sigma, session_seconds[-1]),
                                           None if pareto else np.asarray(best_genome))
                log.log(level, "%s", progress_line(entry, config.generations, sigma, session_seconds[-1],
                                                   eta_seconds(session_seconds, config.generations - generation - 1),
                                                   config.objective_names))
        failed = False
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM under `sigterm_as_interrupt`: the checkpoints stay as they are
        log.warning("interrupted at generation %d of %d; rerun the same command to resume", done + 1,
                    config.generations)
        raise
    finally:
        tracker.close(failed)
        manager.close()
    if pareto:
        return pareto_result(strategy.parents(state), scorer, scorer.priced,
                             jax.random.fold_in(root, config.generations), history, out_dir)
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
