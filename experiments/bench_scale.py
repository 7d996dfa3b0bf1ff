"""Speed and memory at real shapes (0.5B to 7B): where a search candidate's time goes, against
the hardware bound and the mergekit-evolve loop, and the disk-to-disk merge against the I/O floor.

Random weights at a real model's shape (--shape, default Qwen2-0.5B: 494M parameters, tied
embeddings, a 151,936-token vocabulary). Three parts, each in processes of its own (so that
peak RSS and compile counts are each tool's own):

- decode: jaxmerge's greedy generation (`jaxmerge.generate`, one jit for prefill and the decode
  loop) on a random model of the shape, float32 and bfloat16: prefill's share of the measured
  matmul peak, and a decode step against the weight-streaming bound (the weights' bytes over the
  measured read bandwidth). Step time = (time for N new tokens - time for 1) / (N - 1).
- search: a base and two fine-tunes written as checkpoints (float32), the toy ja_math prompts
  (its tokenizer copied in; 16 prompts, 16 new tokens, the toy's TIES genome per layer);
  jaxmerge's PS search (`run_search`, as `jaxmerge evolve` runs it: load, stack, then generations
  that each merge and score a population in one jitted call) against the mergekit-evolve loop of
  bench_search.py (`run_merge` to disk, `from_pretrained`, `generate`), per candidate. The two
  alternate round by round. jaxmerge's process also reports its peak RSS against "sources + base
  + one merged model" and the compilations after its first generation (zero expected).
- disk: `experiments/bench_merge.py --sizes 1B --floor`: the TinyLlama-1.1B-shaped disk-to-disk
  merge (bf16, base + 2) against mergekit-yaml and the I/O floor.

    python experiments/bench_scale.py [--shape qwen2-0.5b] [--parts decode,search,disk] [--repeats 3]

On an accelerator (bench_gpu.py calls it) --shape goes up to qwen2-7b; the mergekit loop runs
on the CPU torch as mergekit-evolve's lm-eval would without a GPU, so the search part is CPU-only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent

# transformers config fields of each shape (random weights; the architecture decides biases and ties)
SHAPES = {
    "tiny": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=1024, hidden_size=64,
                 intermediate_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                 tie_word_embeddings=True),  # a smoke test of the script
    "qwen2-0.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=896,
                       intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       tie_word_embeddings=True),
    "qwen2-1.5b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=151936, hidden_size=1536,
                       intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                       tie_word_embeddings=True),
    "tinyllama-1.1b": dict(architectures=["LlamaForCausalLM"], model_type="llama", vocab_size=32000, hidden_size=2048,
                           intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4, tie_word_embeddings=False),
    "qwen2-7b": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=152064, hidden_size=3584,
                     intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                     tie_word_embeddings=False),
}


def hf_config(shape: str) -> dict:
    return dict(SHAPES[shape], hidden_act="silu", rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                max_position_embeddings=4096, dtype="float32")


def tensor_shapes(shape: str) -> dict[str, tuple[int, ...]]:
    """transformers' parameter names and shapes of a checkpoint of the shape."""
    s = SHAPES[shape]
    d, f, v, layers = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
    bias = s["model_type"] == "qwen2"
    shapes = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not s["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                       p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                       p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                       p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                       p + "post_attention_layernorm.weight": (d,)})
        if bias:
            shapes.update({p + "self_attn.q_proj.bias": (d,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def write_family(root: Path, shape: str, tokenizer_from: Path) -> list[Path]:
    """base, ft0, ft1 (base + noise of std 0.004 and 0.006), float32, with the toy tokenizer's files."""
    from safetensors.numpy import save_file

    shapes = tensor_shapes(shape)
    dirs = [root / name for name in ("base", "ft0", "ft1")]
    if all((d / "model.safetensors").exists() for d in dirs):
        return dirs
    rng = np.random.default_rng(0)
    for directory, noise in zip(dirs, (0.0, 0.004, 0.006), strict=True):
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i, (name, size) in enumerate(shapes.items()):  # the same base values in each model
            base = (np.ones(size, np.float32) if "norm" in name
                    else np.random.default_rng(i).standard_normal(size, np.float32) * 0.02)
            tensors[name] = base + noise * rng.standard_normal(size, np.float32) if noise else base
        save_file(tensors, str(directory / "model.safetensors.tmp"), metadata={"format": "pt"})
        os.replace(directory / "model.safetensors.tmp", directory / "model.safetensors")
        (directory / "config.json").write_text(json.dumps(hf_config(shape)))
        for file in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(tokenizer_from / file, directory / file)
        del tensors
    return dirs


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class CompileCounter:
    """Backend compilations (jax.monitoring's compile-duration event), each tagged with the
    number of generations the search had logged (lines of its generations.jsonl) when it ran."""

    def __init__(self, log: Path):
        import jax

        self.log, self.at = log, []
        jax.monitoring.register_event_duration_secs_listener(self._on_event)

    def _on_event(self, event: str, duration: float, **_) -> None:
        if event == "/jax/core/compile/backend_compile_duration":
            self.at.append(len(self.log.read_text().splitlines()) if self.log.exists() else 0)

    def after(self, generations: int) -> int:
        """Compilations while generations after the first ran (the last one's end excluded)."""
        return sum(1 <= done < generations for done in self.at)


# ============================================================================ workers (one process each)


def hardware_bounds(batch: int, head: tuple[int, int], scale: int = 1) -> dict:
    """What this machine reaches, best of 5: read bandwidth (a sum over 1 GiB of float32, GB/s);
    the matmul peak (GFLOP/s: [1024, 4096] x [4096, 4096], bf16 accumulated in float32 as the
    models' matmuls are); and the bandwidth a decode step's matmul reaches (GB/s of weights:
    [batch, D] x [D, V], the shape's output head (hidden D, vocabulary V) alone). `scale` divides
    the first two's dimensions (a smoke run)."""
    import jax
    import jax.numpy as jnp

    def best(fn, *args):
        jax.block_until_ready(fn(*args))
        times = []
        for _ in range(5):
            began = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times.append(time.perf_counter() - began)
        return min(times)

    def dot(a, b):
        return jnp.dot(a, b, preferred_element_type=jnp.float32).astype(a.dtype)

    x = jnp.ones((2**28 // scale**2,), jnp.float32)
    bandwidth = x.nbytes / best(jax.jit(jnp.sum), x) / 1e9
    del x
    peaks, decode = {}, {}
    for dtype in ("float32", "bfloat16"):
        m, n = 1024 // scale, 4096 // scale
        a, b = jnp.ones((m, n), dtype), jnp.ones((n, n), dtype)
        peaks[dtype] = 2 * m * n * n / best(jax.jit(dot), a, b) / 1e9
        w = jnp.ones(head, dtype)
        decode[dtype] = w.nbytes / best(jax.jit(dot), jnp.ones((batch, w.shape[0]), dtype), w) / 1e9
    return {"bandwidth": bandwidth, "matmul": peaks, "decode_matmul": decode}


def worker_decode(args) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxmerge
    from jaxmerge.architectures import architecture_by_name

    shape = SHAPES[args.shape]
    bounds = hardware_bounds(args.batch, (shape["hidden_size"], shape["vocab_size"]), 8 if args.shape == "tiny" else 1)
    arch = architecture_by_name(SHAPES[args.shape]["architectures"][0])
    config = arch.parse_config(hf_config(args.shape), f"<{args.shape}>")
    out = {"bounds": bounds, "dtypes": {}}
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, (args.batch, args.prompt_length)).astype(np.int32)
    for dtype in ("float32", "bfloat16"):
        model = arch.build(config, dtype=jnp.dtype(dtype), rngs=nnx.Rngs(0))
        state = nnx.state(model, nnx.Param)
        weight_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
        params = sum(x.size for x in jax.tree.leaves(state))
        embedding = SHAPES[args.shape]["vocab_size"] * SHAPES[args.shape]["hidden_size"]
        times = {1: [], args.new_tokens: []}
        for _ in range(args.repeats + 1):  # the first round compiles
            for n in times:
                began = time.perf_counter()
                jax.block_until_ready(jaxmerge.generate(model, ids, n))
                times[n].append(time.perf_counter() - began)
        prefill = [t for t in times[1][1:]]
        steps = [(a - b) / (args.new_tokens - 1) for a, b in zip(times[args.new_tokens][1:], times[1][1:],
                                                                 strict=True)]
        # prefill FLOPs: every weight but the embedding's lookup, once per prompt token, and the head at one position
        tokens = args.batch * args.prompt_length
        head = embedding * args.batch
        flops = 2 * ((params - embedding) * tokens + head if config.tie_word_embeddings
                     else (params - 2 * embedding) * tokens + head)
        bound = weight_bytes / (bounds["bandwidth"] * 1e9)
        dot_bound = weight_bytes / (bounds["decode_matmul"][dtype] * 1e9)
        out["dtypes"][dtype] = {
            "weight_gb": weight_bytes / 1e9, "prefill_s": [min(prefill), statistics.median(prefill)],
            "prefill_utilisation": [flops / t / 1e9 / bounds["matmul"][dtype] for t in
                                    (min(prefill), statistics.median(prefill))],
            "step_s": [min(steps), statistics.median(steps)], "step_bound_s": bound,
            "step_over_bound": [min(steps) / bound, statistics.median(steps) / bound],
            "step_dot_bound_s": dot_bound, "step_over_dot_bound": [min(steps) / dot_bound,
                                                                   statistics.median(steps) / dot_bound]}
        del model, state
    return out


def search_config(args, dirs: list[Path]):
    """The toy ja_math configuration on the random checkpoints: TIES per layer group, --prompts
    fitness prompts, --new-tokens new tokens, population --population."""
    sys.path.insert(0, str(HERE))
    import bench_search

    from jaxmerge.experiments import ja_math

    config = ja_math.config_from_args(ja_math.parse_args(["--seed", "0", "--no-dfs", "--test-size", "10",
                                                          "--method", "ties", "--layer-groups",
                                                          str(args.layer_groups)]))
    genome = dataclasses.replace(config.genome, base_model=str(dirs[0]), models=(str(dirs[1]), str(dirs[2])),
                                 names=("ft0", "ft1"), dtype="float32")
    # validation: --prompts rows cut off the fitness split (the toy's 128 would outweigh a generation of 4)
    tasks = tuple(dataclasses.replace(t, minibatch=args.prompts, max_new_tokens=args.new_tokens, validation=None)
                  if t.optimised else t for t in config.tasks)
    search = dataclasses.replace(config.search, population=args.population, validation_size=args.prompts)
    return bench_search, dataclasses.replace(config, genome=genome, tasks=tasks, search=search)


def worker_jaxmerge(args) -> dict:
    import jax

    from jaxmerge.pipeline.problem import search_config as problem_search_config
    from jaxmerge.pipeline.sources import default_layout
    from jaxmerge.search import run_search

    dirs = [Path(p) for p in args.dirs]
    bench_search, config = search_config(args, dirs)
    with tempfile.TemporaryDirectory(prefix="bench_scale_search_") as tmp:
        counter = CompileCounter(Path(tmp) / "search" / "generations.jsonl")
        before_loading_gb = peak_rss_gb()  # the imports and XLA's runtime: the floor of any run
        began = time.perf_counter()
        _, _, problem, fitness = bench_search.setup(config)
        setup = time.perf_counter() - began
        generations = 1 + args.search_generations
        search = dataclasses.replace(problem_search_config(config, default_layout(config.layout)),
                                     generations=generations, population_size=args.population)
        result = run_search(problem.space, problem.paths, problem.score_fn(fitness), problem.data, fitness.batches,
                            fitness.validation, config=search, out_dir=Path(tmp) / "search", progress=False)
        peak_gb = peak_rss_gb()  # before the merge timed below, which holds a merged model of its own
        merge_s = []  # one candidate's merge alone (the program the search runs inside each candidate's)
        for _ in range(2):
            began = time.perf_counter()
            jax.block_until_ready(problem.merge(result.best_genome))
            merge_s.append(time.perf_counter() - began)
    seconds = [h["seconds"] for h in result.history]
    checkpoint_bytes = sum((d / "model.safetensors").stat().st_size for d in dirs)
    return {"setup_s": setup, "generation_s": seconds, "population": args.population,
            "candidate_s": [s / args.population for s in seconds[1:]], "compiles": len(counter.at),
            "compiles_after_first": counter.after(generations), "peak_rss_gb": peak_gb,
            "before_loading_gb": before_loading_gb, "merge_s": min(merge_s),
            "sources_plus_merge_gb": checkpoint_bytes * 4 / 3 / 1e9}


def worker_mergekit(args) -> dict:
    import torch

    bench_search, config = search_config(args, [Path(p) for p in args.dirs])
    _, _, problem, fitness = bench_search.setup(config)
    task = fitness.tasks[0]
    batch = fitness.batches[0][task.name]
    prompts, answers = list(task.fitness.prompts[:args.prompts]), list(task.fitness.answers[:args.prompts])
    space, paths = problem.space, problem.paths
    del problem  # jaxmerge's sources: not the loop's
    torch.set_num_threads(args.torch_threads)
    genomes = bench_search.candidate_genomes(space, args.mergekit_candidates + 1, config.search.sigma, 0)
    r = bench_search.bench_mergekit(config, space, paths, prompts, answers, np.asarray(batch["ids"]), args.new_tokens,
                                    task.spec.language, genomes, args.mergekit_dtype, task.spec.language_strict)
    return {"candidate_s": 1 / r["rate"], "merge_s": r["merge"], "load_s": r["load"], "eval_s": r["eval"],
            "first_s": r["first"]}


WORKERS = {"decode": worker_decode, "jaxmerge": worker_jaxmerge, "mergekit": worker_mergekit}


def run_worker(name: str, args, extra: list[str] = ()) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench_scale_") as tmp:
        result = Path(tmp) / "result.json"
        command = [sys.executable, __file__, "--worker", name, "--result", str(result), "--shape", args.shape,
                   "--repeats", str(args.repeats), "--batch", str(args.batch), "--prompt-length",
                   str(args.prompt_length), "--new-tokens", str(args.new_tokens), "--prompts", str(args.prompts),
                   "--population", str(args.population), "--layer-groups", str(args.layer_groups),
                   "--search-generations", str(args.search_generations),
                   "--mergekit-candidates", str(args.mergekit_candidates), "--mergekit-dtype", args.mergekit_dtype,
                   "--torch-threads", str(args.torch_threads), *extra]
        completed = subprocess.run(command, capture_output=True, text=True)
        if completed.returncode:
            raise RuntimeError(f"worker {name} failed:\n{completed.stderr[-3000:]}")
        return json.loads(result.read_text())


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    return f"{min(values) * scale:.{digits}f} / {statistics.median(values) * scale:.{digits}f}"


def report_decode(r: dict, args) -> None:
    b = r["bounds"]
    print(f"\n## decode at {args.shape} ({args.batch} prompts x {args.prompt_length} tokens, {args.new_tokens} new)")
    print(f"measured: read bandwidth {b['bandwidth']:.1f} GB/s; matmul peak "
          + ", ".join(f"{d} {g:.0f} GFLOP/s" for d, g in b["matmul"].items()) + f"; the output head alone at "
          f"decode ([{args.batch}, D] x [D, V]) reads its weights at "
          + ", ".join(f"{d} {g:.1f} GB/s" for d, g in b["decode_matmul"].items()))
    print("| dtype | weights | prefill s (min / median) | prefill / matmul peak | decode step ms (min / median) "
          "| bandwidth bound ms | step / it | head-matmul bound ms | step / it |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype, d in r["dtypes"].items():
        print(f"| {dtype} | {d['weight_gb']:.2f} GB | {spread(d['prefill_s'])} | "
              f"{spread(d['prefill_utilisation'], 100, 0)}% | {spread(d['step_s'], 1e3, 0)} | "
              f"{d['step_bound_s'] * 1e3:.0f} | {spread(d['step_over_bound'])}x | "
              f"{d['step_dot_bound_s'] * 1e3:.0f} | {spread(d['step_over_dot_bound'])}x |")


def report_search(ours: list[dict], theirs: list[dict], args) -> None:
    print(f"\n## search candidate at {args.shape} (TIES, base + 2, float32; {args.prompts} prompts, "
          f"{args.new_tokens} new tokens; {len(ours)} rounds, the tools alternating)")
    jax_times = [t for o in ours for t in o["candidate_s"]]
    their_times = [t["candidate_s"] for t in theirs]
    print("| loop | s per candidate (min / median) | / jaxmerge (min / median) |")
    print("|---|---:|---:|")
    print(f"| jaxmerge PS search (run_search, population {args.population}) | {spread(jax_times)} | 1.00x |")
    print(f"| mergekit-evolve loop ({args.mergekit_dtype}, {args.torch_threads} torch threads) | "
          f"{spread(their_times, 1, 1)} | {min(their_times) / min(jax_times):.1f}x / "
          f"{statistics.median(their_times) / statistics.median(jax_times):.1f}x |")
    o = ours[-1]
    print(f"jaxmerge: set-up (load, stack, prepare) {spread([x['setup_s'] for x in ours], 1, 1)} s; generations "
          "(s, the first compiles): " + "; ".join(" ".join(f"{s:.1f}" for s in x["generation_s"]) for x in ours))
    print(f"jaxmerge peak RSS {spread([x['peak_rss_gb'] for x in ours])} GB = "
          f"{o['peak_rss_gb'] / o['sources_plus_merge_gb']:.2f}x sources + base + one merge "
          f"({o['sources_plus_merge_gb']:.2f} GB); backend compilations "
          + ", ".join(str(x["compiles"]) for x in ours) + ", after the first generation "
          + ", ".join(str(x["compiles_after_first"]) for x in ours))
    floor = o["before_loading_gb"]
    print(f"  of which {floor:.2f} GB held before loading (imports, XLA's runtime): the rest is "
          f"{(o['peak_rss_gb'] - floor) / o['sources_plus_merge_gb']:.2f}x sources + base + one merge")
    merge = min(x["merge_s"] for x in ours)
    print(f"jaxmerge per candidate: the merge alone {merge:.1f} s (min), the rest (generation, scoring, the leader's "
          f"validation shared out) {min(jax_times) - merge:.1f} s")
    t = theirs[-1]
    print(f"mergekit-evolve loop, last round, median per candidate: run_merge {t['merge_s']:.1f} s, from_pretrained "
          f"{t['load_s']:.1f} s, generate + score {t['eval_s']:.1f} s")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="qwen2-0.5b", choices=sorted(SHAPES))
    parser.add_argument("--parts", default="decode,search,disk")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (search: alternating tools)")
    parser.add_argument("--root", help="keep the random checkpoints in ROOT (reused if there)")
    parser.add_argument("--batch", type=int, default=16, help="decode: prompts")
    parser.add_argument("--prompt-length", type=int, default=64, help="decode: prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=16, help="search: fitness prompts per candidate")
    parser.add_argument("--population", type=int, default=4, help="search: jaxmerge's population")
    parser.add_argument("--layer-groups", type=int, default=4, help="search: the genome's layer groups")
    parser.add_argument("--search-generations", type=int, default=2, help="search: jaxmerge's generations timed "
                        "per round, after one that compiles")
    parser.add_argument("--mergekit-candidates", type=int, default=1, help="search: timed candidates per round")
    parser.add_argument("--mergekit-dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--torch-threads", type=int, default=os.cpu_count())
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--dirs", nargs="*", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.worker:
        Path(args.result).write_text(json.dumps(WORKERS[args.worker](args)))
        return
    parts = set(args.parts.split(","))
    print(f"bench_scale {args.shape}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    if "decode" in parts:
        report_decode(run_worker("decode", args), args)
    if "search" in parts:
        from jaxmerge.testing import toy_world

        root = Path(args.root or tempfile.mkdtemp(prefix="bench_scale_"))
        try:
            dirs = write_family(root / args.shape, args.shape, toy_world.world_dir(0) / "base")
            ours, theirs = [], []
            for _ in range(args.repeats):
                ours.append(run_worker("jaxmerge", args, ["--dirs", *map(str, dirs)]))
                theirs.append(run_worker("mergekit", args, ["--dirs", *map(str, dirs)]))
            report_search(ours, theirs, args)
        finally:
            if not args.root:
                shutil.rmtree(root, ignore_errors=True)
    if "disk" in parts:
        print("\n## disk to disk, TinyLlama-1.1B shape (bench_merge.py --sizes 1B --floor)", flush=True)
        command = [sys.executable, str(HERE / "bench_merge.py"), "--sizes", "1B", "--floor", "--in-memory-size", "",
                   "--repeats", str(args.repeats)] + (["--root", str(Path(args.root) / "merge")] if args.root else [])
        subprocess.run(command, check=True)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
