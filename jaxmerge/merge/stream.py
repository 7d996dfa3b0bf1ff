"""Disk-to-disk merging (`jaxmerge merge`): tensor by tensor, in the checkpoint's own layout.

A merge that never runs the model needs no Flax layout: each output tensor is computed
from the inputs' tensors of the same name as stored ([out, in] weights, no transposes),
with the same per-tensor method math the search uses (`merge.methods`), and written at
its place in the output's safetensors shards as soon as it is done. Memory holds a few
tensors, not the models. Reading the next tensors (threads), merging the current one
(XLA, asynchronously dispatched) and writing the previous one overlap.

One jitted program per distinct tensor size does everything a tensor needs in one pass:
the inputs' casts (to the dtype each model is read in, then to the merge dtype), the
checks that nothing became NaN/Inf, the merge in float32, and the cast to the output
dtype. Elementwise methods see tensors flattened, so every tensor of one size (q_proj and
o_proj, gate/up/down) shares a compilation; DELLA, whose ranks run along rows, keeps shapes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.checkpoint import INDEX_NAME, SAFETENSORS_DTYPES, WEIGHTS_NAME, natural_key
from jaxmerge.merge.methods import Options

Array = jax.Array
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


@dataclasses.dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its inputs come from and how they merge."""

    key: str  # the output's checkpoint key
    path: str  # the parameter's path in the Flax model ("layers.mlp.up_proj.kernel"), for vocabulary rows
    base: tuple[str, str] | None  # (model, checkpoint key) of the base tensor, if the method has one
    sources: tuple[tuple[str, str], ...]  # (model, checkpoint key) per merged input
    params: dict  # per-source [K] and merge-wide [] float32 values
    key_data: tuple[int, ...] | None  # what the PRNG key of this tensor is folded from (random methods)
    shape: tuple[int, ...]  # the output's shape (checkpoint layout)
    options: Options  # the method's static switches (normalize, rescale) for this tensor's slice


@dataclasses.dataclass(frozen=True)
class Flags:
    """Which inputs (base first) and outputs a program found at fault."""

    read_non_finite: np.ndarray  # [K+1] NaN/Inf in an input as read
    cast_overflow: np.ndarray  # [K+1] finite values that became Inf in the merge dtype
    merged_non_finite: bool  # NaN/Inf in the merge's result (inputs finite)
    out_overflow: bool  # finite results that became Inf in the output dtype


def _non_finite(x: Array) -> Array:
    return ~jnp.isfinite(jnp.sum(x - x, dtype=jnp.float32))  # x - x is NaN exactly where x is not finite


@functools.partial(jax.jit, static_argnames=("method", "options", "read_dtypes", "merge_dtype", "out_dtype",
                                              "shape", "flat"))
def _merge_program(inputs, params, key, *, method, options, read_dtypes, merge_dtype, out_dtype, shape, flat):
    """inputs: the base (if any) then the sources, as stored. Returns the output tensor and flags."""
    read = [x.astype(d) for x, d in zip(inputs, read_dtypes)]
    read_bad = jnp.stack([_non_finite(x) for x in read])
    merged_in = [x.astype(merge_dtype) for x in read]
    overflow = jnp.stack([_non_finite(m) & ~_non_finite(x) for x, m in zip(read, merged_in)])
    if not flat:
        merged_in = [x.reshape(shape) for x in merged_in]
    has_base = method.base == "required"
    base = merged_in[0] if has_base else None
    sources = jnp.stack(merged_in[1:] if has_base else merged_in)
    stats = method.prepare(base, sources, row_axis=-1) if method.stats_required else None
    merged = method.merge(base, sources, params, stats, key, options)  # float32 math, cast to merge_dtype
    out = merged.astype(out_dtype)
    return out, (read_bad, overflow, _non_finite(merged), _non_finite(out) & ~_non_finite(merged))


class ShardWriter:
    """Writes safetensors shards whose layout is fixed up front: every tensor's name, dtype
    and shape is known before the merge starts, so each tensor is written at its offset as
    soon as it is computed, in any order, and never held with the others."""

    def __init__(self, directory: Path, specs: list[tuple[str, np.dtype, tuple[int, ...]]], shard_size: int):
        specs = sorted(specs, key=lambda spec: natural_key(spec[0]))
        shards: list[list] = [[]]
        size = 0
        for spec in specs:
            nbytes = int(np.prod(spec[2], dtype=np.int64)) * spec[1].itemsize
            if shards[-1] and size + nbytes > shard_size:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += nbytes
        names = ([WEIGHTS_NAME] if len(shards) == 1
                 else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
        self.where: dict[str, tuple[int, int, np.dtype, tuple]] = {}  # key -> (fd, offset, dtype, shape)
        self.fds = []
        weight_map, total = {}, 0
        for name, shard in zip(names, shards):
            header: dict = {"__metadata__": {"format": "pt"}}
            offset = 0
            for key, dtype, shape in shard:
                nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
                header[key] = {"dtype": _SAFETENSORS_NAMES[dtype], "shape": list(shape),
                               "data_offsets": [offset, offset + nbytes]}
                offset += nbytes
            text = json.dumps(header, separators=(",", ":")).encode()
            text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
            fd = os.open(directory / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
            self.fds.append(fd)
            os.pwrite(fd, len(text).to_bytes(8, "little") + text, 0)
            os.ftruncate(fd, 8 + len(text) + offset)
            start = 8 + len(text)
            for key, dtype, shape in shard:
                self.where[key] = (fd, start + header[key]["data_offsets"][0], dtype, shape)
                weight_map[key] = name
            total += offset
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (directory / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")

    def write(self, key: str, tensor: np.ndarray) -> None:
        fd, offset, dtype, shape = self.where[key]
        data = np.ascontiguousarray(tensor, dtype=dtype).reshape(shape)
        view = memoryview(data.view(np.uint8).reshape(-1))
        while view:  # pwrite may write less than asked
            written = os.pwrite(fd, view, offset)
            view, offset = view[written:], offset + written

    def close(self) -> None:
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []


@dataclasses.dataclass
class Models:
    """The input checkpoints: tensors by (model, key), each model's read dtype, vocabulary rows."""

    tensors: dict  # model -> {checkpoint key: (file, safetensors handle, stored key)}
    read_dtypes: dict  # model -> np.dtype the model is read in (its checkpoint's, or the merge's)
    rows: dict | None  # tokenizer_source: model -> output-vocabulary row index per token (-1: absent)
    vocab_tables: dict  # vocabulary path -> {model: aligned table} (built on first use)
    base: str | None  # the recipe's base model (vocabulary rows fall back to it)

    def read(self, model: str, key: str) -> np.ndarray:
        _, handle, stored = self.tensors[model][key]
        return handle.get_tensor(stored)

    def file_of(self, model: str, key: str) -> str:
        return str(self.tensors[model][key][0])


def vocabulary_rows(models: Models, path: str, key_of: dict[str, str], out_rows: int,
                    base: tuple[str, str] | None) -> dict[str, np.ndarray]:
    """Every model's token-indexed tensor (rows first, checkpoint layout) with out_rows rows:
    re-ordered to the output vocabulary (tokenizer_source), else cut to the base's rows or
    filled from the base (a zero task vector), as `merge.tree` does in memory."""
    from jaxmerge.merge.vocab import align_tables

    if models.rows is not None:
        if path not in models.vocab_tables:
            tables = {m: models.read(m, k).astype(np.float32) for m, k in key_of.items()}
            models.vocab_tables[path] = align_tables(tables, {m: models.rows[m] for m in key_of}, models.base)
        return models.vocab_tables[path]
    out = {}
    base_table = None if base is None else models.read(*base)
    for m, k in key_of.items():
        table = models.read(m, k)
        if table.shape[0] != out_rows:
            if table.shape[0] > out_rows or base_table is None:
                table = table[:out_rows]
            else:
                table = np.concatenate([table, base_table[table.shape[0]:].astype(table.dtype)])
        out[m] = table
    return out


def run_jobs(jobs: list[TensorJob], models: Models, writer: ShardWriter, *, method, merge_dtype: np.dtype,
             out_dtype: np.dtype, seed_key: Array | None, vocab_paths: set[str], allow_non_finite: bool,
             errors, progress) -> None:
    """Reads, merges and writes every job; `errors` builds the exceptions raised for bad
    tensors (the caller words them: the recipe's or a checkpoint's fault)."""
    flat = not method.stats_required  # DELLA ranks within rows; every other method is elementwise

    def read(job: TensorJob):
        members = ([job.base] if job.base else []) + list(job.sources)
        if job.path in vocab_paths:
            tables = vocabulary_rows(models, job.path, dict(members), job.shape[0], job.base)
            arrays = [tables[m] for m, _ in members]
        else:
            arrays = [models.read(m, k) for m, k in members]
        for (m, k), a in zip(members, arrays):
            if tuple(a.shape) != job.shape:
                raise errors.shape(job, m, k, a.shape)
        return members, [a.reshape(-1) if flat else a for a in arrays]

    def compute(job: TensorJob, members, arrays):
        read_dtypes = tuple(np.dtype(models.read_dtypes[m]) for m, _ in members)
        key = None
        if seed_key is not None:
            key = seed_key
            for part in job.key_data:
                key = jax.random.fold_in(key, part)
        return _merge_program(arrays, job.params, key, method=method, options=job.options, read_dtypes=read_dtypes,
                              merge_dtype=np.dtype(merge_dtype), out_dtype=np.dtype(out_dtype),
                              shape=None if flat else job.shape, flat=flat)

    def finish(job: TensorJob, members, out, flags) -> None:
        read_bad, overflow, merged_bad, out_overflow = (np.asarray(f) for f in flags)
        if not allow_non_finite:
            for (m, k), bad in zip(members, read_bad):
                if bad:
                    raise errors.non_finite_input(m, k, models)
        for (m, k), bad in zip(members, overflow):
            if bad:
                raise errors.overflow_input(m, k)
        if merged_bad and not allow_non_finite and not read_bad.any():
            raise errors.non_finite_merge(job)
        if out_overflow:
            raise errors.overflow_output(job)
        writer.write(job.key, np.asarray(out))

    with concurrent.futures.ThreadPoolExecutor(2) as readers, concurrent.futures.ThreadPoolExecutor(1) as writers:
        ahead = collections.deque(readers.submit(read, job) for job in jobs[:2])
        pending: collections.deque = collections.deque()
        for i, job in enumerate(jobs):
            members, arrays = ahead.popleft().result()
            if i + 2 < len(jobs):
                ahead.append(readers.submit(read, jobs[i + 2]))
            out, flags = compute(job, members, arrays)
            pending.append(writers.submit(finish, job, members, out, flags))
            while len(pending) > 2:  # a bounded queue: memory holds a few tensors
                pending.popleft().result()
                progress(1)
        while pending:
            pending.popleft().result()
            progress(1)
