"""Load time and peak host memory: jaxmerge.load against transformers' from_pretrained.

Writes a random checkpoint of a real model's shape (bf16, sharded like the Hub's), then
loads it in a fresh process per loader, sampling the process's anonymous resident memory
(RssAnon: what the loader allocated) and its file-backed resident pages (RssFile: the
memory-mapped safetensors files, page cache the kernel can drop) every 5 ms.

    python experiments/bench_load.py [--shape tinyllama-1.1b | mistral-7b] [--dir /tmp/x]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

SHAPES = {
    "tiny-100m": dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=8,
                      num_attention_heads=12, num_key_value_heads=4),
    "tinyllama-1.1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                           num_attention_heads=32, num_key_value_heads=4),
    "mistral-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8),
}

MEASURE = r'''
import json, sys, threading, time
def rss():
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return {k: int(fields[k].split()[0]) * 1024 for k in ("RssAnon", "RssFile")}
loader, directory = sys.argv[1], sys.argv[2]
if loader == "jaxmerge":
    import jax, jaxmerge
    from flax import nnx
    load = lambda: jax.block_until_ready(nnx.state(jaxmerge.load(directory)))
else:
    import torch
    from transformers import AutoModelForCausalLM
    load = lambda: AutoModelForCausalLM.from_pretrained(directory, dtype=torch.bfloat16)
base = rss()
peak = dict(base)
running = True
def sample():
    while running:
        now = rss()
        for k in peak:
            peak[k] = max(peak[k], now[k])
        time.sleep(0.005)
thread = threading.Thread(target=sample)
thread.start()
start = time.perf_counter()
model = load()
seconds = time.perf_counter() - start
running = False
thread.join()
print(json.dumps(dict(seconds=seconds, base=base, peak=peak)))
'''


def write_checkpoint(directory: Path, shape: dict, shard_bytes: int = 2 * 10**9) -> int:
    """A random bf16 Mistral checkpoint, written shard by shard; returns its tensor bytes."""
    c = shape
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], c["hidden_size"])}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "self_attn.q_proj.weight": (c["num_attention_heads"] * head_dim, c["hidden_size"]),
            p + "self_attn.k_proj.weight": (c["num_key_value_heads"] * head_dim, c["hidden_size"]),
            p + "self_attn.v_proj.weight": (c["num_key_value_heads"] * head_dim, c["hidden_size"]),
            p + "self_attn.o_proj.weight": (c["hidden_size"], c["num_attention_heads"] * head_dim),
            p + "mlp.gate_proj.weight": (c["intermediate_size"], c["hidden_size"]),
            p + "mlp.up_proj.weight": (c["intermediate_size"], c["hidden_size"]),
            p + "mlp.down_proj.weight": (c["hidden_size"], c["intermediate_size"]),
            p + "input_layernorm.weight": (c["hidden_size"],),
            p + "post_attention_layernorm.weight": (c["hidden_size"],),
        })
    shapes["model.norm.weight"] = (c["hidden_size"],)
    shapes["lm_head.weight"] = (c["vocab_size"], c["hidden_size"])

    rng = np.random.default_rng(0)
    shards, current, size = [], {}, 0
    for key, s in shapes.items():
        nbytes = int(np.prod(s)) * 2
        if current and size + nbytes > shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = s
        size += nbytes
    shards.append(current)
    weight_map, total = {}, 0
    for n, shard in enumerate(shards):
        name = f"model-{n + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {k: (rng.standard_normal(s, np.float32) * 0.02).astype(ml_dtypes.bfloat16) for k, s in shard.items()}
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        total += sum(t.nbytes for t in tensors.values())
        weight_map.update({k: name for k in tensors})
        del tensors
    (directory / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    config = dict(architectures=["MistralForCausalLM"], model_type="mistral", dtype="bfloat16",
                  rms_norm_eps=1e-5, rope_theta=10000.0, sliding_window=None, max_position_embeddings=32768, **c)
    (directory / "config.json").write_text(json.dumps(config))
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=sorted(SHAPES))
    parser.add_argument("--dir", default=None, help="where to write the checkpoint (default: a temp dir)")
    args = parser.parse_args()

    directory = Path(args.dir or tempfile.mkdtemp(prefix="bench_load_"))
    directory.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        total = write_checkpoint(directory, SHAPES[args.shape])
        print(f"checkpoint: {args.shape} shape, {total / 2 / 1e9:.2f}B parameters, bf16, "
              f"{total / 1e9:.2f} GB in {len(list(directory.glob('*.safetensors')))} shards "
              f"(written in {time.perf_counter() - start:.0f}s)")
        print(f"{'loader':14}{'seconds':>9}{'peak RssAnon - before':>24}{'/ checkpoint':>14}{'peak RssFile':>14}")
        for loader in ("jaxmerge", "transformers"):
            result = subprocess.run([sys.executable, "-c", MEASURE, loader, str(directory)],
                                    capture_output=True, text=True)
            if result.returncode:
                print(f"{loader:14} failed: {result.stderr.strip().splitlines()[-1]}")
                continue
            r = json.loads(result.stdout.strip().splitlines()[-1])
            anon = r["peak"]["RssAnon"] - r["base"]["RssAnon"]
            print(f"{loader:14}{r['seconds']:9.2f}{anon / 1e9:21.2f} GB{anon / total:13.2f}x"
                  f"{r['peak']['RssFile'] / 1e9:11.2f} GB")
    finally:
        if not args.dir:
            shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
