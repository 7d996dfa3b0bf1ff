"""Flax models written as Hugging Face checkpoint directories (config.json + safetensors, the
tokenizer and generation files beside them), which transformers opens.

`save` writes atomically: into a temporary directory beside the target, renamed into place
only when complete (`jaxmerge.outputs`). `jaxmerge.checkpoint` reads them back.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from jaxmerge.architectures import Architecture, architecture_by_name
from jaxmerge.checkpoint import INDEX_NAME, WEIGHTS_NAME, Origin, companion_files, dtype_name, resolve_dtype, transpose
from jaxmerge.errors import CheckpointError
from jaxmerge.outputs import check_output_dir, staged_output


def parse_size(size) -> int:
    """Bytes (more than 0) from an int or a string such as "5GB", "500MB", "2GiB"."""
    if isinstance(size, int) and not isinstance(size, bool):
        number = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*(?:([KMGT])(i?))?B?\s*", str(size), re.IGNORECASE)
        if not match:
            raise ValueError(f"cannot read shard size {size!r} (examples: 5GB, 500MB)")
        digits, unit, binary = match.groups()
        number = int(float(digits) * (1024 if binary else 1000) ** " KMGT".index((unit or " ").upper()))
    if number <= 0:
        raise ValueError(f"shard size {size!r}: must be at least one byte")
    return number


def _check_cast(model: nnx.Module, arch: Architecture, dtype: np.dtype, out: Path) -> None:
    """Raises, naming the tensor, if casting to `dtype` turns a finite value into inf (float32
    or bfloat16 weights beyond float16's 65504): the written model would be broken."""
    _, state, _ = nnx.split(model, nnx.Param, ...)
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
        if np.dtype(leaf.dtype) == dtype:
            continue
        path = tuple(str(k.key) for k in keypath)
        stacked = "layers" in path
        overflows = _host_array(_overflows(leaf, dtype, stacked))
        if overflows.any():
            key = arch.checkpoint_keys(path, leaf.shape[0] if stacked else None)[int(np.argmax(overflows))]
            raise CheckpointError(f"{out}: tensor {key} overflows {dtype_name(dtype)} (values beyond "
                                  f"{float(ml_dtypes.finfo(dtype).max):g} would become inf); write a wider dtype")


@functools.partial(jax.jit, static_argnums=(1, 2))
def _overflows(x: jax.Array, dtype: np.dtype, stacked: bool) -> jax.Array:
    """Whether a finite entry becomes inf in `dtype`: per layer if stacked, else one flag."""
    overflow = jnp.isfinite(x) & ~jnp.isfinite(x.astype(dtype))
    return overflow.reshape(x.shape[0], -1).any(axis=1) if stacked else overflow.any()[None]


def _tensors_to_write(model: nnx.Module, arch: Architecture, dtype: np.dtype | None):
    """(checkpoint key, numpy tensor getter, nbytes) in checkpoint order."""
    _, state, _ = nnx.split(model, nnx.Param, ...)
    items = []
    for keypath, leaf in jax.tree_util.tree_flatten_with_path(nnx.to_pure_dict(state))[0]:
        path = tuple(str(k.key) for k in keypath)
        stacked = "layers" in path
        keys = arch.checkpoint_keys(path, leaf.shape[0] if stacked else None)
        out_dtype = dtype or np.dtype(leaf.dtype)
        nbytes = int(np.prod(leaf.shape[1:] if stacked else leaf.shape)) * out_dtype.itemsize
        transposed = arch.is_transposed(path)
        collective = isinstance(leaf, jax.Array) and not leaf.is_fully_addressable
        for i, key in enumerate(keys):
            def get(leaf=leaf, i=i if stacked else None, transposed=transposed):
                tensor = _host_array(leaf if i is None else leaf[i])
                return transpose(tensor) if transposed else tensor
            items.append((key, get, out_dtype, nbytes, collective))
    return sorted(items, key=lambda item: natural_key(item[0]))


def _host_array(x) -> np.ndarray:
    """The whole of `x` as numpy. An array sharded across processes is gathered from all
    of them: a collective, so every process calls this for it, in the same order."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


def natural_key(key: str):
    """Orders checkpoint keys by their numbers: layer 2 before layer 10."""
    return [int(part) if part.isdigit() else part for part in key.split(".")]


def _write_weights(items, directory: Path, shard_size: int) -> None:
    shards: list[list] = [[]]
    size = 0
    for item in items:
        if shards[-1] and size + item[3] > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[3]
    names = (
        [WEIGHTS_NAME] if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        arrays = {key: np.ascontiguousarray(get(), dtype=dtype) for key, get, dtype, *_ in shard}
        save_file(arrays, str(directory / name), metadata={"format": "pt"})
        weight_map.update({key: name for key in arrays})
        del arrays
    if len(shards) > 1:
        total = sum(item[3] for item in items)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def output_config(arch: Architecture, config, origin: Origin | None, dtype: np.dtype) -> dict:
    """config.json of a model written as `arch`: the source's fields (token ids, generation
    settings), the config's own, and the dtype written."""
    hf = json.loads(origin.config_json) if origin else {}
    for name, value in arch.to_hf_config(config).items():  # nested configs keep their other fields
        hf[name] = {**hf[name], **value} if isinstance(value, dict) and isinstance(hf.get(name), dict) else value
    hf["dtype"] = dtype_name(dtype)
    if "torch_dtype" in hf:
        hf["torch_dtype"] = hf["dtype"]
    return hf


def _companion_source(origin: Origin | None, tokenizer_dir) -> Path | None:
    """The directory whose tokenizer and generation files `save` copies."""
    if tokenizer_dir:
        return Path(tokenizer_dir)
    return Path(origin.directory) if origin and origin.directory else None


def write_companion_files(directory: Path, arch: Architecture, hf: dict, origin: Origin | None, *,
                          tokenizer_dir=None, tokenizer=None, extra_files: dict[str, str] | None = None) -> None:
    """Everything of a model directory but the weights: config.json, the tokenizer and
    generation files (written from `tokenizer`, else copied from `tokenizer_dir` or the
    source's directory: `companion_files`), the architecture's modeling code, and `extra_files`."""
    (directory / "config.json").write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n")
    source = _companion_source(origin, tokenizer_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    elif source and source.is_dir():
        for name, target in companion_files(source).items():
            shutil.copy2(target, directory / name)
    for name in arch.code_files:
        shutil.copy2(Path(__file__).parent / "models" / name, directory / name)
    for name, text in (extra_files or {}).items():
        (directory / name).write_text(text)


def save(
    model: nnx.Module,
    out_dir,
    *,
    shard_size="5GB",
    dtype=None,
    overwrite: bool = False,
    architecture: str | None = None,
    tokenizer_dir=None,
    tokenizer=None,
    inputs=(),
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Writes `model` as a Hugging Face checkpoint directory that transformers opens.

    config.json comes from the model's source (dtype, vocab size and layer count updated)
    or, for a model built in code, from its config and `architecture`. Tokenizer and
    generation files are copied from `tokenizer_dir` or the model's source directory;
    `tokenizer` (a transformers tokenizer) is written instead, if given.
    The output must not be, hold or lie inside an input (the model's own source,
    `tokenizer_dir`, any of `inputs`: directories or files such as a recipe), and must be
    empty unless `overwrite`, which replaces only a previous model output (see
    `check_output_dir`). A symlink is followed: its target is written. `extra_files` maps
    file names to text written beside the weights (a merge recipe).

    Everything is checked before anything is written (a cast to `dtype` that would overflow
    to inf is refused, naming the tensor). The checkpoint is written into
    `.OUT.jaxmerge-HOST-PID-RANDOM.tmp` beside OUT and renamed into place when complete; on
    an error, Ctrl-C or SIGTERM it is removed, and a killed save's leftovers are removed by
    the next save to OUT. Directories are created 0777 less the umask, as transformers does.
    """
    out = Path(out_dir)
    for name in extra_files or {}:
        if Path(name).name != name or name in ("", ".", ".."):
            raise ValueError(f"save: extra file name {name!r} is not a plain file name")
    origin: Origin | None = getattr(model, "origin", None)
    arch = architecture_by_name(architecture or (origin.architecture if origin else "")) \
        if (architecture or origin) else None
    if arch is None:
        raise ValueError("save: the model has no origin; pass architecture= (e.g. 'MistralForCausalLM')")
    protected = [Path(p) for p in inputs] + ([Path(origin.directory)] if origin and origin.directory else []) \
        + ([Path(tokenizer_dir)] if tokenizer_dir else [])
    check_output_dir(out, protected, overwrite)
    source = _companion_source(origin, tokenizer_dir)
    if tokenizer is None and source is not None and source.is_dir():
        companion_files(source)  # a link out of the directory, malformed JSON: refused before anything is written
    size = parse_size(shard_size)
    dtype = resolve_dtype(dtype)
    if jax.process_count() > 1:  # every process checks the output before process 0 writes it
        multihost_utils.sync_global_devices(f"jaxmerge.save checked {out}")
    if dtype is not None:
        _check_cast(model, arch, dtype, out)  # on every process: a collective for arrays across processes
    items = _tensors_to_write(model, arch, dtype)

    hf = output_config(arch, model.config, origin, dtype or np.dtype(model.dtype))

    if jax.process_count() > 1 and jax.process_index() != 0:
        # Multi-host: process 0 writes; the others take part in gathering the arrays sharded
        # across processes (in the order process 0 reads them) and write nothing.
        for _, get, _, _, collective in items:
            if collective:
                get()
        multihost_utils.sync_global_devices(f"jaxmerge.save {out}")
        return out
    with staged_output(out, overwrite) as tmp:
        _write_weights(items, tmp, size)
        write_companion_files(tmp, arch, hf, origin, tokenizer_dir=tokenizer_dir, tokenizer=tokenizer,
                              extra_files=extra_files)
        check_output_dir(out, protected, overwrite)  # again: a long save gives others time to write there
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxmerge.save {out}")  # written when save returns anywhere
    return out
