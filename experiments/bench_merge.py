"""Merge speed and memory: `jaxmerge merge` against `mergekit-yaml`, and per-candidate merge
time against the memory-bandwidth bound, printed side by side in one run.

1. Disk to disk, whole process (imports, reading, merging, writing), min of --repeats runs
   each: task arithmetic, TIES and DARE-TIES recipes over three random Mistral-shaped bf16
   models (a base and two fine-tunes) of each --sizes entry, the two tools alternating.
   jaxmerge runs with a cold XLA cache (emptied before each run: what a first merge costs)
   and warm (the cache kept: every later merge of the same shapes). Peak RSS is each
   process's own (wait4), min over its runs. --floor adds the I/O floor: reading the three
   inputs (16 MiB reads into one reused buffer, as dd does) plus writing and fsyncing an
   output of the merge's size, and each jaxmerge time as a multiple of it. The page cache is
   as the run leaves it (no root to drop it): the inputs were just written or read, so warm.
2. In memory, as the evolutionary search uses it: models loaded once, source statistics
   prepared once, a jitted merge called with new weights and densities each time, against
   the memory-bandwidth bound: reading the K+1 input models and writing one output once,
   at this machine's copy bandwidth (numpy copying 1 GiB between preallocated buffers).
   XLA's own elementwise bandwidth (`x + 1` into a fresh output) is printed beside it.

    python experiments/bench_merge.py [--sizes 100M,300M] [--repeats 3] [--in-memory-size 100M]
        [--methods ties,...] [--floor] [--root DIR (checkpoints kept there, reused if present)]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

import jaxmerge
from jaxmerge.merge import flat_params, merge_params, prepare, stack_sources

RECIPE = """
    merge_method: {method}
    base_model: {root}/base
    models:
      - model: {root}/ft0
        parameters: {{weight: 0.6{density0}}}
      - model: {root}/ft1
        parameters: {{weight: 0.5{density1}}}
    dtype: bfloat16
"""
METHODS = ("task_arithmetic", "ties", "dare_ties")
# Mistral-shaped: hidden, intermediate, layers, attention heads, key/value heads (vocabulary 32,000).
SIZES = {"100M": (768, 2048, 10, 12, 4), "300M": (1024, 2816, 24, 16, 4), "1B": (2048, 5632, 22, 32, 4)}


def write_family(root: Path, size: str = "100M") -> int:
    """A base and two fine-tunes (base + small noise), bf16; returns parameters per model."""
    hidden, intermediate, layers, heads, kv_heads = SIZES[size]
    kv = hidden // heads * kv_heads
    shapes = {"model.embed_tokens.weight": (32000, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (32000, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                       p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                       p + "mlp.gate_proj.weight": (intermediate, hidden),
                       p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    config = dict(architectures=["MistralForCausalLM"], model_type="mistral", dtype="bfloat16", rms_norm_eps=1e-5,
                  rope_theta=10000.0, sliding_window=None, max_position_embeddings=4096, vocab_size=32000,
                  hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads)
    rng = np.random.default_rng(0)
    for name, noise in [("base", 0.0), ("ft0", 0.004), ("ft1", 0.006)]:
        (root / name).mkdir()
        tensors = {}
        for key, shape in shapes.items():  # tensor by tensor: the same base values, a little float32 at a time
            base = np.random.default_rng(zlib.crc32(key.encode())).standard_normal(shape, np.float32) * 0.02
            tensors[key] = (base + noise * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16)
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(config))
        del tensors
    return sum(int(np.prod(s)) for s in shapes.values())


def _header(path: Path) -> bytes:
    """A safetensors file's JSON header."""
    with open(path, "rb") as f:
        return f.read(int.from_bytes(f.read(8), "little"))


def run(command: list[str], env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one child process."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                               env=None if env is None else {**os.environ, **env})
    _, status, usage = os.wait4(process.pid, 0)
    elapsed = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode:
        raise RuntimeError(f"{command[0]} failed:\n{stderr[-2000:]}")
    return elapsed, usage.ru_maxrss / 1e6  # KiB on Linux


CHUNK = 16 << 20


def io_floor(root: Path) -> float:
    """Seconds to read the three inputs and to write and fsync an output the base's size,
    in 16 MiB requests through one reused buffer (what `dd bs=16M` does, and fsync)."""
    buffer = bytearray(CHUNK)
    start = time.perf_counter()
    for name in ("base", "ft0", "ft1"):
        with open(root / name / "model.safetensors", "rb", buffering=0) as f:
            while f.readinto(buffer):
                pass
    size = (root / "base" / "model.safetensors").stat().st_size
    path = root / "floor.bin"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(buffer)
        for offset in range(0, size, CHUNK):
            os.write(fd, view[:min(CHUNK, size - offset)])
        os.fsync(fd)
    finally:
        os.close(fd)
        path.unlink()
    return time.perf_counter() - start


def disk_to_disk(root: Path, repeats: int, methods: tuple[str, ...] = METHODS, floor: bool = False) -> None:
    floors = []
    print(f"{'recipe':17}{'mergekit-yaml':>14}{'RSS':>7}{'jaxmerge cold':>15}{'ratio':>7}"
          f"{'jaxmerge warm':>15}{'ratio':>7}{'RSS':>7}" + f"{'/ floor':>9}" * floor)
    for name in methods:
        path = root / f"{name}.yml"
        sparse = name != "task_arithmetic"
        path.write_text(textwrap.dedent(RECIPE.format(method=name, root=root, density0=", density: 0.5" * sparse,
                                                      density1=", density: 0.4" * sparse)))
        cache = root / "xla_cache"
        times: dict[str, list] = {"mergekit": [], "cold": [], "warm": []}
        for _ in range(repeats):
            out = root / "out"
            times["mergekit"].append(run(["mergekit-yaml", str(path), str(out), "--quiet"]))
            shutil.rmtree(out)
            if floor:
                floors.append(io_floor(root))
            shutil.rmtree(cache, ignore_errors=True)
            for run_kind in ("cold", "warm"):
                times[run_kind].append(run([sys.executable, "-m", "jaxmerge.cli", "merge", str(path), str(out)],
                                           {"JAXMERGE_CACHE_DIR": str(cache)}))
                shutil.rmtree(out)
        (theirs, their_rss), (cold, _), (warm, our_rss) = (
            (min(t for t, _ in v), min(r for _, r in v)) for v in times.values())
        print(f"{name:17}{theirs:13.1f}s{their_rss:6.2f}G{cold:14.1f}s{cold / theirs:6.2f}x"
              f"{warm:14.1f}s{warm / theirs:6.2f}x{our_rss:6.2f}G" + f"{warm / min(floors):8.2f}x" * floor, flush=True)
    if floor:
        print(f"I/O floor (read the 3 inputs, write + fsync the output; page cache warm): min {min(floors):.2f} s, "
              f"median {sorted(floors)[len(floors) // 2]:.2f} s of {len(floors)}")


def best_time(fn, repeats: int) -> float:
    jax.block_until_ready(fn(0))  # compile
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(i + 1))
        times.append(time.perf_counter() - start)
    return min(times)


def copy_bandwidth() -> tuple[float, float]:
    """(numpy copy between preallocated 1 GiB buffers, XLA `x + 1` into a fresh output), bytes/s
    counting the read and the write."""
    a = np.ones(1 << 28, np.float32)
    b = np.empty_like(a)
    times = []
    for _ in range(5):
        start = time.perf_counter()
        np.copyto(b, a)
        times.append(time.perf_counter() - start)
    numpy_bandwidth = 2 * a.nbytes / min(times)
    del a, b
    x = jnp.ones(1 << 28, jnp.float32)
    add_one = jax.jit(lambda y: y + 1)
    xla_bandwidth = 2 * x.nbytes / best_time(lambda i: add_one(x), 5)
    return numpy_bandwidth, xla_bandwidth


def in_memory(root: Path, params: int, repeats: int) -> None:
    models = [jaxmerge.load(root / n) for n in ("base", "ft0", "ft1")]
    base = flat_params(models[0])
    sources = stack_sources(base, [flat_params(m) for m in models[1:]])
    del models
    numpy_bandwidth, xla_bandwidth = copy_bandwidth()
    num_sources = sources["norm.weight"].shape[0]
    traffic = (num_sources + 2) * 2 * params  # read the sources and the base, write the merge (bf16)
    bound = traffic / numpy_bandwidth
    print(f"copy bandwidth: numpy {numpy_bandwidth / 1e9:.1f} GB/s (the bound's), XLA x + 1 into a fresh "
          f"output {xla_bandwidth / 1e9:.1f} GB/s; bound for reading {num_sources} sources + base and "
          f"writing 1: {bound * 1e3:.0f} ms")
    print(f"{'method':17}{'per candidate':>15}{'/ bound':>10}")
    for method in METHODS:
        stats = prepare(method, base, sources)

        # Models and statistics are arguments, not closed-over constants: XLA would fold them.
        @jax.jit
        def candidate(base, sources, stats, weights, densities, key, method=method):
            values = {"weight": weights, "lambda": jnp.float32(1.0)}
            if method != "task_arithmetic":
                values["density"] = densities
            return merge_params(method, base, sources, {p: values for p in base}, stats=stats, key=key)

        rng = np.random.default_rng(1)
        per_candidate = best_time(lambda i, stats=stats, rng=rng: candidate(
            base, sources, stats, jnp.asarray(rng.uniform(0.2, 1.0, 2), jnp.float32),
            jnp.asarray(rng.uniform(0.2, 1.0, 2), jnp.float32), jax.random.key(i)), repeats)
        print(f"{method:17}{per_candidate * 1e3:13.0f}ms{per_candidate / bound:9.1f}x"
              f"   (compiled once: {candidate._cache_size()} executable)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100M,300M", help=f"disk-to-disk model sizes, of {', '.join(SIZES)}")
    parser.add_argument("--in-memory-size", default="100M", help="the per-candidate part's model size ('' skips it)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", default=",".join(METHODS), help="disk-to-disk recipes, of " + ", ".join(METHODS))
    parser.add_argument("--floor", action="store_true", help="measure the I/O floor and the ratios to it")
    parser.add_argument("--root", help="keep the disk-to-disk checkpoints in ROOT/<size> (reused if there)")
    args = parser.parse_args()
    print(f"JAX on {jax.devices()[0].platform}, {jax.device_count()} device(s), {os.cpu_count()} CPU cores; "
          f"min of {args.repeats} runs")
    sizes = [s for s in args.sizes.split(",") if s]
    for size in sizes + ([args.in_memory_size] if args.in_memory_size else []):
        if size not in SIZES:
            parser.error(f"unknown size {size!r} (sizes: {', '.join(SIZES)})")
    methods = tuple(m for m in args.methods.split(",") if m)
    if set(methods) - set(METHODS):
        parser.error(f"unknown methods {sorted(set(methods) - set(METHODS))} (methods: {', '.join(METHODS)})")
    for i, size in enumerate(sizes):
        kept = args.root is not None
        root = Path(args.root) / size if kept else Path(tempfile.mkdtemp(prefix="bench_merge_"))
        try:
            if kept and (root / "ft1" / "config.json").exists():
                params = sum(int(np.prod(t["shape"])) for k, t in json.loads(
                    _header(root / "base" / "model.safetensors")).items() if k != "__metadata__")
            else:
                shutil.rmtree(root, ignore_errors=True)
                root.mkdir(parents=True)
                params = write_family(root, size)
            print(f"\n1.{i + 1} disk to disk, whole process: base + 2 fine-tunes, Mistral-shaped, "
                  f"{params / 1e6:.0f}M parameters each, bf16 ({2 * params / 1e9:.2f} GB each)")
            disk_to_disk(root, args.repeats, methods, args.floor)
        finally:
            if not kept:
                shutil.rmtree(root, ignore_errors=True)
    if args.in_memory_size:
        root = Path(tempfile.mkdtemp(prefix="bench_merge_"))
        try:
            params = write_family(root, args.in_memory_size)
            print(f"\n2. in memory, per candidate ({params / 1e6:.0f}M parameters; new weights and densities "
                  f"each call; min of {args.repeats})")
            in_memory(root, params, args.repeats)
        finally:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
