"""`jaxmerge plan`: per-device memory of an evolutionary merge for given models, devices
and batch, with no weights loaded, and the device layout that fits.

Shapes come from `jax.eval_shape`; the merge of one candidate and one evaluation step
(prefill of the fitness minibatch, with the KV cache sized for its generation) are
compiled for each layout on a mesh of as many host devices, and their
`memory_analysis()` gives the bytes per device of its outputs and temporaries.

XLA for CPU compiles these programs, and it computes bfloat16 in float32 (keeping float32
copies of whole bfloat16 inputs), so the programs are compiled in float32: the models,
statistics and merged model are counted exactly in the requested dtype from their
shapes; the merge's temporaries (float32 on every backend: deltas, masks, votes) as
compiled; the evaluation's cache and temporaries scaled to the requested dtype. Fusion
differs between backends: the temporaries are estimates, the rest is exact.
"""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxmerge.architectures import architecture_by_name, architecture_of
from jaxmerge.checkpoint import read_config
from jaxmerge.merge import get_method, merge_params, prepare
from jaxmerge.merge.tree import flat_params, stack_sources
from jaxmerge.models.config import TransformerConfig
from jaxmerge.models.interfaces import language_model
from jaxmerge.models.llava import LlavaConfig
from jaxmerge.models.modules import causal_mask
from jaxmerge.models.vision import VisionConfig
from jaxmerge.parallel import DEVICE_MEMORY_GIB, Layout, model_spec

GIB = 2 ** 30
MISTRAL_7B = TransformerConfig(vocab_size=32000, hidden_size=4096, intermediate_size=14336, num_layers=32,
                               num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, sliding_window=4096,
                               max_position_embeddings=32768)


# config.json fields of the published checkpoints (as their hub configs give them), read by the registry.
_HUB_CONFIGS = {
    "qwen2.5-7b": ("Qwen2ForCausalLM", dict(
        vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
        use_sliding_window=False, sliding_window=131072, max_window_layers=28, tie_word_embeddings=False)),
    "llama-3.1-8b": ("LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, max_position_embeddings=131072, rms_norm_eps=1e-5, rope_theta=500_000.0,
        rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=8192))),
    "gemma-2-9b": ("Gemma2ForCausalLM", dict(
        vocab_size=256000, hidden_size=3584, intermediate_size=14336, num_hidden_layers=42, num_attention_heads=16,
        num_key_value_heads=8, head_dim=256, query_pre_attn_scalar=256, sliding_window=4096,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, max_position_embeddings=8192, rms_norm_eps=1e-6,
        rope_theta=10000.0, hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True)),
}


def presets() -> dict:
    """Configs of the paper's models and of today's common merge bases, by name (no weights needed)."""
    clip_l_336 = VisionConfig(hidden_size=1024, intermediate_size=4096, num_layers=24, num_heads=16, image_size=336,
                              patch_size=14, hidden_act="quick_gelu")
    return {
        "mistral-7b": ("MistralForCausalLM", MISTRAL_7B),
        **{name: (arch, architecture_by_name(arch).parse_config(fields, f"preset {name}"))
           for name, (arch, fields) in _HUB_CONFIGS.items()},
        "llava-v1.6-mistral-7b": ("LlavaNextForConditionalGeneration", LlavaConfig(
            vision=clip_l_336, text=dataclasses.replace(MISTRAL_7B, vocab_size=32064), text_model_type="mistral",
            image_token_id=32000, image_grid_pinpoints=((336, 672), (672, 336), (672, 672), (1008, 336),
                                                        (336, 1008)))),
    }


def _bytes(tree) -> int:
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _abstract(tree, mesh, model_devices):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(
        mesh, model_spec(tuple(x.shape), model_devices))), tree)


def _memory(compiled) -> dict[str, int]:
    m = compiled.memory_analysis()
    return {"arguments": int(m.argument_size_in_bytes), "outputs": int(m.output_size_in_bytes),
            "temporaries": int(m.temp_size_in_bytes)}


def _as_f32(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
        x.shape, jnp.float32 if jnp.issubdtype(x.dtype, jnp.floating) else x.dtype), tree)


def _merge_memory(method: str, base, sources, stats, params, mesh, model_devices: int) -> dict[str, int]:
    """The compiled merge of one candidate, in float32, its arrays sharded as the search shards them."""
    a_base, a_sources, a_stats = (_abstract(_as_f32(t), mesh, model_devices) for t in (base, sources, stats))

    def merge(b, s, st, key):
        return merge_params(method, b, s, params, stats=st, key=key)
    return _memory(jax.jit(merge).lower(a_base, a_sources, a_stats, jax.random.key(0)).compile())


def _step_memory(lm, B: int, T: int, cache_length: int, mesh, model_devices: int) -> dict[str, int]:
    """The compiled evaluation step, in float32: prefill of B prompts of T tokens, with the KV
    cache sized for their generation."""
    graphdef, state = nnx.split(lm)
    a_state = _abstract(_as_f32(state), mesh, model_devices)

    def step(state, ids):
        m = nnx.merge(graphdef, state)
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
        mask = causal_mask(positions, jnp.ones((B, cache_length), jnp.int32))
        logits, cache = m.forward(ids, positions, mask, m.init_cache(B, cache_length), 0)
        return logits[:, -1], cache

    ids = jax.ShapeDtypeStruct((B, T), jnp.int32, sharding=NamedSharding(mesh, P()))
    return _memory(jax.jit(step).lower(a_state, ids).compile())


@dataclasses.dataclass(frozen=True)
class PlanRequest:
    model: str  # a preset name or an HF checkpoint directory (only config.json is read)
    sources: int = 3  # models merged (besides the base)
    # Sources on the device at a time: a pool kept in host memory (`search.sources_on_host`,
    # at most `genome.max_sources` in a merge); None: every source on the device.
    on_device: int | None = None
    method: str = "dare_ties"
    population: int = 128
    batch: int = 8  # prompts per candidate evaluated at once
    seq_len: int = 512  # prompt tokens
    new_tokens: int = 512
    device: str = "v5e"
    devices: int = 8
    dtype: str = "bfloat16"


def build_abstract(request: PlanRequest):
    """(architecture name, abstract model, its language model's flat parameters) of the
    request's model, no weights."""
    table = presets()
    if request.model in table:
        name, config = table[request.model]
    else:
        hf = read_config(Path(request.model))
        arch = architecture_of(hf, request.model)
        name, config = arch.name, arch.parse_config(hf, request.model)
    arch = architecture_by_name(name)
    dtype = jnp.dtype(request.dtype)

    def build():
        return arch.build(config, dtype=dtype, rngs=nnx.Rngs(0))
    return name, nnx.eval_shape(build), jax.eval_shape(lambda: flat_params(language_model(build())))


def plan(request: PlanRequest) -> dict:
    """Per-layout memory per device, and the chosen layout (the most population
    parallelism that fits), as plain data."""
    if jax.device_count() < request.devices:
        raise RuntimeError(f"planning for {request.devices} devices needs as many here; run with "
                           f"XLA_FLAGS=--xla_force_host_platform_device_count={request.devices} "
                           "(the `jaxmerge plan` command does this itself)")
    if request.on_device is not None and not 1 <= request.on_device <= request.sources:
        raise ValueError(f"on_device must be in [1, {request.sources}] (the sources), got {request.on_device}")
    name, model, base = build_abstract(request)
    lm = language_model(model)
    # A pool in host memory puts `on_device` sources on the device (and, while they change,
    # a second stack of them: when no candidate is being merged or scored).
    merged_sources = request.sources if request.on_device is None else request.on_device
    sources = jax.eval_shape(lambda b: stack_sources(b, [b] * merged_sources), base)
    stats = jax.eval_shape(lambda b, s: prepare(request.method, b, s), base, sources)
    method = get_method(request.method)
    params = {p: {q.name: jnp.full((merged_sources,), 0.5) if q.per_source else jnp.float32(0.5)
                  for q in method.parameters} for p in base}
    model_bytes = _bytes(nnx.state(model, nnx.Param))
    sources_bytes = _bytes(sources) + _bytes(stats)  # on the device
    host_bytes = 0 if request.on_device is None else request.sources * sources_bytes / merged_sources
    data_bytes = _bytes(base) + sources_bytes + (model_bytes - _bytes(base))  # + vision etc.
    swap_bytes = 0 if request.on_device is None else sources_bytes
    cache_length = request.seq_len + request.new_tokens
    memory = DEVICE_MEMORY_GIB[request.device] * GIB

    scale = jnp.dtype(request.dtype).itemsize / jnp.dtype(jnp.float32).itemsize  # evaluation: requested dtype

    rows = []
    for model_devices in [m for m in range(1, request.devices + 1) if request.devices % m == 0]:
        layout = Layout(request.devices // model_devices, model_devices)
        mesh = layout.mesh()
        merge_memory = _merge_memory(request.method, base, sources, stats, params, mesh, model_devices)
        eval_memory = _step_memory(lm, request.batch, request.seq_len, cache_length, mesh, model_devices)
        # Resident per device: the models and statistics, one merged candidate (sharded),
        # the merge's temporaries, the step's cache and temporaries; a device's candidates
        # are evaluated one after another. A pool's slots change between candidates, when
        # none of those is held.
        data = data_bytes / model_devices
        merged = _bytes(base) / model_devices
        merge_temp = merge_memory["temporaries"]
        evaluation = scale * (eval_memory["outputs"] + eval_memory["temporaries"])
        resident = data + max(merged + merge_temp + evaluation, swap_bytes / model_devices)
        rows.append({"layout": str(layout), "population_devices": layout.population, "model_devices": model_devices,
                     "candidates_per_device": math.ceil(request.population / layout.population),
                     "data_gib": data / GIB, "merged_gib": merged / GIB, "merge_temp_gib": merge_temp / GIB,
                     "eval_gib": evaluation / GIB, "compiled_f32": {"merge": merge_memory, "eval": eval_memory},
                     "per_device_gib": resident / GIB, "fits": resident <= 0.9 * memory})
    chosen = next((r["layout"] for r in rows if r["fits"]), None)
    return {"model": request.model, "architecture": name, "parameters": int(sum(
        math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))), "model_gib": model_bytes / GIB,
            "sources": request.sources, "on_device": request.on_device, "host_pool_gib": host_bytes / GIB,
            "method": request.method, "device": request.device,
            "devices": request.devices, "device_memory_gib": DEVICE_MEMORY_GIB[request.device],
            "population": request.population, "batch": request.batch, "seq_len": request.seq_len,
            "new_tokens": request.new_tokens, "layouts": rows, "chosen": chosen}


def format_plan(result: dict) -> str:
    lines = [f"{result['model']} ({result['architecture']}, {result['parameters'] / 1e9:.2f}B parameters, "
             f"{result['model_gib']:.1f} GiB), {result['sources']} sources + base"
             + (f" (in host memory, {result['host_pool_gib']:.1f} GiB; {result['on_device']} on the device at a time)"
                if result.get("on_device") else "") + f", {result['method']}; "
             f"{result['devices']} x {result['device']} ({result['device_memory_gib']} GiB each); population "
             f"{result['population']}, batch {result['batch']} x {result['seq_len']} tokens + "
             f"{result['new_tokens']} new",
             "", "| layout (population x model) | models + statistics | merged candidate | merge temporaries "
             "| evaluation (cache, activations) | total per device | fits (90%) | candidates per device |",
             "|---|---:|---:|---:|---:|---:|---|---:|"]
    for r in result["layouts"]:
        lines.append(f"| {r['layout']} | {r['data_gib']:.1f} GiB | {r['merged_gib']:.1f} GiB | "
                     f"{r['merge_temp_gib']:.1f} GiB | {r['eval_gib']:.1f} GiB | {r['per_device_gib']:.1f} GiB | "
                     f"{'yes' if r['fits'] else 'no'} | {r['candidates_per_device']} |")
    lines.append("")
    lines.append(f"chosen layout: {result['chosen']}" if result["chosen"] else
                 "no layout fits: use more devices, fewer sources, or a smaller batch")
    return "\n".join(lines)


def devices_for_plan(count: int) -> None:
    """Before JAX starts its backend: `count` host CPU devices to compile the plan on."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
