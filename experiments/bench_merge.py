"""Merge speed: `jaxmerge merge` against `mergekit-yaml`, and per-candidate merge time
against the memory-bandwidth bound, printed side by side in one run.

1. Disk to disk, whole process (imports, load, merge, write): the same TIES and DARE-TIES
   recipes over three random Mistral-architecture bf16 models (a base and two fine-tunes
   of ~112M parameters each), run once by each tool.
2. In memory, as the evolutionary search uses it: models loaded once, source statistics
   prepared once, a jitted merge called with new weights and densities each time, against
   the memory-bandwidth bound: reading the K+1 input models and writing one output once,
   at the bandwidth this machine shows for a large float32 copy.

    python experiments/bench_merge.py [--layers 10] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
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
        parameters: {{weight: 0.6, density: 0.5}}
      - model: {root}/ft1
        parameters: {{weight: 0.5, density: 0.4}}
    dtype: bfloat16
"""
METHODS = ("ties", "dare_ties")


def write_family(root: Path, layers: int) -> int:
    """A base and two fine-tunes (base + small noise), bf16; returns parameters per model."""
    c = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=layers,
             num_attention_heads=12, num_key_value_heads=4)
    shapes = {"model.embed_tokens.weight": (32000, 768), "model.norm.weight": (768,), "lm_head.weight": (32000, 768)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (768, 768), p + "self_attn.k_proj.weight": (256, 768),
                       p + "self_attn.v_proj.weight": (256, 768), p + "self_attn.o_proj.weight": (768, 768),
                       p + "mlp.gate_proj.weight": (2048, 768), p + "mlp.up_proj.weight": (2048, 768),
                       p + "mlp.down_proj.weight": (768, 2048), p + "input_layernorm.weight": (768,),
                       p + "post_attention_layernorm.weight": (768,)})
    rng = np.random.default_rng(0)
    base = {k: rng.standard_normal(s, np.float32) * 0.02 for k, s in shapes.items()}
    config = dict(architectures=["MistralForCausalLM"], model_type="mistral", dtype="bfloat16", rms_norm_eps=1e-5,
                  rope_theta=10000.0, sliding_window=None, max_position_embeddings=4096, **c)
    for name, noise in [("base", 0.0), ("ft0", 0.004), ("ft1", 0.006)]:
        (root / name).mkdir()
        tensors = {k: (v + noise * rng.standard_normal(v.shape, np.float32)).astype(ml_dtypes.bfloat16)
                   for k, v in base.items()}
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(config))
    return sum(int(np.prod(s)) for s in shapes.values())


def wall(command: list[str], env: dict | None = None) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True,
                            env=None if env is None else {**os.environ, **env})
    if result.returncode:
        raise RuntimeError(f"{command[0]} failed:\n{result.stderr[-2000:]}")
    return time.perf_counter() - start


def timed(fn, repeats: int) -> float:
    fn()  # compile
    times = []
    for i in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(i))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_merge_"))
    try:
        params = write_family(root, args.layers)
        model_bytes = 2 * params
        print(f"models: base + 2 fine-tunes, Mistral architecture, {params / 1e6:.0f}M parameters each, bf16 "
              f"({model_bytes / 1e6:.0f} MB each); JAX on {jax.devices()[0].platform}, {jax.device_count()} device(s)")

        print("\n1. disk to disk, whole process (jaxmerge cold: empty XLA cache; warm: cache from the cold run)")
        print(f"{'recipe':12}{'mergekit-yaml':>15}{'jaxmerge cold':>15}{'speed-up':>10}"
              f"{'jaxmerge warm':>15}{'speed-up':>10}")
        for name in METHODS:
            path = root / f"{name}.yml"
            path.write_text(textwrap.dedent(RECIPE.format(method=name, root=root)))
            theirs = wall(["mergekit-yaml", str(path), str(root / f"{name}_mergekit"), "--quiet"])
            cache = {"JAXMERGE_CACHE_DIR": str(root / f"{name}_xla_cache")}
            ours = [wall([sys.executable, "-m", "jaxmerge.cli", "merge", str(path), str(root / f"{name}_{run}")], cache)
                    for run in ("cold", "warm")]
            print(f"{name:12}{theirs:14.1f}s{ours[0]:14.1f}s{theirs / ours[0]:9.1f}x"
                  f"{ours[1]:14.1f}s{theirs / ours[1]:9.1f}x")

        print("\n2. in memory, per candidate (new weights and densities each call)")
        models = [jaxmerge.load(root / n) for n in ("base", "ft0", "ft1")]
        base = flat_params(models[0])
        sources = stack_sources(base, [flat_params(m) for m in models[1:]])
        big = jnp.zeros((256, 1024, 1024), jnp.float32)  # 1 GiB
        copy_time = timed(lambda i=0, x=big: jax.jit(lambda y: y + 1)(x), args.repeats)
        bandwidth = 2 * big.nbytes / copy_time  # read + write
        del big
        bound = (len(models) + 1) * model_bytes / bandwidth
        print(f"memory bandwidth {bandwidth / 1e9:.1f} GB/s; bound for reading {len(models)} models and "
              f"writing 1: {bound * 1e3:.0f} ms")
        print(f"{'method':12}{'per candidate':>15}{'/ bound':>10}")
        for method in METHODS:
            stats = prepare(method, base, sources)

            # Models and statistics are arguments, not closed-over constants: XLA would fold them.
            @jax.jit
            def candidate(base, sources, stats, weights, densities, key, method=method):
                params = {p: {"weight": weights, "density": densities, "lambda": jnp.float32(1.0)} for p in base}
                return merge_params(method, base, sources, params, stats=stats, key=key)

            rng = np.random.default_rng(1)
            per_candidate = timed(lambda i=0: candidate(base, sources, stats,
                                                        jnp.asarray(rng.uniform(0.2, 1.0, 2), jnp.float32),
                                                        jnp.asarray(rng.uniform(0.2, 1.0, 2), jnp.float32),
                                                        jax.random.key(i)), args.repeats)
            print(f"{method:12}{per_candidate * 1e3:13.0f}ms{per_candidate / bound:9.1f}x"
                  f"   (compiled once: {candidate._cache_size()} executable)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
