"""Search speed: jaxmerge's PS search against the mergekit-evolve loop, candidates per second.

Both run the toy ja_math problem (the shipped toy world: base, japanese and math checkpoints;
ja_math's default genome, DARE-TIES per layer; its Japanese math prompts and 4 new tokens):

- jaxmerge: the PS search as `jaxmerge.evolve` runs it (pipeline/problem.py's MergeProblem): models loaded and
  source statistics prepared once, then `jaxmerge.search.run_search` with CMA-ES, whose every
  generation merges and scores the whole population in one jitted call (on CPU one candidate
  after another, on GPU/TPU vmapped: `SearchConfig.chunk_size`'s default; merge in memory,
  greedy generation, the metric on token ids), scores the generation's leader on the
  validation split and checkpoints the search state (orbax). Timed after --warmup generations
  (2: both still compile); the first generation's time less a steady one's is its compile.
- mergekit-evolve loop: what mergekit 0.1.5's `mergekit-evolve` does per candidate (evo/helpers.py
  `merge_model` + `evaluate_model`, the on-disk evaluator): the candidate's recipe as a
  `MergeConfiguration` merged to a fresh temporary directory by `mergekit.merge.run_merge` (with
  mergekit-evolve's `MergeOptions`), loaded by `AutoModelForCausalLM.from_pretrained` and
  `AutoTokenizer.from_pretrained`, evaluated, deleted. In place of lm-eval and vLLM:
  transformers' `generate` on the same prompts (the same token ids, BOS included), greedy,
  the same max_new_tokens, one batch left-padded, scored by the same metric on decoded text.
  Candidates are draws of the same CMA-ES start distribution (initial mean + sigma * N(0, 1)),
  as recipes by jaxmerge's mergekit export (`genome_recipe`) plus mergekit-evolve's merge-wide
  `int8_mask`; dtype float32 (the checkpoints' and jaxmerge's) and bfloat16 (which
  mergekit-evolve hardcodes for the merge and for lm-eval's model). torch runs on 1 thread or
  its default, whichever generates faster here (measured first: on a tiny model, or on a busy
  machine, OpenMP's threads can cost many times their work). The first candidate is untimed.

    python experiments/bench_search.py [--candidates 32] [--prompts 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

import jaxmerge
from jaxmerge.checkpoint import load_tokenizer
from jaxmerge.eval import metrics as text_metrics
from jaxmerge.experiments import ja_math
from jaxmerge.pipeline.problem import MergeProblem, fitness_batches, prepare_tasks, search_config
from jaxmerge.pipeline.sources import default_layout, load_sources, tokenizer_dir
from jaxmerge.search import default_population_size, resolved_chunk_size, run_search
from jaxmerge.search.export import genome_recipe


def toy_config(args: argparse.Namespace):
    """ja_math's default toy configuration, the target task's minibatch set to --prompts."""
    config = ja_math.config_from_args(ja_math.parse_args(["--seed", str(args.seed), "--no-dfs", "--test-size", "10"]))
    tasks = tuple(dataclasses.replace(t, minibatch=args.prompts) if t.optimised else t for t in config.tasks)
    return dataclasses.replace(config, tasks=tasks)


def setup(config):
    """What `jaxmerge.evolve` builds before its PS search: tokenizer, tasks, the merge problem
    (models loaded, sources stacked, their statistics prepared) and the fitness batches."""
    tokenizer = load_tokenizer(tokenizer_dir(config))
    tasks = prepare_tasks(config, tokenizer)
    sources = load_sources(config, functools.partial(jaxmerge.load, dtype=config.genome.dtype), tokenizer)
    return tokenizer, tasks, MergeProblem.from_config(config, sources), fitness_batches(config, tasks, tokenizer)


def bench_jaxmerge(config, candidates: int, warmup: int) -> dict:
    began = time.perf_counter()
    tokenizer, tasks, problem, fitness = setup(config)
    space = problem.space
    jax.block_until_ready(problem.data)
    setup_seconds = time.perf_counter() - began

    population = config.search.population or default_population_size(space.num_dims)
    timed = math.ceil(candidates / population)
    search = dataclasses.replace(search_config(config, default_layout(config.layout)), generations=warmup + timed,
                                 population_size=population)
    with tempfile.TemporaryDirectory(prefix="bench_search_") as tmp:
        result = run_search(space, problem.paths, problem.score_fn(fitness), problem.data, fitness.batches,
                            fitness.validation, config=search, out_dir=Path(tmp) / "search", progress=False)
    seconds = [h["seconds"] for h in result.history]
    steady = sum(seconds[warmup:])
    per_generation = steady / timed
    return {"setup": setup_seconds, "population": population, "generations": len(seconds), "timed_generations": timed,
            "seconds": seconds, "candidates": timed * population, "steady": steady,
            "chunk_size": resolved_chunk_size(search.chunk_size),
            "rate": timed * population / steady, "first": seconds[0], "compile": seconds[0] - per_generation,
            "mean_fitness": statistics.mean(h["mean_fitness"] for h in result.history) * 100,
            "validation_rows": len(tasks[0].validation), "space": space, "tokenizer": tokenizer, "tasks": tasks,
            "fitness": fitness, "paths": problem.paths}


def candidate_genomes(space, count: int, sigma: float, seed: int) -> np.ndarray:
    """Draws of CMA-ES's first generation: the initial mean plus sigma times standard normals."""
    rng = np.random.default_rng(seed)
    return np.asarray(space.initial())[None] + sigma * rng.standard_normal((count, space.num_dims))


def pick_torch_threads(checkpoint: str, prompts: list[str], max_new_tokens: int) -> tuple[int, dict]:
    """The faster torch thread count for the mergekit loop's generate, 1 or torch's default:
    on a small model (or a busy machine, where OpenMP threads wait on each other) one thread can
    be many times faster. Returns (threads, {threads: median seconds of a generate call})."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    tokenizer.padding_side = "left"
    encoded = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    batch = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
    default, seconds = torch.get_num_threads(), {}
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        times = []
        for _ in range(4):
            began = time.perf_counter()
            with torch.inference_mode():
                model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                               eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            times.append(time.perf_counter() - began)
        seconds[threads] = statistics.median(times[1:])
    best = min(seconds, key=seconds.get)
    torch.set_num_threads(best)
    return best, seconds


def bench_mergekit(config, space, paths: list[str], prompts: list[str], answers: list[str], reference_ids: np.ndarray,
                   max_new_tokens: int, language: str | None, genomes: np.ndarray, dtype: str,
                   strict: bool = False) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    storage = Path(tempfile.mkdtemp(prefix="bench_search_mergekit_"))
    # mergekit-evolve's options (scripts/evolve.py), on the CPU
    options = MergeOptions(transformers_cache=str(storage / "transformers_cache"),
                           lora_merge_cache=str(storage / "lora_merge_cache"), cuda=False, low_cpu_memory=False,
                           out_shard_size=1_000_000_000_000, trust_remote_code=False, allow_crimes=False,
                           random_seed=config.search.seed, quiet=True, read_to_gpu=False, copy_tokenizer=True,
                           safe_serialization=True)
    torch_dtype = getattr(torch, dtype)
    times, merge_times, load_times, eval_times, scores = [], [], [], [], []
    try:
        for genome in genomes:
            began = time.perf_counter()
            recipe = yaml.safe_load(genome_recipe(space, jnp.asarray(genome, jnp.float32), config.genome.base_model,
                                                  list(config.genome.models), paths, dtype=dtype))
            recipe.setdefault("parameters", {})["int8_mask"] = True  # as mergekit-evolve's genome writes it
            merge_config = MergeConfiguration.model_validate(recipe)
            # evo/helpers.py merge_model
            (storage / "merged").mkdir(exist_ok=True)
            out = tempfile.mkdtemp(prefix="merged", dir=storage / "merged")
            run_merge(merge_config, out_path=out, options=options)
            merged = time.perf_counter()
            # evo/helpers.py evaluate_model: lm-eval's HFLM(pretrained=out, dtype=..., use_cache=True)
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype, use_cache=True).eval()
            tokenizer = AutoTokenizer.from_pretrained(out)
            tokenizer.padding_side = "left"
            loaded = time.perf_counter()
            encoded = [[tokenizer.bos_token_id] + tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
            batch = tokenizer.pad({"input_ids": encoded}, padding=True, return_tensors="pt")
            with torch.inference_mode():
                output = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False,
                                        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
            responses = []
            for row in output[:, batch["input_ids"].shape[1]:].tolist():
                if tokenizer.eos_token_id in row:
                    row = row[:row.index(tokenizer.eos_token_id)]
                responses.append(tokenizer.decode(row, skip_special_tokens=True))
            scores.append(100 * np.mean([
                text_metrics.number_correct(r, text_metrics.extract_number(a), language, strict)
                for r, a in zip(responses, answers, strict=True)]))
            shutil.rmtree(out)  # evaluate_model's `finally`
            done = time.perf_counter()
            times.append(done - began)
            merge_times.append(merged - began)
            load_times.append(loaded - merged)
            eval_times.append(done - loaded)
            if len(times) == 1:  # the same token ids as jaxmerge's fitness batch (its padding aside)
                ids = batch["input_ids"].numpy()
                same = all(np.array_equal(a[m.astype(bool)], b[b != tokenizer.pad_token_id])
                           for a, m, b in zip(ids, batch["attention_mask"].numpy(), reference_ids, strict=True))
                if not same:
                    raise RuntimeError("transformers' prompt ids differ from jaxmerge's fitness batch")
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    # the first candidate pays for lazy imports and first-call set-up: reported, not timed
    steady = times[1:] or times
    return {"first": times[0], "rate": len(steady) / sum(steady), "candidates": len(steady),
            "merge": statistics.median(merge_times), "load": statistics.median(load_times),
            "eval": statistics.median(eval_times), "mean_fitness": float(np.mean(scores))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--candidates", type=int, default=32, help="candidates timed per loop (jaxmerge: rounded "
                        "up to whole generations)")
    parser.add_argument("--prompts", type=int, default=64, help="fitness prompts per candidate (default: the toy "
                        "ja_math fitness minibatch, 64)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--warmup", type=int, default=2, help="jaxmerge generations before timing: the first "
                        "compiles the search's programs, the second still some of CMA-ES's (default 2)")
    parser.add_argument("--mergekit-dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    transformers_logging.disable_progress_bar()  # from_pretrained's per-candidate "Loading weights" bars
    load_before = os.getloadavg()[0]

    config = toy_config(args)
    print(f"toy ja_math (seed {args.seed}): {config.genome.merge_method}, genome "
          f"{config.genome.layer_groups} layer groups; JAX on {jax.devices()[0].platform}, "
          f"{torch.get_num_threads()} torch threads")
    ours = bench_jaxmerge(config, args.candidates, args.warmup)
    task = ours["fitness"].tasks[0]
    batch = ours["fitness"].batches[0][task.name]
    prompts, answers = list(task.fitness.prompts[:args.prompts]), list(task.fitness.answers[:args.prompts])
    new_tokens = task.spec.max_new_tokens
    print(f"jaxmerge: {ours['generations']} generations x {ours['population']} candidates, per generation (s): "
          + " ".join(f"{s:.2f}" for s in ours["seconds"]))
    threads, calibration = pick_torch_threads(config.genome.models[0], prompts, new_tokens)
    print(f"torch threads for the mergekit loop: {threads} (generate on one source: "
          + ", ".join(f"{t} thread(s) {s * 1e3:.0f} ms" for t, s in calibration.items()) + ")")
    genomes = candidate_genomes(ours["space"], args.candidates + 1, config.search.sigma, args.seed)
    theirs = {dtype: bench_mergekit(config, ours["space"], ours["paths"], prompts, answers, np.asarray(batch["ids"]),
                                    new_tokens, task.spec.language, genomes, dtype, task.spec.language_strict)
              for dtype in args.mergekit_dtypes}

    print(f"\nper candidate: {len(prompts)} prompts x {new_tokens} new tokens = {len(prompts) * new_tokens} "
          f"tokens (greedy); jaxmerge also scores each generation's leader on {ours['validation_rows']} validation "
          f"prompts ({ours['validation_rows'] / ours['population']:.1f} per candidate), included in its time")
    print(f"jaxmerge set-up (load, stack, prepare, fitness batches): {ours['setup']:.2f} s; first generation "
          f"{ours['first']:.2f} s, of which compile ~{ours['compile']:.2f} s; untimed warm-up generations "
          + ", ".join(f"{s:.2f} s" for s in ours["seconds"][:args.warmup])
          + f"; steady {ours['steady'] / ours['timed_generations']:.2f} s a generation")
    how = {None: "vmapped population", 1: "candidates in sequence"}.get(ours["chunk_size"],
                                                                          f"chunks of {ours['chunk_size']}")
    rows = [(f"jaxmerge PS search (run_search, {how})", ours["candidates"], f"{ours['rate']:.2f}",
             "1.00x", f"{ours['mean_fitness']:.1f}")]
    for dtype, r in theirs.items():
        rows.append((f"mergekit-evolve loop, {dtype}" + (" (as mergekit-evolve)" if dtype == "bfloat16" else ""),
                     r["candidates"], f"{r['rate']:.2f}", f"{ours['rate'] / r['rate']:.2f}x",
                     f"{r['mean_fitness']:.1f}"))
    print(f"\nload average (1 min) {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end, on "
          f"{os.cpu_count()} cores: both loops share what else runs")
    print("| loop | candidates | candidates/s | jaxmerge / loop | mean fitness |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    for dtype, r in theirs.items():
        print(f"mergekit-evolve loop {dtype}, median per candidate: run_merge {r['merge'] * 1e3:.0f} ms, "
              f"from_pretrained + tokenizer {r['load'] * 1e3:.0f} ms, generate + score {r['eval'] * 1e3:.0f} ms "
              f"(first candidate {r['first']:.2f} s, untimed)")


if __name__ == "__main__":
    main()
