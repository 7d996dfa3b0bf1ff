"""Greedy decoding throughput: jaxmerge.generate against transformers' generate.

Both run in this one process on the same random Mistral-architecture checkpoint (~20M
parameters by default), the same left-padded batch and the same number of new tokens,
with no EOS so every row decodes to the end. The tools alternate, round by round, so that
a busy machine slows both alike (timing one tool's rounds and then the other's measured the
machine's load: ratios swung 1.2x-20x between runs); torch's thread count is pinned to the
faster of 1 and its default, as in bench_search.py. Min and median of the rounds are
printed; jaxmerge's first call (tracing and compilation) is reported apart.

    python experiments/bench_generate.py [--batch 8] [--new-tokens 64] [--repeats 5]
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


def seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def alternating(tools: dict, repeats: int) -> tuple[dict[str, list[float]], dict[str, object]]:
    """Each tool run once per round, in turn, for `repeats` rounds: {name: [seconds]}, and
    each tool's last result."""
    times, results = {name: [] for name in tools}, {}
    for _ in range(repeats):
        for name, fn in tools.items():
            spent, results[name] = seconds(fn)
            times[name].append(spent)
    return times, results


def pin_torch_threads(fn) -> dict[int, float]:
    """torch's thread count set to the faster of 1 and its default for `fn` (on a small model or
    a busy machine, OpenMP threads wait on each other); {threads: median seconds of 3 calls}."""
    default, measured = torch.get_num_threads(), {}
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        fn()  # warm-up
        measured[threads] = statistics.median(seconds(fn)[0] for _ in range(3))
    torch.set_num_threads(min(measured, key=measured.get))
    return measured


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--prompt-length", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
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

    first_call, _ = seconds(run_jax)
    threads = pin_torch_threads(run_hf)
    times, results = alternating({"transformers generate": run_hf, "jaxmerge.generate": run_jax}, args.repeats)

    same = np.array_equal(np.asarray(results["jaxmerge.generate"]), results["transformers generate"].numpy())
    print(f"model: Mistral architecture, {params / 1e6:.1f}M parameters, {args.dtype}; batch {args.batch}, "
          f"prompt {args.prompt_length} (half the rows left-padded to {args.prompt_length // 2}), "
          f"{args.new_tokens} new tokens; JAX on {jax.devices()[0].platform}; torch threads "
          f"{torch.get_num_threads()} (" + ", ".join(f"{t}: {s:.3f} s" for t, s in threads.items()) + ")")
    print(f"{args.repeats} alternating rounds")
    print(f"{'':24}{'min s':>9}{'median s':>10}{'tokens/s (min)':>16}")
    for name, spent in times.items():
        print(f"{name:24}{min(spent):9.3f}{statistics.median(spent):10.3f}{new_tokens / min(spent):16.1f}")
    hf, ours = times["transformers generate"], times["jaxmerge.generate"]
    print(f"jaxmerge / transformers throughput: {min(hf) / min(ours):.2f}x (min), "
          f"{statistics.median(hf) / statistics.median(ours):.2f}x (median)")
    print(f"jaxmerge first call (trace + compile + run): {first_call:.2f}s; "
          f"compile alone ~{first_call - min(ours):.2f}s")
    print(f"identical greedy tokens: {same}")


if __name__ == "__main__":
    main()
