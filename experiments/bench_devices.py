"""Candidates per second of the toy ja_math search (DARE-TIES per layer, 64 problems of
4 new tokens per candidate) on 1, 2, 4 and 8 host devices, each count in its own process
(XLA_FLAGS=--xla_force_host_platform_device_count=N), population split over the devices.
Prints each rate and its ratio to one device. On a machine with accelerators, pass
--platform gpu (or tpu) and the device counts it has.

    python experiments/bench_devices.py [--generations 12] [--counts 1 2 4 8] [--population 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys


def measure(generations: int, population: int, layout: str) -> dict:
    """One device count's rate: the toy ja_math problem as `jaxmerge.evolve` sets it up
    (`MergeProblem`), searched on the given layout."""
    import dataclasses
    import time
    from pathlib import Path
    from tempfile import TemporaryDirectory

    import jax

    import jaxmerge
    from jaxmerge.checkpoint import load_tokenizer
    from jaxmerge.experiments import ja_math
    from jaxmerge.parallel import Layout
    from jaxmerge.pipeline.problem import MergeProblem, fitness_batches, prepare_tasks, search_config
    from jaxmerge.pipeline.sources import load_sources, tokenizer_dir
    from jaxmerge.search import run_search

    config = ja_math.config_from_args(ja_math.parse_args(["--method", "dare_ties", "--no-dfs", "--test-size", "10"]))
    tokenizer = load_tokenizer(tokenizer_dir(config))
    tasks = prepare_tasks(config, tokenizer)
    problem = MergeProblem.from_config(config, load_sources(config, jaxmerge.load, tokenizer))
    fitness = fitness_batches(config, tasks, tokenizer)
    search = dataclasses.replace(search_config(config, Layout.parse(layout)), generations=generations,
                                 population_size=population)
    with TemporaryDirectory() as tmp:
        began = time.perf_counter()
        result = run_search(problem.space, problem.paths, problem.score_fn(fitness), problem.data, fitness.batches,
                            fitness.validation, config=search, out_dir=Path(tmp) / "search", progress=False)
        total = time.perf_counter() - began
    steady = sum(h["seconds"] for h in result.history[2:])  # the first two generations compile
    return {"devices": jax.device_count(), "layout": layout, "population": population,
            "candidates_per_second": (generations - 2) * population / steady, "seconds": total,
            "best_validation": result.best_validation}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=12)
    parser.add_argument("--population", type=int, default=16)
    parser.add_argument("--counts", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--platform", default="cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(args.generations, args.population, args.worker)))
        return
    rows = []
    for count in args.counts:
        env = dict(os.environ, JAX_PLATFORMS=args.platform)
        if args.platform == "cpu":
            env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={count}"
        out = subprocess.run([sys.executable, __file__, "--worker", f"{count}x1", "--generations",
                              str(args.generations), "--population", str(args.population)],
                             env=env, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
        r = rows[-1]
        print(f"{count} {args.platform} device(s), layout {r['layout']}: {r['candidates_per_second']:.1f} "
              f"candidates/s ({r['candidates_per_second'] / rows[0]['candidates_per_second']:.2f}x one device), "
              f"best validation {r['best_validation']:.3f}", flush=True)
    print(f"(os.cpu_count() = {os.cpu_count()}: host devices share these cores)")


if __name__ == "__main__":
    main()
