"""Hugging Face checkpoint directories (config.json + safetensors, tokenizer files) read into
Flax models.

`load` reads tensor by tensor from memory-mapped safetensors files, so host memory holds
the model plus at most one stacked tensor in flight, never two copies of the model.
`jaxmerge.saving.save` writes the same layout back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import json
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from safetensors import SafetensorError, safe_open

from jaxmerge.architectures import Architecture, architecture_of
from jaxmerge.errors import CheckpointError
from jaxmerge.hub import resolve_model
from jaxmerge.parallel import MODEL, model_spec

WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
# Files a model directory carries besides weights, copied by `save` from the source.
COMPANION_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "preprocessor_config.json", "processor_config.json",
)

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
}
_DTYPE_NAMES = {
    "float32": jnp.float32, "fp32": jnp.float32, "float": jnp.float32,
    "bfloat16": jnp.bfloat16, "bf16": jnp.bfloat16,
    "float16": jnp.float16, "fp16": jnp.float16, "half": jnp.float16,
}


@dataclasses.dataclass(frozen=True)
class Origin:
    """Where a loaded model came from; `save` uses it for config.json and tokenizer files."""

    architecture: str
    config_json: str  # the source config.json, verbatim
    directory: str | None


TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")


def derived_origin(model, architecture: str) -> Origin | None:
    """The origin of a model built from a loaded `model`'s parts under another architecture
    (a layer path over its layers): its token ids carry over, its other fields do not."""
    origin: Origin | None = getattr(model, "origin", None)
    if origin is None:
        return None
    hf = json.loads(origin.config_json)
    return Origin(architecture, json.dumps({k: hf[k] for k in TOKEN_ID_FIELDS if k in hf}), None)


def resolve_dtype(dtype) -> np.dtype | None:
    """None, a name ("bfloat16", "fp32", ...) or a jnp/numpy dtype -> numpy dtype; only
    float32, bfloat16 and float16 (the dtypes a model computes in and a checkpoint keeps)."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"unknown dtype {dtype!r} (supported: float32, bfloat16, float16)")
        return np.dtype(_DTYPE_NAMES[dtype])
    try:
        resolved = np.dtype(dtype)
    except TypeError:
        resolved = None
    if resolved is None or resolved.name not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"unsupported dtype {dtype!r} (supported: float32, bfloat16, float16)")
    return resolved


def dtype_name(dtype) -> str:
    return {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}[np.dtype(dtype).name]


def check_no_symlink_loop(path: Path) -> None:
    """Raises, naming `path`, if it or a directory above it is a symlink loop (pathlib's resolve()
    raises RuntimeError for one; is_dir() and exists() say False)."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: a symlink loop (its links never reach a file or directory)") from None


def read_config(directory: Path) -> dict:
    check_no_symlink_loop(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: not a directory")
    config_file = directory / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (a Hugging Face model directory has a config.json)")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object")
    return hf


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory. model.safetensors wins over an index beside
    it, as in transformers' from_pretrained: one directory, one set of weights, whoever reads it."""
    if (directory / WEIGHTS_NAME).is_file():
        return [directory / WEIGHTS_NAME]
    index_file = directory / INDEX_NAME
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text())["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index_file}: not a valid safetensors index ({e!r})") from None
        # Shards are files of this directory: a name with a path in it would read another's.
        if not isinstance(weight_map, dict) or not all(
                isinstance(name, str) and name and Path(name).name == name for name in weight_map.values()):
            raise CheckpointError(f"{index_file}: weight_map must map tensor names to shard file names in "
                                  f"{directory}")
        files = [directory / name for name in sorted(set(weight_map.values()))]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"{index_file}: names shard {f.name}, which is missing")
        return files
    if list(directory.glob("model-*-of-*.safetensors")):
        raise CheckpointError(f"{directory}: sharded safetensors files without {INDEX_NAME}")
    if list(directory.glob("*.bin")):
        raise CheckpointError(f"{directory}: only PyTorch .bin weights; jaxmerge reads safetensors")
    raise CheckpointError(f"{directory}: no {WEIGHTS_NAME} or {INDEX_NAME}")


def open_tensors(files: list[Path], stack: contextlib.ExitStack,
                  canonical=lambda key: key) -> dict[str, tuple[Path, object, str]]:
    """Checkpoint key (in the architecture's canonical layout) -> (file, open safetensors
    handle, the key as stored)."""
    found: dict[str, tuple[Path, object, str]] = {}
    for f in files:
        try:
            handle = stack.enter_context(safe_open(str(f), framework="numpy"))
            keys = list(handle.keys())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{f}: truncated or corrupt safetensors file ({e})") from None
        for stored in keys:
            key = canonical(stored)
            if key in found:
                raise CheckpointError(f"{f}: tensor {stored} also in {found[key][0].name} (as {found[key][2]})")
            found[key] = (f, handle, stored)
    return found


def check_claimed_sizes(arch: Architecture, hf: dict, directory: Path) -> None:
    """Refuses, naming config.json and the field, a layer count or embedding size that the
    checkpoint's tensors (their safetensors headers) do not have: checked before the config is
    parsed or anything planned, since 10^9 claimed layers would be planned key by key (minutes,
    gigabytes) before the missing tensors were noticed. Weights that are absent or unreadable
    are refused later, once config.json itself is checked."""
    source = directory / "config.json"
    with contextlib.ExitStack() as stack:
        try:
            tensors = open_tensors(weight_files(directory), stack, arch.canonical_key)
        except CheckpointError:
            return
        for field, value, key, axis in arch.claimed_sizes(hf):
            if isinstance(value, bool) or not isinstance(value, int):
                continue  # not a size: parse_config says so
            if axis is None:
                layer = re.compile(re.escape(key) + r"(\d+)\.")
                found = 1 + max((int(m[1]) for k in tensors if (m := layer.match(k))), default=-1)
                if value > found:
                    held = f"layers 0..{found - 1} only" if found else "no layers"
                    raise CheckpointError(f"{source}: {field} is {value}, but the checkpoint holds {held} "
                                          f"({key}<layer>.*)")
            elif key in tensors:
                file, handle, stored = tensors[key]
                shape = tuple(handle.get_slice(stored).get_shape())
                if len(shape) > axis and shape[axis] != value:
                    raise CheckpointError(f"{source}: {field} is {value}, but tensor {stored} in {file} has shape "
                                          f"{shape}")


@dataclasses.dataclass(frozen=True)
class ParamPlan:
    path: tuple[str, ...]
    shape: tuple[int, ...]  # the model's shape, with the layer axis if stacked
    keys: tuple[str, ...]  # checkpoint keys; several when stacked
    stacked: bool
    transposed: bool  # the checkpoint holds the transpose (a linear kernel)

    @property
    def checkpoint_shape(self) -> tuple[int, ...]:
        shape = self.shape[1:] if self.stacked else self.shape
        return shape[::-1] if self.transposed else shape


def parameter_plan(arch: Architecture, config, abstract_state) -> list[ParamPlan]:
    plan = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(abstract_state))[0]:
        path = tuple(str(k.key) for k in keypath)
        stacked = "layers" in path
        keys = arch.checkpoint_keys(path, leaf.shape[0] if stacked else None)
        plan.append(ParamPlan(path, tuple(leaf.shape), tuple(keys), stacked, arch.is_transposed(path)))
    return plan


def check_tensors(plan, tensors, arch: Architecture, config, directory: Path) -> np.dtype:
    """Every expected tensor present with the right shape and a float dtype, nothing
    unexpected; returns the checkpoint's dtype. Nothing is read yet."""
    expected = {key for p in plan for key in p.keys}
    tied_head = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    missing = sorted(expected - tensors.keys())
    if missing:
        shown = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8 else "")
        raise CheckpointError(f"{directory}: missing tensor(s) for {arch.name}: {shown}")
    unexpected = sorted(k for k in tensors.keys() - expected - tied_head if not arch.is_ignored(k))
    if unexpected:
        file = tensors[unexpected[0]][0]
        raise CheckpointError(f"{file}: unexpected tensor(s) for {arch.name}: {', '.join(unexpected[:8])}")
    dtypes = {}
    for p in plan:
        want = p.checkpoint_shape
        for key in p.keys:
            file, handle, stored = tensors[key]
            view = handle.get_slice(stored)
            shape, dtype = tuple(view.get_shape()), view.get_dtype()
            if shape != want:
                raise CheckpointError(f"{file}: tensor {key} has shape {shape}, expected {want} from config.json")
            if dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{file}: tensor {key} has dtype {dtype}, expected a float type")
            dtypes[dtype] = dtypes.get(dtype, 0) + 1
    # A checkpoint of one dtype keeps it; a mixed one is read as float32, which loses nothing; a
    # float64 one as float32 too (JAX computes in float32 unless x64 is enabled, which jaxmerge is not).
    if len(dtypes) == 1 and next(iter(dtypes)) != "F64":
        return SAFETENSORS_DTYPES[next(iter(dtypes))]
    return np.dtype(np.float32)


def transpose(matrix: np.ndarray, rows_per_block: int = 16) -> np.ndarray:
    """matrix.T as a contiguous array, copied by blocks of rows: several times faster than
    numpy's (or XLA's CPU) strided transpose for the large kernels of a 7B model."""
    raw = matrix.view(f"u{matrix.itemsize}")  # bit copies, whatever the float type
    out = np.empty(raw.shape[::-1], raw.dtype)
    for row in range(0, raw.shape[0], rows_per_block):
        out[:, row : row + rows_per_block] = raw[row : row + rows_per_block].T
    return out.view(matrix.dtype)


@functools.partial(jax.jit, donate_argnums=0)
def _set_layer(stacked: jax.Array, index: jax.Array, tensor: jax.Array) -> jax.Array:
    return jax.lax.dynamic_update_index_in_dim(stacked, tensor.astype(stacked.dtype), index, axis=0)


def _read_param(p: ParamPlan, tensors, dtype: np.dtype) -> jax.Array:
    """One parameter onto the device, cast there. A stacked parameter is written layer by
    layer into a donated device buffer, so host memory holds one layer's tensor at a time
    besides the model."""
    def read(key):
        _, handle, stored = tensors[key]
        tensor = handle.get_tensor(stored)
        return jax.device_put(transpose(tensor) if p.transposed else tensor)

    if not p.stacked:
        return read(p.keys[0]).astype(dtype)
    stacked = jnp.zeros(p.shape, dtype)  # [L, ...]
    for i, key in enumerate(p.keys):
        # Wait for each layer: async dispatch would otherwise queue every layer's host
        # tensor at once.
        stacked = _set_layer(stacked, i, read(key)).block_until_ready()
    return stacked


def _finite_flags(params: list[jax.Array], stacked: tuple[bool, ...]) -> list[jax.Array]:
    """Per parameter, whether each of its checkpoint tensors is all finite: [L] (per layer)
    if stacked, else [1]. Jitted as one program for the whole model: one compilation, and
    one reduction per parameter on the device (no host pass). Each element tested, not
    inferred from a reduction that NaN should propagate through (XLA-CPU's max skips NaN,
    #24): the rows' max of the uint8 non-finite mask, which compiles as fast as a sum
    (all(isfinite(x)) compiles slower: it would double a small model's first load)."""
    def row_finite(x, stacked):
        rows = x.reshape(x.shape[0] if stacked else 1, -1)
        return jnp.max((~jnp.isfinite(rows)).astype(jnp.uint8), axis=1) == 0
    return [row_finite(x, s) for x, s in zip(params, stacked, strict=True)]


def _check_finite(plan: list[ParamPlan], params: list[jax.Array], tensors, dtype: np.dtype, sharding) -> None:
    """Raises, naming the file and tensor, if a parameter as read (and cast to `dtype`) holds
    NaN or Inf: merged with others, it would spread into the outputs silently."""
    stacked = tuple(p.stacked for p in plan)
    if sharding is None:
        flags = jax.jit(_finite_flags, static_argnums=1)(params, stacked)
    else:  # replicated flags: every process reads them, and all raise alike
        replicated = jax.sharding.NamedSharding(sharding, jax.sharding.PartitionSpec())
        flags = jax.jit(_finite_flags, static_argnums=1, out_shardings=replicated)(params, stacked)
    for p, ok in zip(plan, jax.device_get(flags), strict=True):
        for key, key_ok in zip(p.keys, ok, strict=True):
            if key_ok:
                continue
            file, handle, stored = tensors[key]
            tensor = handle.get_tensor(stored)  # read again, once, to say what is wrong
            nan, inf = int(np.isnan(tensor).sum()), int(np.isinf(tensor).sum())
            if nan or inf:
                raise CheckpointError(f"{file}: tensor {stored} holds {nan} NaN and {inf} Inf among its "
                                      f"{tensor.size} values (pass allow_non_finite=True to load it anyway)")
            raise CheckpointError(f"{file}: tensor {stored} overflows {dtype_name(dtype)}: values beyond its range "
                                  "become Inf (load it in a wider dtype, or pass allow_non_finite=True)")


def _read_sharded(p: ParamPlan, tensors, dtype: np.dtype, sharding) -> jax.Array:
    """One parameter as a global array with `sharding`: each process reads from disk only
    the slices its own devices hold (safetensors slices; several hosts, no full copies)."""
    def read(index):
        index = tuple(index) + (slice(None),) * (len(p.shape) - len(index))
        layers = range(p.shape[0])[index[0]] if p.stacked else [None]
        inner = index[1:] if p.stacked else index
        parts = []
        for layer in layers:
            _, handle, stored = tensors[p.keys[layer if p.stacked else 0]]
            view = handle.get_slice(stored)
            part = view[tuple(inner[::-1])] if p.transposed else view[tuple(inner)]
            parts.append(np.ascontiguousarray(part.T if p.transposed else part).astype(dtype))
        return np.stack(parts) if p.stacked else parts[0]
    return jax.make_array_from_callback(p.shape, sharding, read)


def model_config(path):
    """A checkpoint directory's model config (what `load(path).config` is), from config.json
    (its sizes checked against the safetensors headers, if any): no weights read, nothing computed."""
    directory = resolve_model(path)
    hf = read_config(directory)
    source = str(directory / "config.json")
    arch = architecture_of(hf, source)
    check_claimed_sizes(arch, hf, directory)
    return arch.parse_config(hf, source)


def load(path, dtype=None, sharding=None, *, allow_non_finite: bool = False) -> nnx.Module:
    """Loads a Hugging Face model directory (or Hub reference `org/name[@revision]`:
    `jaxmerge.hub.resolve_model`) as a Flax model.

    dtype: None keeps the checkpoint's; or "float32", "bfloat16", "float16", or a jnp dtype.
    sharding: None (the default device), or a jax.sharding.Mesh with a "model" axis
    (`jaxmerge.parallel`): every parameter sharded over it as the search shards it, each
    process reading only its devices' slices from disk.
    allow_non_finite: load tensors holding NaN or Inf (or overflowing `dtype`); by default
    they are refused with a CheckpointError naming the file and tensor.
    The model is callable (`model(input_ids)` -> logits); `nnx.split(model)` gives its
    parameter pytree, layers stacked on a leading axis.
    """
    target_dtype = resolve_dtype(dtype)
    if sharding is not None and (not isinstance(sharding, jax.sharding.Mesh) or MODEL not in sharding.axis_names):
        raise ValueError(f"sharding must be None or a jax.sharding.Mesh with a {MODEL!r} axis, got {sharding!r}")
    if not isinstance(allow_non_finite, bool):
        raise ValueError(f"allow_non_finite must be True or False, got {allow_non_finite!r}")
    directory = resolve_model(path)
    hf = read_config(directory)
    source = str(directory / "config.json")
    arch = architecture_of(hf, source)
    check_claimed_sizes(arch, hf, directory)
    config = arch.parse_config(hf, source)
    abstract = nnx.eval_shape(lambda: arch.build(config, dtype=jnp.float32, rngs=nnx.Rngs(0)))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)  # weights; other state (a path's hops)
    plan = parameter_plan(arch, config, state)
    with contextlib.ExitStack() as stack:
        tensors = open_tensors(weight_files(directory), stack, arch.canonical_key)
        checkpoint_dtype = check_tensors(plan, tensors, arch, config, directory)
        dtype = target_dtype or checkpoint_dtype
        values: dict = {}
        params = []
        for p in plan:
            node = values
            for part in p.path[:-1]:
                node = node.setdefault(part, {})
            if sharding is None:
                node[p.path[-1]] = _read_param(p, tensors, dtype)
            else:
                spec = model_spec(p.shape, sharding.shape[MODEL])
                node[p.path[-1]] = _read_sharded(p, tensors, dtype, jax.sharding.NamedSharding(sharding, spec))
            params.append(node[p.path[-1]])
        if not allow_non_finite:
            _check_finite(plan, params, tensors, dtype, sharding)
    nnx.replace_by_pure_dict(state, values)
    if arch.extra_state is not None:
        nnx.replace_by_pure_dict(rest, arch.extra_state(config))
    model = nnx.merge(graphdef, state, rest)
    model.origin = Origin(arch.name, json.dumps(hf), str(directory.resolve()))
    return model


def companion_files(directory: Path, *, contained: bool = True) -> dict[str, Path]:
    """The companion files (COMPANION_FILES) of a model directory, checked: each a regular file,
    the JSON ones valid JSON objects; with `contained` (for copying), inside the directory or a
    link to a file there (or, in a Hugging Face cache snapshot, `snapshots/REV/NAME`, to the
    repository's `blobs/`), never one elsewhere (a link to a private file would put it in the
    output). Raises, naming the file; returns each one's name and resolved path (what is copied)."""
    root = directory.resolve()
    within = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
    found = {}
    for name in COMPANION_FILES:
        path = directory / name
        if not path.exists() and not path.is_symlink():
            continue
        check_no_symlink_loop(path)
        target = path.resolve()
        if contained and not any(target.is_relative_to(d) for d in within):
            raise CheckpointError(f"{path}: a link to {target}, outside the model directory: not copied (put the "
                                  "file itself in the directory)")
        if not target.is_file():
            raise CheckpointError(f"{path}: " + ("not a regular file" if target.exists() else
                                                 f"a link to {target}, which does not exist"))
        if name.endswith(".json"):
            try:
                content = json.loads(target.read_text(encoding="utf-8"))
            except (ValueError, OSError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                raise CheckpointError(f"{path}: not valid JSON ({describe_error(e)})") from None
            if not isinstance(content, dict):
                raise CheckpointError(f"{path}: expected a JSON object")
        found[name] = target
    return found


def load_tokenizer(directory):
    """The model directory's transformers tokenizer; an error names the file at fault (a
    malformed tokenizer.json) or the directory."""
    from transformers import AutoTokenizer

    directory = resolve_model(directory)
    companion_files(directory, contained=False)  # JSON files that do not parse, by name
    try:
        return AutoTokenizer.from_pretrained(directory)
    except Exception as e:  # transformers' and tokenizers' errors: OSError, ValueError, plain Exception
        raise CheckpointError(f"{directory}: cannot load its tokenizer ({' '.join(str(e).split())})") from None


def describe_error(error: BaseException) -> str:
    """An error for a one-line message: an OSError's reason and file, else its text."""
    if isinstance(error, OSError) and error.strerror:
        return f"{error.strerror}: {error.filename}" if error.filename else error.strerror
    return str(error)
