"""Disk-to-disk merging (`jaxmerge merge`): tensor by tensor, in the checkpoint's own layout.

A merge that never runs the model needs no Flax layout: each output tensor is computed
from the inputs' tensors of the same name as stored ([out, in] weights, no transposes),
with the same per-tensor method math the search uses (`merge.methods`), and written at
its place in the output's safetensors shards as soon as it is done. Memory holds a few
tensors, not the models. Reading the next tensors (threads), merging the current one
(XLA, asynchronously dispatched) and writing the previous one overlap. Tensors go in the
output's file order, read into reused buffers (`BufferPool`), and written in large requests
whose disk writes begin at once (`ShardWriter`), so that the fsync at the end has little left.

One jitted program per distinct tensor size does everything a tensor needs in one pass:
the inputs' casts (to the dtype each model is read in, then to the merge dtype), the
checks that nothing became NaN/Inf, the merge, and the cast to the output dtype. The merge
computes as mergekit does in the merge dtype (`compute_dtype`: each step rounded to it, the
entries it keeps counted from the recipe's float64 values), or in float32 with one rounding
at the end (compute_dtype None); entries tied at a selection's cut are kept in flat order,
or as torch's CPU sort keeps them (`ties`, see `methods._window_mask`). Elementwise
methods see tensors flattened, so every tensor of one size (q_proj and o_proj,
gate/up/down) shares a compilation; DELLA, whose ranks run along rows, keeps shapes.
"""

from __future__ import annotations

import collections
import concurrent.futures
import ctypes
import dataclasses
import functools
import json
import math
import os
import sys
import threading
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxmerge.checkpoint import INDEX_NAME, SAFETENSORS_DTYPES, WEIGHTS_NAME, dtype_name
from jaxmerge.errors import CheckpointError
from jaxmerge.merge.methods import exact_counts, prepare_stats
from jaxmerge.merge.plan import MergePlan, RecipeError
from jaxmerge.saving import natural_key

Array = jax.Array
_SAFETENSORS_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
WRITE_CHUNK = 32 << 20  # bytes per write request, and per window of early writeback


def _sync_file_range():
    """Linux's sync_file_range (os has no wrapper), or None elsewhere."""
    if sys.platform != "linux":
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return function


_SYNC_FILE_RANGE = _sync_file_range()
_START_WRITEBACK, _AWAIT_WRITEBACK = 2, 1 | 2 | 4  # SYNC_FILE_RANGE_WRITE; WAIT_BEFORE | WRITE | WAIT_AFTER


@dataclasses.dataclass(frozen=True)
class TensorJob:
    """One output tensor: where its inputs come from (how they merge: its `MergePlan`)."""

    key: str  # the output's checkpoint key
    path: str  # the parameter's path in the Flax model ("layers.mlp.up_proj.kernel"), for vocabulary rows
    base: tuple[str, str] | None  # (model, checkpoint key) of the base tensor, if the method has one
    sources: tuple[tuple[str, str], ...]  # (model, checkpoint key) per merged input
    key_data: tuple[int, ...] | None  # what the PRNG key of this tensor is folded from (random methods)
    shape: tuple[int, ...]  # the output's shape (checkpoint layout)


@dataclasses.dataclass(frozen=True)
class Flags:
    """Which inputs (base first) and outputs a program found at fault."""

    read_non_finite: np.ndarray  # [K+1] NaN/Inf in an input as read
    cast_overflow: np.ndarray  # [K+1] finite values that became Inf in the merge dtype
    merged_non_finite: bool  # NaN/Inf in the merge's result (inputs finite)
    out_overflow: bool  # finite results that became Inf in the output dtype


def _non_finite(x: Array) -> Array:
    """Whether x holds a NaN or an inf, tested element by element. Not from x's max and min:
    XLA-CPU's float reductions (YNNPACK's, from 4096 values on) skip NaN (#24). The mask is
    written out (a byte per value: XLA-CPU fuses no comparison into a reduction) and reduced
    by its uint8 max, exact at any count (a uint8 sum wraps at 256; an int32 count writes four
    bytes per value, jnp.any runs a slower reduction)."""
    return jnp.max((~jnp.isfinite(x)).astype(jnp.uint8)) > 0


def _overflows(x: Array, dtype) -> Array:
    """Whether a finite value of x becomes inf in `dtype` (never where dtype's range holds x's)."""
    if jnp.finfo(dtype).max >= jnp.finfo(x.dtype).max:
        return jnp.bool_(False)
    return _non_finite(jnp.where(jnp.isfinite(x), x.astype(dtype), 0))


@functools.partial(jax.jit, static_argnames=("method", "options", "read_dtypes", "merge_dtype", "out_dtype",
                                              "shape", "flat"))
def _merge_program(base, sources, params, key, *, method, options, read_dtypes, merge_dtype, out_dtype, shape, flat):
    """base (or None) and the sources stacked [K, ...], as stored (the sources in one dtype:
    their checkpoints', or its exact promotion); read_dtypes: the base's (if any), then each
    source's. Returns the output tensor and flags (base first)."""
    source_dtypes = read_dtypes[len(read_dtypes) - sources.shape[0]:]
    read = [x.astype(d) for x, d in zip(sources, source_dtypes, strict=True)]  # each input as read, base first
    read = read if base is None else [base.astype(read_dtypes[0])] + read
    read_bad = jnp.stack([_non_finite(x) for x in read])
    overflow = jnp.stack([_overflows(x, merge_dtype) for x in read])
    if len(set(source_dtypes)) == 1:  # one elementwise cast of the stack (a stack built here is written out)
        sources = sources.astype(source_dtypes[0]).astype(merge_dtype)
    else:
        sources = jnp.stack([x.astype(d).astype(merge_dtype) for x, d in zip(sources, source_dtypes, strict=True)])
    if base is not None:
        base = base.astype(read_dtypes[0]).astype(merge_dtype)
    if not flat:
        base = None if base is None else base.reshape(shape)
        sources = sources.reshape((sources.shape[0],) + shape)
    stats = prepare_stats(method, base, sources, row_axis=-1, options=options) if method.stats_required else None
    merged = method.merge(base, sources, params, stats, key, options)  # in merge_dtype
    return merged.astype(out_dtype), (read_bad, overflow, _non_finite(merged), _overflows(merged, out_dtype))


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
        for name, shard in zip(names, shards, strict=True):
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
        self.unsynced: dict[int, tuple[int, int]] = {}  # fd -> the extent written since its writeback began
        self.in_writeback: collections.deque = collections.deque()  # (fd, start, end) of windows written back

    def position(self, key: str) -> tuple[int, int]:
        """Where `key` lies among the shards' bytes: written in this order, the files grow front to back."""
        fd, offset, _, _ = self.where[key]
        return self.fds.index(fd), offset

    def write(self, key: str, tensor: np.ndarray) -> None:
        fd, offset, dtype, shape = self.where[key]
        data = np.ascontiguousarray(tensor, dtype=dtype).reshape(shape)
        view = memoryview(data.view(np.uint8).reshape(-1))
        while view:  # pwrite may write less than asked
            written = os.pwrite(fd, view[:WRITE_CHUNK], offset)
            self._written(fd, offset, offset + written)
            view, offset = view[written:], offset + written

    def _written(self, fd: int, start: int, end: int) -> None:
        """Begins the disk writes of each WRITE_CHUNK of dirty pages as it fills (Linux), and
        waits for the window two before, so that the fsync at the end finds little left to write
        and dirty pages never pile up to the kernel's throttling limit."""
        if _SYNC_FILE_RANGE is None:
            return
        low, high = self.unsynced.get(fd, (start, end))
        low, high = min(low, start), max(high, end)
        if high - low < WRITE_CHUNK:
            self.unsynced[fd] = (low, high)
            return
        self.unsynced.pop(fd, None)
        _SYNC_FILE_RANGE(fd, low, high - low, _START_WRITEBACK)
        self.in_writeback.append((fd, low, high))
        if len(self.in_writeback) > 2:
            fd, low, high = self.in_writeback.popleft()
            _SYNC_FILE_RANGE(fd, low, high - low, _AWAIT_WRITEBACK)
            os.posix_fadvise(fd, low, high - low, os.POSIX_FADV_DONTNEED)  # written: its clean pages can go

    def close(self) -> None:
        for fd in self.fds:
            os.fsync(fd)
            os.close(fd)
        self.fds = []


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype, alignment: int = 64) -> np.ndarray:
    """np.empty, its data aligned for XLA: JAX's CPU client then uses the array in place
    instead of copying it (a 65 MB tensor: 3 ms against 33 ms for its first use)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + alignment, np.uint8)
    start = -raw.ctypes.data % alignment
    return raw[start:start + nbytes].view(dtype).reshape(shape)


class BufferPool:
    """Aligned buffers (`aligned_empty`) kept by size for the next tensor of that size: a fresh
    buffer costs a page fault and the kernel's zeroing per page before the read can fill it
    (reading 6.6 GB into fresh buffers took twice as long as into reused ones). A buffer comes
    back only once nothing reads it: XLA may compute on an input in place. A buffer is kept
    while takes of its size are still to come (`sizes`: the size in bytes of each take that
    will come; a size not there is served, not kept), so memory holds no more buffers of a size
    than are in flight at once, and none once its last tensor is read."""

    def __init__(self, sizes):
        self.to_come = collections.Counter(sizes)
        self.free: dict[int, list[np.ndarray]] = collections.defaultdict(list)  # bytes -> aligned uint8 buffers
        self.lock = threading.Lock()  # readers take and the writer gives back from their threads

    def take(self, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        nbytes = math.prod(shape) * np.dtype(dtype).itemsize
        with self.lock:
            self.to_come[nbytes] -= 1
            buffers = self.free[nbytes]
            buffer = buffers.pop() if buffers else None
        buffer = aligned_empty((nbytes,), np.uint8) if buffer is None else buffer
        return buffer.view(dtype).reshape(shape)

    def give(self, arrays) -> None:
        """Returns arrays that `take` gave."""
        with self.lock:
            for array in arrays:
                if self.to_come[array.nbytes] > len(self.free[array.nbytes]):
                    self.free[array.nbytes].append(array.reshape(-1).view(np.uint8))


class TensorReader:
    """Reads safetensors tensors with pread into given or fresh arrays. Not through a memory map: the
    pages of a mapped file stay in the process's resident memory once read, so a merge that
    reads whole models would hold them all; here it holds the tensors in flight."""

    def __init__(self):
        self.files: dict[Path, tuple[int, int, dict]] = {}  # file -> (fd, data start, header)

    def _open(self, path: Path) -> tuple[int, int, dict]:
        if path not in self.files:
            fd = os.open(path, os.O_RDONLY)
            length = int.from_bytes(os.pread(fd, 8, 0), "little")
            header = json.loads(os.pread(fd, length, 8))
            self.files[path] = (fd, 8 + length, header)
        return self.files[path]

    def spec(self, path: Path, key: str) -> tuple[np.dtype, tuple[int, ...]]:
        entry = self._open(Path(path))[2][key]
        return SAFETENSORS_DTYPES[entry["dtype"]], tuple(entry["shape"])

    def read(self, path: Path, key: str, out: np.ndarray | None = None) -> np.ndarray:
        """The file's tensor `key` (its header already checked by `checkpoint.check_tensors`),
        into `out` if given (a contiguous array of its dtype and size)."""
        fd, start, header = self._open(Path(path))
        entry = header[key]
        begin, end = entry["data_offsets"]
        out = aligned_empty(tuple(entry["shape"]), SAFETENSORS_DTYPES[entry["dtype"]]) if out is None else out
        view = memoryview(out.reshape(-1).view(np.uint8))
        offset = start + begin
        while view:  # pread may read less than asked
            count = os.preadv(fd, [view], offset)
            if count == 0:
                raise OSError(f"{path}: tensor {key} ends past the end of the file")
            view, offset = view[count:], offset + count
        return out

    def close(self) -> None:
        for fd, _, _ in self.files.values():
            os.close(fd)
        self.files = {}


@dataclasses.dataclass
class Models:
    """The input checkpoints: tensors by (model, key), each model's read dtype, vocabulary rows."""

    tensors: dict  # model -> {checkpoint key: (file, safetensors handle, stored key)}
    read_dtypes: dict  # model -> np.dtype the model is read in (its checkpoint's, or the merge's)
    rows: dict | None  # tokenizer_source: model -> output-vocabulary row index per token (-1: absent)
    vocab_tables: dict  # vocabulary path -> {model: aligned table} (built on first use)
    base: str | None  # the recipe's base model (vocabulary rows fall back to it)
    reader: TensorReader = dataclasses.field(default_factory=TensorReader)

    def read(self, model: str, key: str, out: np.ndarray | None = None) -> np.ndarray:
        path, _, stored = self.tensors[model][key]
        return self.reader.read(path, stored, out)

    def spec(self, model: str, key: str) -> tuple[np.dtype, tuple[int, ...]]:
        path, _, stored = self.tensors[model][key]
        return self.reader.spec(path, stored)

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


class TensorErrors:
    """The words for a tensor at fault in a recipe's merge: the recipe's fault or a checkpoint's."""

    def __init__(self, merge_dtype: np.dtype, out_dtype: np.dtype, read_dtypes: dict):
        self.merge_dtype, self.out_dtype, self.read_dtypes = merge_dtype, out_dtype, read_dtypes

    def shape(self, job: TensorJob, model: str, key: str, shape) -> Exception:
        return RecipeError(f"tensor {job.key}: {model} has shape {tuple(shape)} ({key}), the merge's is "
                           f"{job.shape}")

    def non_finite_input(self, model: str, key: str, models: Models) -> Exception:
        tensor, file = models.read(model, key), models.file_of(model, key)
        nan, inf = int(np.isnan(tensor).sum()), int(np.isinf(tensor).sum())
        if nan or inf:
            return CheckpointError(f"{file}: tensor {key} holds {nan} NaN and {inf} Inf among its {tensor.size} "
                                   "values (pass allow_non_finite=True to load it anyway)")
        return CheckpointError(f"{file}: tensor {key} overflows {dtype_name(self.read_dtypes[model])}: values "
                               "beyond its range become Inf (load it in a wider dtype, or pass allow_non_finite=True)")

    def overflow_input(self, model: str, key: str) -> Exception:
        return RecipeError(f"tensor {key} of {model}: overflows {dtype_name(self.merge_dtype)} (values beyond "
                           f"{float(jnp.finfo(self.merge_dtype).max):g}); merge in a wider dtype (dtype: float32)")

    def non_finite_merge(self, job: TensorJob) -> Exception:
        hint = ("check the recipe's parameters" if self.merge_dtype == np.float32
                else "merge in float32 (dtype: float32)")
        return RecipeError(f"tensor {job.key}: the merge in {dtype_name(self.merge_dtype)} gives inf or NaN; {hint}")

    def overflow_output(self, job: TensorJob) -> Exception:
        return CheckpointError(f"tensor {job.key} overflows {dtype_name(self.out_dtype)}: values beyond its range "
                               f"would be written as inf (write a wider dtype)")


def _members(job: TensorJob) -> list[tuple[str, str]]:
    """The job's inputs as (model, checkpoint key): the base first (if any), then the sources."""
    return ([job.base] if job.base else []) + list(job.sources)


def _read_inputs(job: TensorJob, models: Models, errors, pool: BufferPool, *, vocabulary: bool, flat: bool):
    """The job's base (or None), its sources stacked [K, ...], as stored (flattened if `flat`),
    and the arrays among them taken from `pool`; `vocabulary`: its rows are tokens, re-ordered
    or cut as `vocabulary_rows` says."""
    members = _members(job)
    vocabulary = vocabulary and _reshaped_vocabulary(job, models)
    tables = vocabulary_rows(models, job.path, dict(members), job.shape[0], job.base) if vocabulary else None
    specs = [models.spec(m, k) if tables is None else (tables[m].dtype, tables[m].shape) for m, k in members]
    for (m, k), (_, shape) in zip(members, specs, strict=True):  # before anything is read
        if tuple(shape) != job.shape:
            raise errors.shape(job, m, k, shape)
    source_dtypes = {dtype for dtype, _ in specs[len(members) - len(job.sources):]}
    pooled = []
    if tables is not None:
        base = tables[job.base[0]] if job.base else None
        sources = _stack([tables[m] for m, _ in job.sources])
    else:
        base = None
        if job.base:
            base = models.read(*job.base, pool.take(job.shape, specs[0][0]))
            pooled.append(base)
        sources = _read_stacked(job, models, source_dtypes, pool)
        if len(source_dtypes) == 1:
            pooled.append(sources)
    if flat:
        base = None if base is None else base.reshape(-1)
        sources = sources.reshape(len(job.sources), -1)
    return base, sources, pooled


def _reshaped_vocabulary(job: TensorJob, models: Models) -> bool:
    """Whether a token-indexed tensor's rows change on the way to the output (re-ordered to a
    tokenizer_source's vocabulary, or cut or filled to the output's rows); if not, it is read
    as any other tensor."""
    return models.rows is not None or any(models.spec(m, k)[1] != job.shape for m, k in _members(job))


def _pooled_sizes(job: TensorJob, models: Models) -> list[int]:
    """The bytes of the buffers `_read_inputs` takes for `job` (a vocabulary re-ordered takes
    none: counting it only keeps a buffer longer)."""
    specs = [models.spec(m, k) for m, k in _members(job)]
    count = math.prod(job.shape)
    sizes = [count * np.dtype(specs[0][0]).itemsize] if job.base else []
    source_dtypes = {np.dtype(dtype) for dtype, _ in specs[len(specs) - len(job.sources):]}
    if len(source_dtypes) == 1:
        sizes.append(len(job.sources) * count * source_dtypes.pop().itemsize)
    return sizes


def _read_stacked(job: TensorJob, models: Models, source_dtypes: set[np.dtype], pool: BufferPool) -> np.ndarray:
    """The job's sources from disk, stacked [K, ...]: one dtype on disk is read straight into
    a stack taken from `pool`."""
    if len(source_dtypes) > 1:
        return _stack([models.read(m, k) for m, k in job.sources])
    sources = pool.take((len(job.sources),) + job.shape, next(iter(source_dtypes)))
    for i, (m, k) in enumerate(job.sources):
        models.read(m, k, sources[i])
    return sources


def _stack(parts: list[np.ndarray]) -> np.ndarray:
    """The parts stacked [K, ...] in their dtype, or its exact promotion."""
    common = np.dtype(jnp.result_type(*(p.dtype for p in parts)))
    return np.stack([p.astype(common) for p in parts])


def _tensor_key(seed_key: Array | None, key_data: tuple[int, ...] | None) -> Array | None:
    """The PRNG key of one tensor (None without a seed): the seed folded with its key data."""
    if seed_key is None:
        return None
    key = seed_key
    for part in key_data:
        key = jax.random.fold_in(key, part)
    return key


def _check_flags(job: TensorJob, members: list[tuple[str, str]], flags, models: Models, errors, *,
                 allow_non_finite: bool) -> None:
    """Raises `errors`' exception for the first fault the merge program flagged."""
    read_bad, overflow, merged_bad, out_overflow = (np.asarray(f) for f in flags)
    if not allow_non_finite:
        for (m, k), bad in zip(members, read_bad, strict=True):
            if bad:
                raise errors.non_finite_input(m, k, models)
    for (m, k), bad in zip(members, overflow, strict=True):
        if bad:
            raise errors.overflow_input(m, k)
    if merged_bad and not allow_non_finite and not read_bad.any():
        raise errors.non_finite_merge(job)
    if out_overflow:
        raise errors.overflow_output(job)


def run_jobs(jobs: list[TensorJob], plans: list[MergePlan], models: Models, writer: ShardWriter, *,
             merge_dtype: np.dtype, out_dtype: np.dtype, seed_key: Array | None, vocab_paths: set[str],
             allow_non_finite: bool, errors, progress, compute_dtype: str | None = None,
             ties: str = "index") -> None:
    """Reads, merges as `plans` say (over checkpoint keys) and writes every job; `errors`
    builds the exceptions raised for bad tensors (the caller words them: the recipe's or a
    checkpoint's fault). compute_dtype: the methods' (`Options.compute_dtype`: mergekit's
    arithmetic in the merge dtype, or None: float32); ties: `Options.ties`. The plans' values
    may be float64 (a recipe's own): the counts of entries mergekit keeps come from them."""
    plan_of = {key: plan for plan in plans for key in plan.params}
    # DELLA ranks within rows; every other method is elementwise
    flat = not any(plan.merge_method.stats_required for plan in plans)
    # In the output's order: its files are written front to back (and the inputs, laid out
    # alike, read so), as `ShardWriter._written` expects.
    jobs = sorted(jobs, key=lambda job: writer.position(job.key))
    pool = BufferPool(size for job in jobs for size in _pooled_sizes(job, models))

    def read(job: TensorJob):
        return _read_inputs(job, models, errors, pool, vocabulary=job.path in vocab_paths, flat=flat)

    def compute(job: TensorJob, base, sources):
        read_dtypes = tuple(np.dtype(models.read_dtypes[m]) for m, _ in _members(job))
        plan = plan_of[job.key]
        values = plan.params[job.key]
        params = {name: np.asarray(v, np.float32) for name, v in values.items()}
        params.update(exact_counts(plan.merge_method, values, math.prod(job.shape)))
        options = dataclasses.replace(plan.options, compute_dtype=compute_dtype, ties=ties)
        return _merge_program(base, sources, params, _tensor_key(seed_key, job.key_data),
                              method=plan.merge_method, options=options, read_dtypes=read_dtypes,
                              merge_dtype=np.dtype(merge_dtype), out_dtype=np.dtype(out_dtype),
                              shape=None if flat else job.shape, flat=flat)

    def finish(job: TensorJob, out, flags, pooled) -> None:
        _check_flags(job, _members(job), flags, models, errors, allow_non_finite=allow_non_finite)
        writer.write(job.key, np.asarray(out))
        pool.give(pooled)  # the program is done with its inputs (and the output, were it one of them, written)

    with concurrent.futures.ThreadPoolExecutor(2) as readers, concurrent.futures.ThreadPoolExecutor(1) as writers:
        ahead = collections.deque(readers.submit(read, job) for job in jobs[:2])
        pending: collections.deque = collections.deque()
        for i, job in enumerate(jobs):
            base, sources, pooled = ahead.popleft().result()
            if i + 2 < len(jobs):
                ahead.append(readers.submit(read, jobs[i + 2]))
            out, flags = compute(job, base, sources)
            pending.append(writers.submit(finish, job, out, flags, pooled))
            while len(pending) > 2:  # a bounded queue: memory holds a few tensors
                pending.popleft().result()
                progress(1)
        while pending:
            pending.popleft().result()
            progress(1)
