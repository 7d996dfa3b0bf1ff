"""lm-evaluation-harness throughput: lm-eval's `hf` backend against the `jaxmerge` backend.

One process, one random-weight checkpoint (by default a Llama of 50.2M parameters: vocab 32000,
6 layers of width 512, GQA 8/4 heads, untied head; `--shape tiny` for a smoke run), one byte-level
BPE tokenizer (BOS prepended, as Llama's) trained here on a synthetic Zipfian language (no
internet), and three custom tasks over local JSONL data written beside it (default sizes):

- `bench_mc`: multiple_choice, 64 items x 4 choices = 256 loglikelihood requests, prompts of
  ~55-175 tokens, continuations of 1-10;
- `bench_ppl`: loglikelihood_rolling over 16 documents of ~190-400 tokens;
- `bench_gen`: generate_until over 16 prompts of ~50-130 tokens, greedy, max_gen_toks 32, stop
  sequences "\\n" and "Question:".

Each task runs through `lm_eval.simple_evaluate` with the `hf` model (dtype float32, device cpu)
and the `jaxmerge` model (dtype float32), the same batch size. Each backend is built once, as
simple_evaluate builds it from `model="hf"` / `model="jaxmerge"` and the same model_args
(lm-eval's model registry), and passed to every call, so the timings are evaluation, not
loading (the loads are printed apart). On each task, jaxmerge's first call (which traces and
compiles its programs) is reported apart; then --rounds rounds, the backends alternating (hf,
jaxmerge, hf, jaxmerge, ...). Per task and backend: seconds (min and median over the rounds)
and the requests/s and tokens/s they give, of the whole simple_evaluate call ("call") and of the
time inside the model's request method ("model": what the backend itself costs, without the
harness's task building and metrics), the ratio jaxmerge / hf, and for the loglikelihood tasks
the compute bound (2 x matmul parameters per token against this machine's fp32 matmul rate).
Tokens: context + continuation tokens of each loglikelihood request, the tokens of each rolling
document, the tokens of each generated text (re-encoded, at most max_gen_toks). Then the
backends' results side by side: the same metrics, the same chosen answers, the same texts.

torch and XLA get the same cores: the process is pinned to --threads cores (default: all this
process may use), torch runs that many intra-op threads, XLA's CPU client that many
(intra_op_parallelism_threads).

    python experiments/bench_lm_eval.py [--shape default|tiny] [--rounds 3] [--batch-size 16] [--json OUT]
    python experiments/bench_lm_eval.py --model DIR   # a checkpoint with its tokenizer (made there if absent)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Before torch and jax start their thread pools: one setting for both, on the same cores.
_THREADS_ARG = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--threads=")), None)
if _THREADS_ARG is None and "--threads" in sys.argv:
    _THREADS_ARG = sys.argv[sys.argv.index("--threads") + 1]
CORES = sorted(os.sched_getaffinity(0))
THREADS = int(_THREADS_ARG) if _THREADS_ARG else len(CORES)
os.sched_setaffinity(0, CORES[:THREADS])
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=true "
                           f"intra_op_parallelism_threads={THREADS}").strip()
os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import jax  # noqa: E402
import lm_eval  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config  # noqa: E402

import jaxmerge.harness  # noqa: E402, F401  (registers the "jaxmerge" lm-eval model)

torch.set_num_threads(THREADS)


@dataclasses.dataclass(frozen=True)
class Shape:
    """A model shape and the size of the tasks run on it."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    mc_items: int
    ppl_docs: int
    gen_prompts: int
    corpus_sentences: int
    words: int  # distinct pseudo-words of the synthetic language
    text_scale: float = 1.0  # passage and document lengths, relative to the default's


SHAPES = {
    "default": Shape(vocab=32000, hidden=512, layers=6, heads=8, kv_heads=4, intermediate=1376,
                     mc_items=64, ppl_docs=16, gen_prompts=16, corpus_sentences=40000, words=30000),
    "tiny": Shape(vocab=512, hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                  mc_items=12, ppl_docs=6, gen_prompts=6, corpus_sentences=1500, words=600, text_scale=0.3),
}
TASKS = ("bench_mc", "bench_ppl", "bench_gen")
REQUEST_TYPE = {"bench_mc": "loglikelihood", "bench_ppl": "loglikelihood_rolling", "bench_gen": "generate_until"}
MAX_GEN_TOKS = 32


# The synthetic language, its tokenizer and the task data.

class Language:
    """Pseudo-words with Zipf frequencies (the same words for the same seed), sentences of them
    drawn from `draws`."""

    def __init__(self, words: int, seed: int, draws: int = 0):
        self.rng = np.random.default_rng(seed)
        onsets = list("bcdfghjklmnprstvwz") + ["ch", "sh", "th", "st", "tr", "pl", "gr", "br", ""]
        vowels = ["a", "e", "i", "o", "u", "ai", "ou", "ea", "y"]
        codas = ["", "", "", "n", "r", "s", "t", "l", "m", "nd"]
        vocabulary: set[str] = set()
        while len(vocabulary) < words:
            syllables = self.rng.choice([1, 1, 2, 2, 2, 3, 3])
            vocabulary.add("".join(self.rng.choice(onsets) + self.rng.choice(vowels) + self.rng.choice(codas)
                                   for _ in range(syllables)))
        self.words = np.array(sorted(vocabulary))
        self.rng.shuffle(self.words)
        weights = 1.0 / (np.arange(len(self.words)) + 2.7)
        self.p = weights / weights.sum()
        self.rng = np.random.default_rng([seed, draws])

    def phrase(self, n: int) -> str:
        return " ".join(self.rng.choice(self.words, size=n, p=self.p))

    def sentence(self) -> str:
        text = self.phrase(int(self.rng.integers(5, 18)))
        if self.rng.random() < 0.2:
            text += f" {int(self.rng.integers(0, 2000))}"
        return text[0].upper() + text[1:] + str(self.rng.choice([".", ".", ".", "?", "!"]))

    def passage(self, low: float, high: float) -> str:
        """Sentences until at least n words, n drawn from [low, high)."""
        out, count, words = [], 0, int(self.rng.integers(int(low), int(high)))
        while count < words:
            out.append(self.sentence())
            count += len(out[-1].split())
        return " ".join(out)


def make_tokenizer(language: Language, shape: Shape) -> PreTrainedTokenizerFast:
    """A byte-level BPE (GPT-2 / Llama-3 style) with `shape.vocab` tokens, BOS prepended (Llama style)."""
    corpus = [" ".join(language.sentence() for _ in range(4)) for _ in range(shape.corpus_sentences // 4)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=shape.vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=2048)


def make_checkpoint(directory: Path, shape: Shape, arch: str, seed: int) -> None:
    language = Language(shape.words, seed)
    tokenizer = make_tokenizer(language, shape)
    config_class = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = config_class(vocab_size=len(tokenizer), hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                          num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                          num_key_value_heads=shape.kv_heads, max_position_embeddings=2048, bos_token_id=1,
                          eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms away from 1, so that the two backends' argmaxes are not near-ties
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_tasks(directory: Path, shape: Shape, seed: int) -> None:
    """The three tasks' JSONL data and YAML configs under directory/{data,tasks}."""
    language = Language(shape.words, seed, draws=1)  # the tokenizer's language, other sentences
    data, tasks = directory / "data", directory / "tasks"
    data.mkdir(parents=True, exist_ok=True)
    tasks.mkdir(parents=True, exist_ok=True)
    rng, scale = language.rng, shape.text_scale

    def question() -> str:
        return language.phrase(int(rng.integers(4, 9))) + "?"

    mc = [{"passage": language.passage(30 * scale, 110 * scale), "question": question(),
           "choices": [language.phrase(int(rng.integers(1, 6))) for _ in range(4)], "label": int(rng.integers(0, 4))}
          for _ in range(shape.mc_items)]
    ppl = [{"text": language.passage(150 * scale, 330 * scale)} for _ in range(shape.ppl_docs)]
    gen = [{"passage": language.passage(30 * scale, 90 * scale), "question": question(), "answer": language.phrase(2)}
           for _ in range(shape.gen_prompts)]
    for name, rows in (("mc", mc), ("ppl", ppl), ("gen", gen)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    common = f"dataset_path: json\ntest_split: test\ndataset_kwargs:\n  data_files:\n    test: {data}/{{name}}.jsonl\n"
    (tasks / "bench_mc.yaml").write_text(
        "task: bench_mc\n" + common.format(name="mc") + "output_type: multiple_choice\n"
        'doc_to_text: "{{passage}}\\nQuestion: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    (tasks / "bench_ppl.yaml").write_text(
        "task: bench_ppl\n" + common.format(name="ppl") + "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\ndoc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
        "  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (tasks / "bench_gen.yaml").write_text(
        "task: bench_gen\n" + common.format(name="gen") + "output_type: generate_until\n"
        'doc_to_text: "{{passage}}\\nQuestion: {{question}}\\nAnswer:"\ndoc_to_target: " {{answer}}"\n'
        'generation_kwargs:\n  until: ["\\n", "Question:"]\n'
        f"  max_gen_toks: {MAX_GEN_TOKS}\n  do_sample: false\nmetric_list:\n  - metric: exact_match\n")


# Timing the model's share of a call, and counting its tokens.

@dataclasses.dataclass
class Meter:
    """Time inside the LM's request methods during one simple_evaluate call, and what they did."""

    seconds: float = 0.0
    requests: int = 0
    tokens: int = 0


def metered(lm, counter):
    """The lm with its three request methods timed (the token count is taken outside the time)."""
    lm.meter = Meter()
    for kind in ("loglikelihood", "loglikelihood_rolling", "generate_until"):
        method = getattr(lm, kind)

        def timed(requests, *args, _method=method, _kind=kind, **kwargs):
            start = time.perf_counter()
            out = _method(requests, *args, **{**kwargs, "disable_tqdm": True})
            lm.meter.seconds += time.perf_counter() - start
            lm.meter.requests += len(requests)
            lm.meter.tokens += counter(_kind, requests, out)
            return out

        setattr(lm, kind, timed)
    return lm


def token_counter(tokenizer_lm):
    """Tokens processed by a request list, encoded by the harness's own rules (`tok_encode`)."""
    def count(kind: str, requests, out) -> int:
        if kind == "loglikelihood":  # context + continuation, as TemplateLM.loglikelihood encodes the pair
            return sum(len(tokenizer_lm.tok_encode(c + x)) if c else 1 + len(tokenizer_lm.tok_encode(x))
                       for c, x in (r.args for r in requests))
        if kind == "loglikelihood_rolling":
            return sum(len(tokenizer_lm.tok_encode(r.args[0])) for r in requests)
        # generated texts re-encoded, at most max_gen_toks each (random tokens, decoded, can re-encode longer)
        return sum(min(len(tokenizer_lm.tok_encode(text, add_special_tokens=False)), MAX_GEN_TOKS) for text in out)
    return count


@dataclasses.dataclass(frozen=True)
class Run:
    backend: str
    task: str
    first: bool
    call_seconds: float
    model_seconds: float
    requests: int
    tokens: int


def evaluate(lm, task: str, task_manager: TaskManager, batch_size: int) -> tuple[dict, float, Meter]:
    lm.meter = Meter()
    start = time.perf_counter()
    result = lm_eval.simple_evaluate(model=lm, tasks=[task], task_manager=task_manager, batch_size=batch_size,
                                     num_fewshot=0, log_samples=True, bootstrap_iters=0, device="cpu")
    return result, time.perf_counter() - start, lm.meter


# The backends' results side by side.

def compare(task: str, hf: dict, ours: dict) -> tuple[bool, str]:
    """Whether the backends agree on a task: equal metrics, the same answers and texts."""
    metrics = {k: (hf["results"][task][k], ours["results"][task][k]) for k in hf["results"][task]
               if k not in ("alias", "name") and "stderr" not in k}
    hf_samples, our_samples = hf["samples"][task], ours["samples"][task]
    if REQUEST_TYPE[task] == "generate_until":
        same = sum(a["filtered_resps"] == b["filtered_resps"] for a, b in zip(hf_samples, our_samples, strict=True))
        agree = same == len(hf_samples) and all(a == b for a, b in metrics.values())
        detail = f"{same}/{len(hf_samples)} generated texts identical"
    else:
        def logprobs(samples):
            return np.array([[float(r[0]) for r in s["filtered_resps"]] if REQUEST_TYPE[task] == "loglikelihood"
                             else [float(s["filtered_resps"][0])] for s in samples])
        a, b = logprobs(hf_samples), logprobs(our_samples)
        worst = float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a))))
        if REQUEST_TYPE[task] == "loglikelihood":
            same = int(np.sum(a.argmax(1) == b.argmax(1)))
            detail = f"{same}/{len(a)} chosen answers identical, log-likelihoods within {worst:.1e} (relative)"
            agree = same == len(a) and all(x == y for x, y in metrics.values())
        else:
            detail = f"document log-likelihoods within {worst:.1e} (relative)"
            agree = all(math.isclose(x, y, rel_tol=1e-4) for x, y in metrics.values())
        agree = agree and worst < 1e-4
    shown = ", ".join(f"{k.split(',')[0]} {x:.6g} / {y:.6g}" if isinstance(x, float) else f"{k} {x} / {y}"
                      for k, (x, y) in metrics.items())
    return agree, f"{shown}; {detail}"


def matmul_peak() -> float:
    """This machine's fp32 matmul rate now (torch, 1024^3, best of 5), in FLOP/s: the compute bound."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - start)
    return 2 * 1024**3 / best


def flops_per_token(model) -> float:
    """2 x the matmul parameters a token passes through: every weight but the input embedding, the
    output head once (attention scores, ~4 x length x width per layer, left out)."""
    params = sum(p.numel() for name, p in model.named_parameters() if "embed_tokens" not in name)
    if model.config.tie_word_embeddings:
        params += model.config.vocab_size * model.config.hidden_size
    return 2.0 * params


def report(runs: list[Run], per_token: float, peak: float) -> list[dict]:
    rows = []
    print("\nthe rounds: seconds min and median, and the rates they give (best = at the min time); "
          "jaxmerge's first calls below")
    print(f"{'task':10}{'clock':7}{'backend':10}{'s min':>8}{'s med':>8}{'req/s best':>11}{'req/s med':>11}"
          f"{'tok/s best':>11}{'tok/s med':>11}")
    for task in TASKS:
        for clock in ("call", "model"):
            best = {}
            for backend in ("hf", "jaxmerge"):
                chosen = [r for r in runs if r.task == task and r.backend == backend and not r.first]
                if not chosen:
                    continue
                seconds = [getattr(r, f"{clock}_seconds") for r in chosen]
                fastest, typical = min(seconds), statistics.median(seconds)
                requests, tokens = chosen[0].requests, chosen[0].tokens  # the same in every round
                best[backend] = (fastest, typical)
                print(f"{task:10}{clock:7}{backend:10}{fastest:8.2f}{typical:8.2f}{requests / fastest:11.1f}"
                      f"{requests / typical:11.1f}{tokens / fastest:11.0f}{tokens / typical:11.0f}")
                rows.append({"task": task, "clock": clock, "backend": backend, "seconds": seconds,
                             "requests": chosen[0].requests, "tokens": chosen[0].tokens})
            if len(best) == 2:
                fastest = best["hf"][0] / best["jaxmerge"][0]
                typical = best["hf"][1] / best["jaxmerge"][1]
                print(f"{task:10}{clock:7}{'ratio':10}  jaxmerge / hf throughput: {fastest:.2f}x at best, "
                      f"{typical:.2f}x median")
            if clock == "model" and REQUEST_TYPE[task] != "generate_until" and best:
                tokens = next(r.tokens for r in runs if r.task == task)
                reached = {b: tokens * per_token / seconds[0] for b, seconds in best.items()}
                shares = ", ".join(f"{b} {rate / 1e9:.0f} GFLOP/s ({rate / peak:.0%})" for b, rate in reached.items())
                print(f"{task:10}{clock:7}{'bound':10}  {peak / per_token:.0f} tokens/s at the matmul peak; reached: "
                      f"{shares}")
    print("\njaxmerge's first call on each task (tracing and compiling included; a shape an earlier task "
          "compiled is not compiled again):")
    for r in runs:
        if r.first:
            steady = statistics.median(s.model_seconds for s in runs
                                       if s.task == r.task and s.backend == r.backend and not s.first)
            print(f"  {r.task:10} call {r.call_seconds:6.2f}s, model {r.model_seconds:6.2f}s: compiling "
                  f"~{max(0.0, r.model_seconds - steady):.2f}s over the rounds' median")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="default")
    parser.add_argument("--arch", choices=["llama", "qwen2"], default="llama")
    parser.add_argument("--model", type=Path, help="a checkpoint directory with its tokenizer: used if it holds "
                        "config.json, else the random checkpoint of --shape is made there (and kept)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--threads", type=int, default=len(CORES), help="cores for torch and XLA (both)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the figures and the agreement here")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    logging.basicConfig(level=logging.WARNING)
    for noisy in ("lm_eval", "jaxmerge", "datasets", "transformers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    shape = SHAPES[args.shape]

    with tempfile.TemporaryDirectory(prefix="bench_lm_eval-") as scratch:
        scratch = Path(scratch)
        began = time.perf_counter()
        model_dir = args.model or scratch / "model"
        if not (model_dir / "config.json").is_file():
            make_checkpoint(model_dir, shape, args.arch, args.seed)
        write_tasks(scratch, shape, args.seed)
        made = time.perf_counter() - began
        task_manager = TaskManager(include_path=str(scratch / "tasks"), include_defaults=False)

        model_args = f"pretrained={model_dir},dtype=float32"
        loads = {}
        lms = {}
        for backend in ("hf", "jaxmerge"):  # as simple_evaluate builds them from model="hf" / "jaxmerge"
            start = time.perf_counter()
            lms[backend] = get_model(backend).create_from_arg_string(
                model_args, {"batch_size": args.batch_size, "max_batch_size": None, "device": "cpu"})
            loads[backend] = time.perf_counter() - start
        counter = token_counter(lms["jaxmerge"])
        for lm in lms.values():
            metered(lm, counter)
        hf_model = lms["hf"].model
        params = sum(p.numel() for p in hf_model.parameters())
        config = hf_model.config
        per_token = flops_per_token(hf_model)

        load_before = os.getloadavg()
        print(f"machine: {os.cpu_count()} cores (this process may use {len(CORES)}), load average "
              f"{load_before[0]:.2f} / {load_before[1]:.2f} / {load_before[2]:.2f} (1 / 5 / 15 min); "
              f"torch {torch.__version__} with {torch.get_num_threads()} threads, JAX {jax.__version__} on "
              f"{jax.devices()[0].platform} with XLA intra_op_parallelism_threads={THREADS}, "
              f"both pinned to cores {CORES[:THREADS]}")
        print(f"model: {config.model_type}, {params / 1e6:.1f}M parameters, vocab {config.vocab_size}, hidden "
              f"{config.hidden_size}, {config.num_hidden_layers} layers, float32; batch size {args.batch_size}; "
              f"checkpoint, tokenizer and data made in {made:.1f}s; loaded by hf in {loads['hf']:.2f}s, "
              f"by jaxmerge in {loads['jaxmerge']:.2f}s")

        runs: list[Run] = []
        last: dict[tuple[str, str], dict] = {}
        for task in args.tasks:
            # jaxmerge's first call on a task (tracing and compiling its programs), then the rounds
            calls = [("jaxmerge", True)] + [(b, False) for _ in range(args.rounds) for b in ("hf", "jaxmerge")]
            for number, (backend, first) in enumerate(calls):
                result, seconds, meter = evaluate(lms[backend], task, task_manager, args.batch_size)
                runs.append(Run(backend, task, first, seconds, meter.seconds, meter.requests, meter.tokens))
                last[backend, task] = result
                label = "first (compiles)" if first else f"round {(number + 1) // 2}"
                print(f"  {task:10} {label:17} {backend:9} {seconds:7.2f}s (model {meter.seconds:6.2f}s), "
                      f"{meter.requests} requests, {meter.tokens} tokens", flush=True)

        peak = matmul_peak()
        print(f"\ncompute bound: {per_token / 1e6:.3g} MFLOP per token; fp32 matmul peak now {peak / 1e9:.0f} GFLOP/s "
              "(torch, 1024^3, best of 5)")
        rows = report(runs, per_token, peak)
        print("\nagreement (hf / jaxmerge):")
        agreement = {}
        for task in args.tasks:
            agree, detail = compare(task, last["hf", task], last["jaxmerge", task])
            agreement[task] = agree
            print(f"  {task:10}{'agree' if agree else 'DIFFER'}: {detail}")
        load_after = os.getloadavg()
        print(f"load average after: {load_after[0]:.2f} / {load_after[1]:.2f} / {load_after[2]:.2f}; "
              f"total {time.perf_counter() - began:.0f}s")
        if args.json:
            args.json.write_text(json.dumps({
                "shape": args.shape, "parameters": params, "threads": THREADS, "cores": os.cpu_count(),
                "batch_size": args.batch_size, "rows": rows, "first_calls": [dataclasses.asdict(r) for r in runs
                                                                              if r.first],
                "agree": agreement, "load_average": [load_before, load_after]}, indent=1))
        if not all(agreement.values()):
            sys.exit("the backends' results differ")


if __name__ == "__main__":
    main()
