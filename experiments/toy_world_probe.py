"""Probe of the ja_math toy world (issue 4, before its experiment module exists): build
the toy models, then score on held-out Japanese addition problems the sources, trivial
baselines, task arithmetic with hand-set weights, and a CMA-ES search over per-layer-group
task-arithmetic weights.

    python experiments/toy_world_probe.py [--world DIR] [--seed 0] [--groups 6] [--generations 40]

--world reuses models built by an earlier run (DIR/base, DIR/japanese, DIR/math).
"""

from __future__ import annotations

import argparse
import collections
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from transformers import AutoTokenizer

import jaxmerge
from jaxmerge.experiments import toy_world as tw
from jaxmerge.merge import flat_params, merge_params, stack_sources, with_params
from jaxmerge.search import GenomeSpace, SearchConfig, run_search

NEW_TOKENS = 3  # "<d>こ</s>" or "<dd>こ"
PROMPT_LENGTH = 72


def problems(tokenizer, template, count: int, seed: int) -> dict:
    """Left-padded prompts, and each answer's first NEW_TOKENS tokens (then EOS)."""
    rng = np.random.default_rng(seed)
    items = [template(rng) for _ in range(count)]
    ids = np.zeros((count, PROMPT_LENGTH), np.int32)
    mask = np.zeros((count, PROMPT_LENGTH), np.int32)
    answers = np.full((count, NEW_TOKENS), tokenizer.eos_token_id, np.int32)
    for row, (prompt, answer) in enumerate(items):
        encoded = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
        ids[row, -len(encoded):] = encoded
        mask[row, -len(encoded):] = 1
        target = (tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id])[:NEW_TOKENS]
        answers[row, :len(target)] = target
    return {"ids": jnp.asarray(ids), "mask": jnp.asarray(mask), "answers": jnp.asarray(answers), "items": items}


def accuracy(model, batch, eos: int):
    out = jaxmerge.generate(model, batch["ids"], NEW_TOKENS, eos_token_id=eos, attention_mask=batch["mask"])
    return jnp.mean(jnp.all(out[:, -NEW_TOKENS:] == batch["answers"], axis=-1))


def trivial_baselines(items) -> dict[str, float]:
    answers = [a for _, a in items]
    numbers = [[c for c in prompt if c.isdigit()] for prompt, _ in items]
    return {"always the commonest answer": collections.Counter(answers).most_common(1)[0][1] / len(answers),
            "copy the first number": float(np.mean([f"{n[0]}こ" == a for n, a in zip(numbers, answers)])),
            "copy the second number": float(np.mean([f"{n[1]}こ" == a for n, a in zip(numbers, answers)]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--groups", type=int, default=6)
    parser.add_argument("--generations", type=int, default=40)
    args = parser.parse_args()

    start = time.perf_counter()
    world = Path(args.world) if args.world else Path(tempfile.mkdtemp(prefix="toy_world_"))
    if not (world / "math" / "config.json").exists():
        tw.build_world(world, seed=args.seed)
        print(f"built the toy world in {time.perf_counter() - start:.0f} s: {world}")
    tokenizer = AutoTokenizer.from_pretrained(world / "base")
    eos = tokenizer.eos_token_id
    models = {name: jaxmerge.load(world / name) for name in ("base", "japanese", "math")}
    tests = {name: problems(tokenizer, tw.TEMPLATES[name], 300, 1000 + args.seed)
             for name in ("japanese_math", "english_math", "japanese_qa", "arithmetic")}

    print(f"\n{'model':32}" + "".join(f"{name:>15}" for name in tests))
    for name, model in models.items():
        print(f"{name:32}" + "".join(f"{100 * float(accuracy(model, t, eos)):14.1f}%" for t in tests.values()))
    for name, value in trivial_baselines(tests["japanese_math"]["items"]).items():
        print(f"{name:32}{100 * value:14.1f}%")

    base = flat_params(models["base"])
    sources = stack_sources(base, [flat_params(models[n]) for n in ("japanese", "math")])
    paths = sorted(base)
    target = tests["japanese_math"]

    def merged(params):
        return with_params(models["base"], merge_params("task_arithmetic", base, sources, params))

    space = GenomeSpace("task_arithmetic", num_sources=2, num_layers=models["base"].config.num_layers,
                        evolve=("weight",), layer_groups=args.groups, initial_value=1.0)
    for weights in [(0.5, 0.5), (1.0, 1.0), (1.0, 0.5), (0.5, 1.0), (1.5, 1.5)]:
        params = {p: {"weight": jnp.asarray(weights, jnp.float32)} for p in paths}
        print(f"{'task arithmetic ' + str(weights):32}{100 * float(accuracy(merged(params), target, eos)):14.1f}%")

    def score(params, data, batch, key):
        merged_params = merge_params("task_arithmetic", data["base"], data["sources"], params)
        return accuracy(with_params(models["base"], merged_params), batch, eos)

    fitness = [problems(tokenizer, tw.japanese_math, 64, 10 + i) for i in range(4)]
    validation = problems(tokenizer, tw.japanese_math, 100, 99)
    strip = lambda b: {k: v for k, v in b.items() if k != "items"}  # noqa: E731
    began = time.perf_counter()
    result = run_search(space, paths, score, {"base": base, "sources": sources}, [strip(b) for b in fitness],
                        strip(validation), config=SearchConfig(generations=args.generations, seed=args.seed),
                        out_dir=tempfile.mkdtemp(prefix="toy_search_"), progress=False)
    evolved = merged(space.decode(jnp.asarray(result.best_genome), paths))
    print(f"{'evolved (CMA-ES, ' + str(args.groups) + ' groups)':32}"
          + "".join(f"{100 * float(accuracy(evolved, t, eos)):14.1f}%" for t in tests.values()))
    print(f"\nsearch: {args.generations} generations in {time.perf_counter() - began:.0f} s; "
          f"evolved weights {space.describe(result.best_genome)['weight']}; total {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
