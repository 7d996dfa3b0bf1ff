"""One GPU session's figures, start to finish in a few minutes, every step timed and isolated.

    python experiments/bench_gpu.py                      # one NVIDIA GPU (default --platform gpu)
    python experiments/bench_gpu.py --quick              # smaller work, for a short device lease
    python experiments/bench_gpu.py --platform cpu --skip-tests   # smoke mode: tiny sizes, < 1 minute

(Over 500 lines: one self-contained script to copy to a device machine, each step beside
its report.)

Steps, each in its own process (a failure, crash, out-of-memory or hang is caught, reported and
timed out without stopping the others; device memory is freed between steps):

  (a) tests: the fast subset (tests/test_modules.py, test_merge_methods.py, and
      test_transformer.py's Mistral, Qwen2 and Gemma 2 cases) under pytest with JAX_PLATFORMS set;
  (b) in-memory merges per candidate (task arithmetic, TIES, DARE-TIES; 3 sources + base of
      random Mistral-shaped bf16 models made on the device: ~1.1B on GPU, tiny on CPU) against
      the memory-bandwidth bound (K+1 models read, one written, at the device's measured copy
      bandwidth; the nominal H200 HBM3e 4.8 TB/s printed beside it);
  (c) greedy generation throughput of jaxmerge.generate (same model shape, batch 8, 64 new
      tokens), and of transformers' generate in its own process where torch sees the GPU (a CUDA
      build; else "not available"; on --platform cpu only with --torch-cpu);
  (d) the toy ja_math and ja_vlm runs (`python -m jaxmerge.experiments.<name> --out <tmp>`):
      their defaults on GPU (--quick: 4 generations, no DFS); skipped on --platform cpu, where
      even one generation takes about 100 s on 2 cores (--experiments runs a 1-generation version);
  (e) a Mistral-7B-shaped step (random bf16 weights made on the device, no disk: base + 3
      sources, ~58 GB): one DARE-TIES merge candidate and one evaluation (generate, batch 16 x
      32 new tokens from a 64-token prompt), candidates/s, and the paper's budget projected
      from them (PS: 1000 trials on 1000 problems; DFS: 100 generations x 128 candidates);
      on --platform cpu a tiny shape stands in;
  (f) bench_scale.py's decode part at a Qwen2-7B shape (--quick: 1.5B; cpu: tiny): prefill against
      the measured matmul peak, a decode step against the weights' bytes over the read bandwidth.

Prints one Markdown summary (device, versions, every figure) and writes it to --out (default
bench_gpu.md), with the figures as JSON (<out>.json) and every step's output (<out>.log) beside
it. Nothing here reaches the network: random models, shipped toy checkpoints, local tests.
A global --budget (default 360 s on GPU) caps the whole run: each step's timeout is cut to what
is left, and a step with too little left is skipped and says so.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the repository, installed or not (the GPU machine has it only as a copy)
    sys.path.insert(0, str(ROOT))

NOMINAL_GBPS = {"H200": 4800.0, "H100": 3350.0, "A100": 2039.0}  # HBM, vendor figures (GB/s)
NUM_SOURCES = 3
# Mistral-architecture shapes (config.json fields)
SHAPES = {
    "tiny": dict(vocab_size=4000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                 num_attention_heads=8, num_key_value_heads=2),
    "1b": dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4),
    "7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=8),  # Mistral-7B-v0.1
}
TEST_FILES = ["tests/test_modules.py", "tests/test_merge_methods.py", "tests/test_transformer.py"]
TEST_FILTER = "not test_transformer or mistral or qwen2 or gemma2"  # -k: all of the first two files
QUICK_TEST_FILES = ["tests/test_merge_methods.py", "tests/test_transformer.py"]
QUICK_TEST_FILTER = "not test_transformer or mistral"
PAPER = {"ps_trials": 1000, "problems": 1000, "dfs_generations": 100, "dfs_population": 128}
MISSING_FOR = {"ja_math": ["evosax", "dotmap", "orbax.checkpoint", "matplotlib"],
               "ja_vlm": ["evosax", "dotmap", "orbax.checkpoint", "matplotlib", "fugashi", "unidic_lite",
                          "rouge_score", "nltk", "neologdn", "emoji"],
               "tests": ["pytest", "torch", "transformers"]}


def hf_config(shape: str) -> dict:
    return dict(architectures=["MistralForCausalLM"], model_type="mistral", rms_norm_eps=1e-5, rope_theta=10000.0,
                sliding_window=None, max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[shape])


def parameter_count(shape: str) -> int:
    s = SHAPES[shape]
    d, f, v, n = s["hidden_size"], s["intermediate_size"], s["vocab_size"], s["num_hidden_layers"]
    kv = d // s["num_attention_heads"] * s["num_key_value_heads"]
    return 2 * v * d + d + n * (2 * d * d + 2 * d * kv + 3 * d * f + 2 * d)


# ============================================================================ workers (one process each)


class Recorder:
    """A worker's figures, rewritten to its result file after each one: a crash or a timeout
    leaves what was measured before it."""

    def __init__(self, path: str):
        self.path, self.data = Path(path), {}

    def __setitem__(self, key, value):
        self.data[key] = value
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps(self.data, default=str))
        os.replace(staging, self.path)

    def __getitem__(self, key):
        return self.data[key]


def device_info() -> dict:
    import flax
    import jax
    import jaxlib

    device = jax.devices()[0]
    info = {"device_kind": device.device_kind, "platform": device.platform, "device_count": jax.device_count(),
            "jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "python": platform.python_version()}
    try:
        stats = device.memory_stats() or {}
        if "bytes_limit" in stats:
            info["memory_limit_gb"] = stats["bytes_limit"] / 1e9
    except Exception:  # not every backend reports memory
        pass
    return info


def peak_memory_gb() -> float | None:
    import jax

    try:
        stats = jax.devices()[0].memory_stats() or {}
    except Exception:
        return None
    return stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None


def timed(fn, repeats: int) -> tuple[float, float]:
    """(first call: trace + compile + run, median of `repeats` more), fn(i) blocking."""
    began = time.perf_counter()
    fn(0)
    first = time.perf_counter() - began
    times = []
    for i in range(repeats):
        began = time.perf_counter()
        fn(i + 1)
        times.append(time.perf_counter() - began)
    return first, statistics.median(times)


def copy_bandwidth(elements: int, repeats: int) -> float:
    """Bytes/s of a jitted in-place `x + 1` over a large float32 array (read + write; the
    input donated, so no allocation is timed)."""
    import jax
    import jax.numpy as jnp

    step = jax.jit(lambda x: x + 1, donate_argnums=0)
    x = jax.block_until_ready(jnp.zeros((elements,), jnp.float32))
    for _ in range(2):
        x = jax.block_until_ready(step(x))
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        x = jax.block_until_ready(step(x))
        times.append(time.perf_counter() - began)
    nbytes = x.nbytes
    del x
    return 2 * nbytes / statistics.median(times)


def random_family(shape: str, num_sources: int, seed: int = 0):
    """A random Mistral-shaped model in bf16 made on the device under jit (norms 1, weights
    uniform with std 0.02), and `num_sources` fine-tunes (base + uniform noise of std 0.002) stacked
    as `stack_sources` returns them ([K, ...]; stacked layers [L, K, ...]). Returns (model, base flat, stacked flat)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxmerge.architectures import architecture_by_name
    from jaxmerge.merge import flat_params
    from jaxmerge.merge.tree import is_stacked

    arch = architecture_by_name("MistralForCausalLM")
    config = arch.parse_config(hf_config(shape), "<bench_gpu>")
    abstract = nnx.eval_shape(lambda: arch.build(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    pure = nnx.to_pure_dict(state)

    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    names = [".".join(str(getattr(p, "key", p)) for p in path) for path, _ in leaves]
    shapes = [tuple(spec.shape) for _, spec in leaves]

    # Two programs (the base; the sources), one random draw per leaf in each: few random ops to
    # compile. "rbg" keys: XLA's RngBitGenerator, which compiles and runs faster than threefry;
    # uniform numbers (std `scale`), cheaper to compile than normal ones.
    def noise(key, shape, scale):
        bound = scale * 3 ** 0.5
        return jax.random.uniform(key, shape, jnp.bfloat16, -bound, bound)

    @jax.jit
    def make_base(key):
        return [jnp.ones(shape, jnp.bfloat16) if "norm" in name else noise(jax.random.fold_in(key, i), shape, 0.02)
                for i, (name, shape) in enumerate(zip(names, shapes, strict=True))]

    @jax.jit
    def make_sources(key, base):  # source by source (lax.map): each draw under 2^32 elements, one op to compile
        stacked = [jax.lax.map(lambda k, b=b: b + noise(k, b.shape, 0.002),
                               jax.random.split(jax.random.fold_in(key, i), num_sources)) for i, b in enumerate(base)]
        return [jnp.moveaxis(s, 0, 1) if is_stacked(name) else s  # [L, K, ...]
                for name, s in zip(names, stacked, strict=True)]

    key = jax.random.key(seed, impl="rbg")
    values = make_base(key)
    stacked = dict(zip(names, make_sources(jax.random.fold_in(key, 1), values), strict=True)) if num_sources else {}
    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, values))
    model = nnx.merge(graphdef, state, rest)
    base = flat_params(model)
    if num_sources and set(base) != set(stacked):
        raise RuntimeError(f"parameter paths differ: {sorted(set(base) ^ set(stacked))[:4]}")
    jax.block_until_ready((base, stacked))
    return model, base, {p: stacked[p] for p in base} if num_sources else {}


def candidate_merge(method: str):
    """A jitted candidate: (base, sources, stats, weights [K], densities [K], key) -> merged flat.
    Models and statistics are arguments, never constants XLA could fold."""
    import jax
    import jax.numpy as jnp

    from jaxmerge.merge import get_method, merge_params

    names = {p.name for p in get_method(method).parameters}

    @jax.jit
    def candidate(base, sources, stats, weights, densities, key):
        values = {"weight": weights, "density": densities, "lambda": jnp.float32(1.0)}
        params = {p: {n: v for n, v in values.items() if n in names} for p in base}
        return merge_params(method, base, sources, params, stats=stats, key=key)

    return candidate


def new_values(rng, count: int):
    import jax.numpy as jnp

    return (jnp.asarray(rng.uniform(0.2, 1.0, count), jnp.float32),
            jnp.asarray(rng.uniform(0.2, 1.0, count), jnp.float32))


def prompts(batch: int, length: int, vocab: int, seed: int = 0):
    """Random ids [B, T], every other row left-padded to half length, and the mask."""
    import numpy as np

    rng = np.random.RandomState(seed)
    ids = rng.randint(3, vocab, (batch, length)).astype(np.int32)
    mask = np.ones_like(ids)
    for row in range(1, batch, 2):
        ids[row, :length // 2] = 0
        mask[row, :length // 2] = 0
    return ids, mask


def worker_merges(args, out: Recorder) -> None:
    import jax
    import numpy as np

    from jaxmerge.merge import prepare

    out["info"] = device_info()
    gpu = args.platform != "cpu"
    elements = (1 << 30) if gpu else (1 << 26)  # 4 GiB / 256 MiB of float32
    out["bandwidth_gbps"] = copy_bandwidth(elements, 10 if gpu else 5) / 1e9
    shape = "1b" if gpu else "tiny"
    began = time.perf_counter()
    model, base, sources = random_family(shape, NUM_SOURCES)
    model_bytes = sum(v.nbytes for v in base.values())
    out["model"] = {"shape": shape, "parameters": parameter_count(shape), "bytes": model_bytes,
                    "created_s": time.perf_counter() - began}
    bound = (NUM_SOURCES + 2) * model_bytes / (out["bandwidth_gbps"] * 1e9)  # K + 1 read, 1 written
    out["bound_s"] = bound
    repeats = (5 if args.quick else 10) if gpu else 2
    methods = {}
    for method in ("task_arithmetic", "ties", "dare_ties"):
        try:
            stats = prepare(method, base, sources)
            candidate = candidate_merge(method)
            rng = np.random.default_rng(1)

            def run(i, candidate=candidate, stats=stats, rng=rng):
                weights, densities = new_values(rng, NUM_SOURCES)
                jax.block_until_ready(candidate(base, sources, stats, weights, densities, jax.random.key(i)))

            first, steady = timed(run, repeats)
            methods[method] = {"first_s": first, "per_candidate_s": steady, "over_bound": steady / bound,
                               "repeats": repeats}
        except Exception as error:  # report, go on with the next method
            methods[method] = {"error": f"{type(error).__name__}: {str(error)[:300]}"}
        out["methods"] = methods
        print(f"{method}: {methods[method]}", flush=True)
    out["peak_memory_gb"] = peak_memory_gb()


def worker_generate(args, out: Recorder) -> None:
    import jax

    import jaxmerge

    out["info"] = device_info()
    gpu = args.platform != "cpu"
    shape = "1b" if gpu else "tiny"
    model, _, _ = random_family(shape, 0)
    ids, mask = prompts(args.batch, args.prompt_length, SHAPES[shape]["vocab_size"])

    def run(_):
        jax.block_until_ready(jaxmerge.generate(model, ids, args.new_tokens, attention_mask=mask))

    first, steady = timed(run, 3 if gpu else 1)
    out["jaxmerge"] = {"shape": shape, "parameters": parameter_count(shape), "batch": args.batch,
                       "prompt_length": args.prompt_length, "new_tokens": args.new_tokens, "first_s": first,
                       "seconds": steady, "tokens_per_s": args.batch * args.new_tokens / steady}


def worker_torch_generate(args, out: Recorder) -> None:
    """transformers' generate on the same shape, batch and lengths (its own random weights)."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    gpu = args.platform != "cpu"
    out["torch"] = torch.__version__
    out["torch_cuda"] = torch.version.cuda
    if gpu and not torch.cuda.is_available():
        out["not_available"] = f"torch {torch.__version__} sees no CUDA device (CUDA build: {torch.version.cuda})"
        return
    device = "cuda" if gpu else "cpu"
    shape = "1b" if gpu else "tiny"
    fields = {k: v for k, v in hf_config(shape).items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    with torch.device(device):
        model = MistralForCausalLM(MistralConfig(**fields)).to(torch.bfloat16).eval()
    ids, mask = prompts(args.batch, args.prompt_length, SHAPES[shape]["vocab_size"])
    ids, mask = torch.as_tensor(ids, dtype=torch.long, device=device), torch.as_tensor(mask, device=device)

    def run(_):
        with torch.inference_mode():
            model.generate(ids, attention_mask=mask, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        if gpu:
            torch.cuda.synchronize()

    first, steady = timed(run, 3 if gpu else 1)
    out["transformers"] = {"device": device, "first_s": first, "seconds": steady,
                           "tokens_per_s": args.batch * args.new_tokens / steady,
                           "device_name": torch.cuda.get_device_name() if gpu else platform.processor() or "cpu"}


def worker_big(args, out: Recorder) -> None:
    import jax
    import numpy as np

    import jaxmerge
    from jaxmerge.merge import prepare, with_params

    out["info"] = device_info()
    gpu = args.platform != "cpu"
    shape = "7b" if gpu else "tiny"
    began = time.perf_counter()
    model, base, sources = random_family(shape, NUM_SOURCES)
    model_bytes = sum(v.nbytes for v in base.values())
    out["model"] = {"shape": shape, "parameters": parameter_count(shape), "bytes": model_bytes,
                    "created_s": time.perf_counter() - began}
    print(f"models made: {out['model']}", flush=True)
    stats = prepare("dare_ties", base, sources)
    candidate = candidate_merge("dare_ties")
    rng = np.random.default_rng(2)
    merged = None

    def merge(i):
        nonlocal merged
        merged = None  # the last candidate's output freed first: one merged model at a time
        weights, densities = new_values(rng, NUM_SOURCES)
        merged = jax.block_until_ready(candidate(base, sources, stats, weights, densities, jax.random.key(i)))

    repeats = 1 if args.quick or not gpu else 2
    first, steady = timed(merge, repeats)
    out["merge"] = {"first_s": first, "seconds": steady, "repeats": repeats}
    print(f"merge: {out['merge']}", flush=True)
    merged_model = with_params(model, merged)
    ids, mask = prompts(args.eval_batch, args.eval_prompt_length, SHAPES[shape]["vocab_size"], seed=1)

    def evaluate(_):
        jax.block_until_ready(jaxmerge.generate(merged_model, ids, args.eval_new_tokens, attention_mask=mask))

    first, steady = timed(evaluate, repeats)
    out["eval"] = {"first_s": first, "seconds": steady, "batch": args.eval_batch,
                   "prompt_length": args.eval_prompt_length, "new_tokens": args.eval_new_tokens,
                   "tokens_per_s": args.eval_batch * args.eval_new_tokens / steady}
    out["peak_memory_gb"] = peak_memory_gb()


WORKERS = {"merges": worker_merges, "generate": worker_generate, "torch_generate": worker_torch_generate,
           "big": worker_big}


# ============================================================================ the driver


class Step:
    """One step's record: status (ok / failed / timed out / skipped / not available), seconds,
    figures, and a note."""

    def __init__(self, name: str):
        self.name, self.status, self.seconds, self.figures, self.note = name, "not run", 0.0, {}, ""

    def as_dict(self) -> dict:
        return {"status": self.status, "seconds": self.seconds, "figures": self.figures, "note": self.note}


class Driver:
    def __init__(self, args):
        self.args = args
        self.began = time.perf_counter()
        self.work = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
        self.out = Path(args.out)
        self.log_path = self.out.with_suffix(".log")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.log_path.write_text(f"bench_gpu {datetime.datetime.now().isoformat(timespec='seconds')} "
                                 f"{' '.join(sys.argv[1:])}\n")
        self.steps: dict[str, Step] = {}
        jax_platform = {"gpu": "cuda", "cpu": "cpu", "tpu": "tpu"}[args.platform]
        path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
        self.env = {**os.environ, "JAX_PLATFORMS": jax_platform, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1",
                    "JAXMERGE_CACHE_DIR": "off", "TF_CPP_MIN_LOG_LEVEL": "2", "TOKENIZERS_PARALLELISM": "false"}
        if args.platform == "cpu":  # smoke mode: steps share one XLA cache (same tiny shapes; first calls faster)
            self.env.update(JAX_COMPILATION_CACHE_DIR=str(self.work / "xla_cache"),
                            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
        else:  # the 7B step holds ~75 GB; JAX's default pool is 75% of the device
            self.env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")

    def left(self) -> float:
        return self.args.budget - (time.perf_counter() - self.began)

    def log(self, text: str) -> None:
        with self.log_path.open("a") as f:
            f.write(text)

    def run(self, name: str, command: list[str], timeout: float, env: dict | None = None,
            cwd: Path = ROOT) -> tuple[int | None, str, float]:
        """Runs a command in its own process group, killed (the group) at `timeout`. Returns
        (exit code or None when timed out, its output, seconds)."""
        log_file = self.work / f"{name}.out"
        began = time.perf_counter()
        with log_file.open("w") as sink:
            process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env or self.env,
                                       cwd=cwd, start_new_session=True)
            try:
                code = process.wait(timeout=max(1.0, timeout))
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)  # the group this call started
                process.wait()
                code = None
        seconds = time.perf_counter() - began
        output = log_file.read_text(errors="replace")
        self.log(f"\n===== {name}: {' '.join(command)}\n===== exit {code}, {seconds:.1f} s, timeout "
                 f"{timeout:.0f} s\n{output}")
        return code, output, seconds

    def step_timeout(self, step: Step, wanted: float) -> float | None:
        """The step's timeout cut to the budget left; None (and the step marked skipped) when
        too little is left."""
        left = self.left() - 5
        if left < min(20.0, wanted):
            step.status, step.note = "skipped", f"out of budget ({max(0, left + 5):.0f} s of {self.args.budget} s left)"
            return None
        return min(wanted, left)

    def worker(self, name: str, step: Step, wanted: float) -> dict:
        """Runs WORKERS[name] in its own process; its figures (what it recorded, even if it died)."""
        timeout = self.step_timeout(step, wanted)
        if timeout is None:
            return {}
        result = self.work / f"{name}.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", name, "--result", str(result),
                   *self.worker_args()]
        code, output, seconds = self.run(name, command, timeout)
        figures = json.loads(result.read_text()) if result.exists() else {}
        step.seconds += seconds
        if code is None:
            step.status = "timed out"
            step.note = f"killed after {timeout:.0f} s; last output: {last_line(output)}"
        elif code != 0:
            step.status = "failed"
            step.note = error_line(output)
        elif step.status in ("not run", "ok"):
            step.status = "ok"
        if code != 0:
            print(f"  [{name}] exit {code}; output tail:\n" + indent_tail(output), flush=True)
        return figures

    def worker_args(self) -> list[str]:
        a = self.args
        flags = ["--platform", a.platform, "--batch", str(a.batch), "--prompt-length", str(a.prompt_length),
                 "--new-tokens", str(a.new_tokens), "--eval-batch", str(a.eval_batch), "--eval-prompt-length",
                 str(a.eval_prompt_length), "--eval-new-tokens", str(a.eval_new_tokens)]
        return flags + (["--quick"] if a.quick else [])

    # ---------------------------------------------------------------- steps

    def tests(self) -> None:
        step = self.steps.setdefault("a", Step("(a) tests"))
        if self.args.skip_tests:
            step.status, step.note = "skipped", "--skip-tests"
            return
        missing = missing_modules(MISSING_FOR["tests"])
        if missing:
            step.status, step.note = "not available", f"missing Python modules: {', '.join(missing)}"
            return
        timeout = self.step_timeout(step, self.args.test_timeout)
        if timeout is None:
            return
        files, expression = (QUICK_TEST_FILES, QUICK_TEST_FILTER) if self.args.quick else (TEST_FILES, TEST_FILTER)
        command = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *files, "-k", expression]
        code, output, seconds = self.run("tests", command, timeout)
        step.seconds = seconds
        step.figures = {"command": " ".join(command[1:]), "summary": pytest_summary(output)}
        if code == 0:
            step.status = "ok"
            return
        if code is None:
            step.status, step.note = "timed out", f"killed after {timeout:.0f} s; last output: {last_line(output)}"
        else:
            failed = re.findall(r"^(?:FAILED|ERROR) (\S+)", output, re.MULTILINE)
            step.status, step.note = "failed", f"first failure: {failed[0]}" if failed else error_line(output)
        print("  [tests] output tail:\n" + indent_tail(output), flush=True)

    def merges(self) -> None:
        step = self.steps.setdefault("b", Step("(b) merges"))
        step.figures = self.worker("merges", step, self.args.merge_timeout)

    def generation(self) -> None:
        step = self.steps.setdefault("c", Step("(c) generation"))
        step.figures = self.worker("generate", step, self.args.generate_timeout)
        compare = self.steps.setdefault("c2", Step("(c) transformers"))
        if self.args.platform == "cpu" and not self.args.torch_cpu:
            compare.status = "not available"
            compare.note = "cpu mode: the comparison is with torch on CUDA (--torch-cpu: with torch's CPU)"
            return
        if not importlib.util.find_spec("torch") or not importlib.util.find_spec("transformers"):
            compare.status, compare.note = "not available", "torch or transformers is not installed"
            return
        compare.figures = self.worker("torch_generate", compare, self.args.generate_timeout)
        if "not_available" in compare.figures:
            compare.status, compare.note = "not available", compare.figures["not_available"]

    def big(self) -> None:
        step = self.steps.setdefault("e", Step("(e) 7B step" if self.args.platform != "cpu" else "(e) tiny step"))
        step.figures = self.worker("big", step, self.args.big_timeout)

    def experiments(self) -> None:
        a = self.args
        for name in ("ja_math", "ja_vlm"):
            step = self.steps.setdefault(name, Step(f"(d) {name}"))
            if a.platform == "cpu" and not a.experiments:
                step.status = "skipped"
                step.note = ("cpu mode: even 1 generation takes ~100 s on 2 cores (over the smoke budget); "
                             "--experiments runs it")
                continue
            if a.skip_experiments:
                step.status, step.note = "skipped", "--skip-experiments"
                continue
            missing = missing_modules(MISSING_FOR[name])
            if missing:
                step.status, step.note = "not available", f"missing Python modules: {', '.join(missing)}"
                continue
            timeout = self.step_timeout(step, a.experiment_timeout)
            if timeout is None:
                continue
            run_dir = self.work / name
            extra = []
            if a.platform == "cpu":
                extra = ["--generations", "1", "--no-dfs", "--test-size", "8"]
            elif a.quick:
                extra = ["--generations", "4", "--no-dfs", "--test-size", "100"]
            command = [sys.executable, "-m", f"jaxmerge.experiments.{name}", "--out", str(run_dir), *extra]
            code, output, seconds = self.run(name, command, timeout)
            step.seconds = seconds
            step.figures = {"arguments": " ".join(extra) or "defaults", **experiment_figures(run_dir, output)}
            if code == 0:
                step.status = "ok"
            else:
                step.status = "timed out" if code is None else "failed"
                step.note = f"killed after {timeout:.0f} s; reached: {last_stage(output)}" if code is None \
                    else error_line(output)
                print(f"  [{name}] output tail:\n" + indent_tail(output), flush=True)

    def scale(self) -> None:
        """(f) bench_scale.py's decode part: prefill and a decode step against the matmul peak and the
        weight-streaming bound, at a real shape (tiny on --platform cpu)."""
        a = self.args
        step = self.steps.setdefault("f", Step("(f) decode at scale"))
        shape = "tiny" if a.platform == "cpu" else ("qwen2-1.5b" if a.quick else "qwen2-7b")
        timeout = self.step_timeout(step, a.scale_timeout)
        if timeout is None:
            return
        command = [sys.executable, str(ROOT / "experiments" / "bench_scale.py"), "--parts", "decode", "--shape", shape,
                   "--repeats", "2"]
        code, output, seconds = self.run("scale", command, timeout)
        step.seconds = seconds
        step.figures = {"shape": shape, "lines": [line for line in output.splitlines()
                                                  if line.startswith(("| float", "| bfloat", "measured"))]}
        if code == 0:
            step.status = "ok"
        else:
            step.status = "timed out" if code is None else "failed"
            step.note = f"killed after {timeout:.0f} s" if code is None else error_line(output)

    # ---------------------------------------------------------------- report

    def info(self) -> dict:
        for key in ("b", "e", "c"):
            step = self.steps.get(key)
            if step and "info" in step.figures:
                return step.figures["info"]
        return {}

    def report(self) -> str:
        a, info = self.args, self.info()
        torch_figures = self.steps.get("c2", Step("")).figures
        lines = [f"# bench_gpu: {info.get('device_kind', 'device unknown')} ({a.platform}"
                 f"{', --quick' if a.quick else ''})", "",
                 f"- device: {info.get('device_kind', '?')} x {info.get('device_count', '?')}, platform "
                 f"{info.get('platform', '?')}" + (f", {info['memory_limit_gb']:.0f} GB for JAX"
                                                   if info.get("memory_limit_gb") else ""),
                 f"- jax {info.get('jax', '?')}, jaxlib {info.get('jaxlib', '?')}, flax {info.get('flax', '?')}, "
                 f"python {info.get('python', platform.python_version())}"
                 + (f", torch {torch_figures['torch']} (CUDA {torch_figures.get('torch_cuda')})"
                    if "torch" in torch_figures else ""),
                 f"- {datetime.datetime.now().isoformat(timespec='seconds')}, {os.cpu_count()} CPU cores; whole run "
                 f"{time.perf_counter() - self.began:.0f} s of a {a.budget:.0f} s budget"
                 + ("; cpu mode: the steps share one XLA compilation cache, so a program a step compiled "
                    "before is a cache hit in a later step's first call" if a.platform == "cpu" else ""), "",
                 "| step | figure | value | status | seconds |", "|---|---|---|---|---:|"]

        def row(step: Step, figure: str, value: str, status: str | None = None):
            lines.append(f"| {step.name} | {figure} | {value} | {status or step.status} | {step.seconds:.0f} |")

        def note(step: Step):
            if step.note:
                row(step, "note", step.note.replace("|", "/"))

        for key, render in (("a", render_tests), ("b", render_merges), ("c", render_generation),
                            ("ja_math", render_experiment), ("ja_vlm", render_experiment), ("e", render_big),
                            ("f", render_scale)):
            step = self.steps.get(key)
            if step is None:
                continue
            for figure, value in render(step, self):
                row(step, figure, value)
            if key == "c":
                compare = self.steps.get("c2")
                if compare is not None:
                    for figure, value in render_transformers(compare, step):
                        row(compare, figure, value)
                    note(compare)
            note(step)
        return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- rendering


def fmt_s(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 600:
        return f"{seconds:.2f} s"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"


def fmt_params(count: int) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e9 else f"{count / 1e6:.1f}M"


def render_tests(step: Step, driver) -> list[tuple[str, str]]:
    if not step.figures:
        return [("pytest (fast subset)", "—")]
    return [(f"pytest {' '.join(TEST_FILES if not driver.args.quick else QUICK_TEST_FILES)} -k \"...\"",
             step.figures.get("summary") or "—")]


def nominal(info: dict) -> tuple[str, float] | None:
    kind = info.get("device_kind", "")
    for name, gbps in NOMINAL_GBPS.items():
        if name in kind:
            return name, gbps
    return None


def render_merges(step: Step, driver) -> list[tuple[str, str]]:
    f = step.figures
    rows = []
    if "bandwidth_gbps" in f:
        ref = nominal(f.get("info", {}))
        nominal_text = (f"; nominal {ref[0]} HBM {ref[1] / 1000:.1f} TB/s: {100 * f['bandwidth_gbps'] / ref[1]:.0f}%"
                        if ref else "; nominal H200 HBM3e: 4.8 TB/s")
        rows.append(("device copy bandwidth (jit x + 1, donated, read + write)",
                     f"{f['bandwidth_gbps']:.0f} GB/s{nominal_text}"))
    if "model" in f:
        m = f["model"]
        rows.append(("models (random, bf16, made on device)",
                     f"Mistral-shaped {m['shape']}: {fmt_params(m['parameters'])} parameters, "
                     f"{m['bytes'] / 1e9:.2f} GB each; base + {NUM_SOURCES} sources in {m['created_s']:.1f} s"))
    if "bound_s" in f:
        rows.append(("memory-bandwidth bound per candidate", f"{fmt_s(f['bound_s'])} ({NUM_SOURCES + 1} models read, "
                                                              "1 written, at the measured bandwidth)"))
    for method, r in f.get("methods", {}).items():
        if "error" in r:
            rows.append((f"{method} per candidate", f"failed: {r['error'][:150].replace('|', '/')}"))
        else:
            rows.append((f"{method} per candidate (in memory)",
                         f"{fmt_s(r['per_candidate_s'])} = {r['over_bound']:.1f}x the bound (median of "
                         f"{r['repeats']}); first call {r['first_s']:.1f} s"))
    if f.get("peak_memory_gb"):
        rows.append(("peak device memory", f"{f['peak_memory_gb']:.1f} GB"))
    return rows or [("figures", "—")]


def render_generation(step: Step, driver) -> list[tuple[str, str]]:
    j = step.figures.get("jaxmerge")
    if not j:
        return [("jaxmerge.generate", "—")]
    return [(f"jaxmerge.generate tokens/s ({j['shape']} {fmt_params(j['parameters'])} bf16, batch {j['batch']}, "
             f"prompt {j['prompt_length']}, {j['new_tokens']} new)",
             f"{j['tokens_per_s']:.0f} tokens/s ({fmt_s(j['seconds'])} a call); first call {j['first_s']:.1f} s")]


def render_transformers(step: Step, ours: Step) -> list[tuple[str, str]]:
    t = step.figures.get("transformers")
    if not t:
        return [("transformers generate (same shape, batch, lengths)", "not available" if step.status ==
                 "not available" else "—")]
    j = ours.figures.get("jaxmerge")
    ratio = f"; jaxmerge / transformers {j['tokens_per_s'] / t['tokens_per_s']:.2f}x" if j else ""
    return [(f"transformers generate tokens/s (torch on {t['device']}, own random weights)",
             f"{t['tokens_per_s']:.0f} tokens/s{ratio}")]


def render_experiment(step: Step, driver) -> list[tuple[str, str]]:
    f = step.figures
    if not f or step.status == "skipped":
        return [("toy run", "—")]
    rows = [("toy run (" + f.get("arguments", "") + ")",
             f"total {f['total_s']:.0f} s" if "total_s" in f else "no total")]
    if "candidates_per_second" in f:
        rows.append(("PS search", f"{f['generations']} x {f['population']} candidates, "
                                  f"{f['candidates_per_second']:.1f} candidates/s (compile included)"))
    if "evolved" in f:
        rows.append(("evolved PS merge, test scores", f["evolved"]))
    return rows


def render_scale(step: Step, driver) -> list[tuple[str, str]]:
    """bench_scale's lines: the measured bounds, then per dtype weights | prefill s | prefill / peak |
    step ms | bound ms | step / bound."""
    return [(f"{step.figures.get('shape')} decode", line.strip("| ").replace("|", "/"))
            for line in step.figures.get("lines", [])]


def render_big(step: Step, driver) -> list[tuple[str, str]]:
    f = step.figures
    rows = []
    if "model" in f:
        m = f["model"]
        total = (NUM_SOURCES + 1) * m["bytes"] / 1e9
        what = "Mistral-7B-shaped" if m["shape"] == "7b" else f"{m['shape']} shape standing in for 7B (cpu mode)"
        rows.append(("models (random, bf16, on device, no disk)",
                     f"{what}: {fmt_params(m['parameters'])} parameters, {m['bytes'] / 1e9:.2f} GB each; base + "
                     f"{NUM_SOURCES} sources ({total:.1f} GB) in {m['created_s']:.1f} s"))
    if "merge" in f:
        r = f["merge"]
        rows.append(("DARE-TIES merge, one candidate", f"{fmt_s(r['seconds'])}; first call {r['first_s']:.1f} s"))
        bandwidth = driver.steps.get("b", Step("")).figures.get("bandwidth_gbps")
        if bandwidth and "model" in f:
            bound = (NUM_SOURCES + 2) * f["model"]["bytes"] / (bandwidth * 1e9)
            rows.append(("merge bound at the measured bandwidth", f"{fmt_s(bound)}: the merge is "
                                                                  f"{r['seconds'] / bound:.1f}x it"))
    if "eval" in f:
        e = f["eval"]
        rows.append((f"evaluation: generate batch {e['batch']} x {e['new_tokens']} new from {e['prompt_length']}",
                     f"{fmt_s(e['seconds'])} ({e['tokens_per_s']:.0f} tokens/s); first call {e['first_s']:.1f} s"))
    if "merge" in f and "eval" in f:
        merge, batch_s, batch = f["merge"]["seconds"], f["eval"]["seconds"], f["eval"]["batch"]
        rows.append(("candidates/s (one merge + one evaluation batch)", f"{1 / (merge + batch_s):.2f}"))
        batches = math.ceil(PAPER["problems"] / batch)
        per_candidate = merge + batches * batch_s
        ps = PAPER["ps_trials"] * per_candidate
        dfs = PAPER["dfs_generations"] * PAPER["dfs_population"] * batches * batch_s
        rows.append((f"projection: PS, {PAPER['ps_trials']} trials x {PAPER['problems']} problems",
                     f"{fmt_s(ps)} ({PAPER['ps_trials']} merges + {PAPER['ps_trials']} x {batches} batches of "
                     f"{batch}, {f['eval']['new_tokens']} new tokens each)"))
        rows.append((f"projection: DFS, {PAPER['dfs_generations']} generations x {PAPER['dfs_population']} candidates",
                     f"{fmt_s(dfs)} ({PAPER['dfs_generations'] * PAPER['dfs_population']} evaluations x {batches} "
                     "batches, no merges; a path as long as one model)"))
    if f.get("peak_memory_gb"):
        rows.append(("peak device memory", f"{f['peak_memory_gb']:.1f} GB"))
    return rows or [("figures", "—")]


# ---------------------------------------------------------------- output parsing


def missing_modules(names: list[str]) -> list[str]:
    missing = []
    for name in names:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a parent package missing
            missing.append(name)
    return missing


def pytest_summary(output: str) -> str:
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|error).*?in [\d.]+s.*?)\s*=*$", output, re.MULTILINE)
    return found[-1] if found else ""


def error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^[\w.]*(Error|Exception|Interrupt)\b", line)]
    text = errors[-1] if errors else (lines[-1] if lines else "no output")
    return text[:300]


def last_line(output: str) -> str:
    lines = [line.strip() for line in output.replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1][:200] if lines else "no output"


def last_stage(output: str) -> str:
    stages = [line.strip() for line in output.splitlines()
              if line.startswith(("scoring", "evolving", "search:", "  ", "best on", "total"))]
    return (stages[-1] if stages else last_line(output))[:200]


def indent_tail(output: str, count: int = 15) -> str:
    lines = output.replace("\r", "\n").splitlines()
    return "\n".join("    " + line for line in lines[-count:])


def experiment_figures(run_dir: Path, output: str) -> dict:
    figures = {}
    total = re.findall(r"^total (\d+) s", output, re.MULTILINE)
    if total:
        figures["total_s"] = float(total[-1])
    path = run_dir / "results.json"
    if path.exists():
        results = json.loads(path.read_text())
        search = results.get("search", {})
        for key in ("candidates_per_second", "generations", "population", "best_validation"):
            if key in search:
                figures[key] = search[key]
        evolved = [r for r in results.get("rows", []) if r.get("kind") == "evolved"]
        if evolved:
            figures["evolved"] = ", ".join(f"{k} {v:.1f}" for k, v in evolved[0]["scores"].items())
        figures.setdefault("total_s", results.get("seconds", float("nan")))
    return figures


# ============================================================================ main


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--platform", default="gpu", choices=("gpu", "cpu", "tpu"),
                        help="gpu (default): the sizes above; cpu: smoke mode, tiny sizes")
    parser.add_argument("--out", default="bench_gpu.md", help="the Markdown summary (.json and .log beside it)")
    parser.add_argument("--quick", action="store_true", help="less work: fewer tests, repeats and generations")
    parser.add_argument("--skip-tests", action="store_true", help="skip (a): no pytest inside pytest")
    parser.add_argument("--skip-experiments", action="store_true", help="skip (d)")
    parser.add_argument("--torch-cpu", action="store_true", help="on --platform cpu, compare (c) with torch's CPU")
    parser.add_argument("--experiments", action="store_true", help="on --platform cpu, run (d) with 1 generation")
    parser.add_argument("--steps", default="abcdef", help="which steps to run, by letter (default abcdef: all)")
    parser.add_argument("--budget", type=float, help="seconds for the whole run (default 360 on gpu, 240 on cpu)")
    parser.add_argument("--test-timeout", type=float, default=150)
    parser.add_argument("--merge-timeout", type=float, default=120)
    parser.add_argument("--generate-timeout", type=float, default=90)
    parser.add_argument("--big-timeout", type=float, default=180)
    parser.add_argument("--scale-timeout", type=float, default=150, help="(f) bench_scale's decode part")
    parser.add_argument("--experiment-timeout", type=float, default=150)
    parser.add_argument("--batch", type=int, default=8, help="(c) batch")
    parser.add_argument("--prompt-length", type=int, default=32, help="(c) prompt tokens")
    parser.add_argument("--new-tokens", type=int, default=64, help="(c) new tokens")
    parser.add_argument("--eval-batch", type=int, default=16, help="(e) evaluation batch")
    parser.add_argument("--eval-prompt-length", type=int, default=64, help="(e) prompt tokens")
    parser.add_argument("--eval-new-tokens", type=int, default=32, help="(e) new tokens")
    parser.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.budget is None:
        args.budget = 240.0 if args.platform == "cpu" else 360.0
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker:
        WORKERS[args.worker](args, Recorder(args.result))
        return 0
    driver = Driver(args)
    print(f"bench_gpu: --platform {args.platform}{' --quick' if args.quick else ''}, budget {args.budget:.0f} s; "
          f"log {driver.log_path}", flush=True)
    try:
        # The benchmarks first, then the tests and the long toy runs: what the budget cuts is the least.
        for name, run in (("(b) merges", driver.merges), ("(c) generation", driver.generation),
                          ("(e) big step", driver.big), ("(f) decode at scale", driver.scale),
                          ("(a) tests", driver.tests), ("(d) experiments", driver.experiments)):
            if name[1] not in args.steps:
                continue
            print(f"{name} ...", flush=True)
            before = set(driver.steps)
            run()
            for key in [k for k in driver.steps if k not in before]:
                step = driver.steps[key]
                print(f"  {step.name}: {step.status} ({step.seconds:.0f} s){'; ' + step.note if step.note else ''}",
                      flush=True)
        report = driver.report()
        print("\n" + report, flush=True)
        driver.out.write_text(report)
        driver.out.with_suffix(".json").write_text(json.dumps(
            {"args": vars(args), "info": driver.info(), "steps": {k: s.as_dict() for k, s in driver.steps.items()}},
            indent=1, default=str))
        print(f"wrote {driver.out}, {driver.out.with_suffix('.json')}, {driver.log_path}")
    finally:
        shutil.rmtree(driver.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
