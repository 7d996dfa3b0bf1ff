"""Greedy decoding throughput: jaxmerge.generate against transformers' generate.

Both run in this one process on the same random Mistral-architecture checkpoint (~20M
parameters by default), the same left-padded batch and the same number of new tokens,
with no EOS so every row decodes to the end. jaxmerge's first call (tracing and
compilation) is reported apart from its steady-state speed.

    python experiments/bench_generate.py [--batch 8] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import numpy as np
import torch
from transformers import MistralConfig, MistralForCausalLM

import jaxmerge


def timed(fn, repeats: int) -> tuple[float, object]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    torch.manual_seed(0)
    config = MistralConfig(vocab_size=16000, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
                           num_attention_heads=6, num_key_value_heads=2, sliding_window=None)
    hf_model = MistralForCausalLM(config).eval().to(getattr(torch, args.dtype))
    params = sum(p.numel() for p in hf_model.parameters())

    rng = np.random.RandomState(0)
    ids = rng.randint(3, config.vocab_size, (args.batch, args.prompt_length))
    mask = np.ones_like(ids)
    for row in range(1, args.batch, 2):  # every other row left-padded to half length
        ids[row, : args.prompt_length // 2] = 0
        mask[row, : args.prompt_length // 2] = 0
    new_tokens = args.batch * args.new_tokens

    with tempfile.TemporaryDirectory() as directory:
        hf_model.save_pretrained(directory)
        model = jaxmerge.load(directory)

    def run_jax():
        return jax.block_until_ready(jaxmerge.generate(model, ids, args.new_tokens, attention_mask=mask))

    def run_hf():
        with torch.no_grad():
            return hf_model.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                                     max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                     do_sample=False, pad_token_id=0, eos_token_id=None)

    start = time.perf_counter()
    run_jax()
    first_call = time.perf_counter() - start
    jax_time, ours = timed(run_jax, args.repeats)
    run_hf()  # warm-up
    hf_time, theirs = timed(run_hf, args.repeats)

    same = np.array_equal(np.asarray(ours), theirs.numpy())
    print(f"model: Mistral architecture, {params / 1e6:.1f}M parameters, {args.dtype}; batch {args.batch}, "
          f"prompt {args.prompt_length} (half the rows left-padded to {args.prompt_length // 2}), "
          f"{args.new_tokens} new tokens; {torch.get_num_threads()} torch threads, JAX on {jax.devices()[0].platform}")
    print(f"{'':24}{'seconds':>10}{'tokens/s':>12}")
    print(f"{'transformers generate':24}{hf_time:10.3f}{new_tokens / hf_time:12.1f}")
    print(f"{'jaxmerge.generate':24}{jax_time:10.3f}{new_tokens / jax_time:12.1f}")
    print(f"jaxmerge / transformers throughput: {hf_time / jax_time:.2f}x")
    print(f"jaxmerge first call (trace + compile + run): {first_call:.2f}s; "
          f"compile alone ~{first_call - jax_time:.2f}s")
    print(f"identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
