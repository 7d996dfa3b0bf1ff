"""Run directories: one per run, held by one process, resumed only by the same configuration
on the same inputs, never overwritten.

A run directory is checked before anything loads (`plan_run_dir`): not an input, nor inside
or around one; writable; empty, or an unfinished run whose run.json matches this run's
configuration and the fingerprints of its inputs (`fingerprint_inputs`). `run_lock` keeps a
second process off it for the whole run. Files in it are written whole or not at all
(`write_text_atomic`, `atomic_file`).

One key may differ: `search.generations`. A run (finished or not) asked for another number
of generations is extended: its search continues from the generations its checkpoint holds
(`planned_extension` says from how many to how many; fewer than it holds are refused), and
`create_run_dir` records the new number in run.json when the caller commits to it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import shutil
import socket
from pathlib import Path

from jaxmerge.outputs import check_not_an_input
from jaxmerge.search.evolution import checkpointed_generations

log = logging.getLogger(__name__)

FULL_HASH_BYTES = 64 * 2**20  # files up to this size are hashed whole
SAMPLED_BLOCKS, SAMPLE_BYTES = 32, 64 * 2**10  # larger ones: size, safetensors header, 32 blocks of 64 KiB
SKIPPED_SUFFIXES = (".md", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf")  # never read


class RunDirError(FileExistsError):
    """A run directory that cannot be used for this run; the message says why and what to do."""


GENERATIONS = ("search", "generations")  # the record's one key a rerun may change: it extends the run
GENERATIONS_KEY = "config." + ".".join(GENERATIONS)  # as `_differences` names it
SEARCH_DIR = "search"  # the run's (parameter-space) search, in the run directory: the checkpoint an extension continues


@dataclasses.dataclass(frozen=True)
class Extension:
    """A rerun of a run directory that asks for another `search.generations`: its search goes
    on from the `done` generations its checkpoint holds to `generations` (run.json recorded
    `recorded`). `finished`: the run had ended (results.json), so that what follows the
    search is done again."""
    path: Path
    done: int
    recorded: int
    generations: int
    finished: bool

    def __str__(self) -> str:
        state = "finished" if self.finished else "unfinished"
        return (f"{self.path}: extending the {state} run's search from {self.done} to {self.generations} generations "
                f"(run.json recorded {self.recorded})")


# ----------------------------------------------------------------------------- fingerprints


def file_digest(path: Path) -> str:
    """"sha256:HEX" of the whole file up to FULL_HASH_BYTES; above, "sampled-sha256:HEX" of its
    size, its safetensors header (if it is one) and SAMPLED_BLOCKS evenly spaced blocks: a
    replaced or rewritten checkpoint changes it, a few flipped bytes between blocks may not."""
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if size <= FULL_HASH_BYTES:
            for block in iter(lambda: f.read(2**20), b""):
                digest.update(block)
            return f"sha256:{digest.hexdigest()}"
        digest.update(str(size).encode())
        if path.suffix == ".safetensors":
            length = int.from_bytes(f.read(8), "little")
            digest.update(f.read(min(length, size - 8)))
        for i in range(SAMPLED_BLOCKS):
            f.seek(i * (size - SAMPLE_BYTES) // (SAMPLED_BLOCKS - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return f"sampled-sha256:{digest.hexdigest()}"


def _files(path: Path) -> list[Path]:
    """The files of an input: itself, or a directory's files (a model's top level; a datasets
    directory's whole tree), weights formats jaxmerge never reads left out."""
    if path.is_file():
        return [path]
    pattern = "*" if (path / "config.json").is_file() else "**/*"
    return sorted(p for p in path.glob(pattern) if p.is_file() and not p.name.startswith(".")
                  and not p.name.endswith(SKIPPED_SUFFIXES))


def fingerprint_inputs(paths: list[Path]) -> dict[str, str]:
    """{file: digest} for every file the run reads from `paths` (see `file_digest`)."""
    return {str(f): file_digest(f) for p in paths if p.exists() for f in _files(p)}


# ----------------------------------------------------------------------------- the record


def _record(experiment: str, record: dict, inputs: dict[str, str] | None = None,
            hub_models: dict[str, dict] | None = None) -> dict:
    saved = {"experiment": experiment, "config": record}
    if hub_models:
        saved["hub_models"] = hub_models
    if inputs is not None:
        saved["inputs"] = inputs
    return json.loads(json.dumps(saved))  # as run.json reads back


def _check_hub_models(path: Path, saved: dict, expected: dict) -> None:
    """Refuses a resume where a Hub reference of the run now resolves to another commit."""
    before, now = saved.get("hub_models") or {}, expected.get("hub_models") or {}
    for reference in sorted(set(before) & set(now)):
        entry = before[reference]
        old, new = entry.get("commit") if isinstance(entry, dict) else None, now[reference]["commit"]
        if old != new:
            raise RunDirError(f"{path}: {reference} now resolves to commit {new}, and the run started on {old}: "
                              "resuming would merge other weights than it searched; choose a new --out")


def _differences(saved, current, key: str = "") -> list[str]:
    """The dotted keys where two records differ."""
    if isinstance(saved, dict) and isinstance(current, dict):
        return [d for k in sorted(set(saved) | set(current), key=str)
                for d in _differences(saved.get(k), current.get(k), f"{key}.{k}" if key else str(k))]
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        return [d for i, (a, b) in enumerate(zip(saved, current, strict=True))
                for d in _differences(a, b, f"{key}[{i}]")]
    return [] if saved == current else [key or "(the whole record)"]


def _read_run_json(path: Path) -> dict:
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RunDirError(f"{path}: damaged, not JSON ({e}): this run cannot be resumed; choose a new --out") from None
    if not isinstance(saved, dict):
        raise RunDirError(f"{path}: damaged (not a JSON object): this run cannot be resumed; choose a new --out")
    return saved


def _generations(record) -> int | None:
    """The record's `search.generations`, where it has one."""
    for key in GENERATIONS:
        record = record.get(key) if isinstance(record, dict) else None
    return record if isinstance(record, int) and not isinstance(record, bool) else None


def _check_resumable(path: Path, expected: dict) -> None:
    """Refuses, saying why, a non-empty `path` that is neither an unfinished run of `expected`
    nor a run of it with another `search.generations` (no fewer than its checkpoint holds)."""
    finished = (path / "results.json").exists()
    saved_file = path / "run.json"
    if not saved_file.exists():
        if finished:
            raise RunDirError(f"{path} holds a finished run (results.json): choose a new --out")
        raise RunDirError(f"{path} is not empty and is not an unfinished run of this configuration (no run.json): "
                          "choose a new --out")
    saved = _read_run_json(saved_file)
    _check_hub_models(path, saved, expected)
    recorded, requested = _generations(saved.get("config")), _generations(expected["config"])
    extendable = recorded is not None and requested is not None
    changed = [key for key in _differences(saved.get("config"), expected["config"], "config")
               if not (extendable and key == GENERATIONS_KEY)]
    if saved.get("experiment") != expected["experiment"]:
        changed.insert(0, "experiment")
    if changed:
        shown = ", ".join(changed[:6]) + (f" and {len(changed) - 6} more" if len(changed) > 6 else "")
        run = "holds a finished run of another configuration" if finished else \
            "is not an unfinished run of this configuration"
        raise RunDirError(f"{path} {run} (it differs in {shown}): rerun with the configuration in its run.json, "
                          "or choose a new --out")
    if finished and requested == recorded:
        extend = f", or ask for more than its {recorded} search.generations to extend it" if extendable else ""
        raise RunDirError(f"{path} holds a finished run (results.json): choose a new --out{extend}")
    if extendable and requested != recorded:
        done = checkpointed_generations(path / SEARCH_DIR)
        if requested < done:
            raise RunDirError(f"{path}: its search's checkpoint holds {done} generations, more than the {requested} "
                              f"asked for (search.generations): ask for {done} or more, or choose a new --out")
    if "inputs" in expected:
        before, now = saved.get("inputs") or {}, expected["inputs"]
        files = sorted(f for f in set(before) | set(now) if before.get(f) != now.get(f))
        if files:
            shown = ", ".join(files[:4]) + (f" and {len(files) - 4} more" if len(files) > 4 else "")
            raise RunDirError(f"{path}: the run's inputs changed since it started ({shown}): resuming would score "
                              "its generations on different data or models; restore them or choose a new --out")


# ----------------------------------------------------------------------------- planning and creating


def run_dir_path(out: str | None, experiment: str) -> Path:
    """`out`, or a fresh `runs/<experiment>-<time>`."""
    if out is not None:
        return Path(out)
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    path, n = Path("runs") / f"{experiment}-{stamp}", 1
    while path.exists():
        n += 1
        path = Path("runs") / f"{experiment}-{stamp}-{n}"
    return path


def plan_run_dir(out: str | None, experiment: str, record: dict, inputs: dict[str, str] | None = None,
                 protected: list[Path] = (), *, hub_models: dict[str, dict] | None = None) -> Path:
    """Where the run goes, checked but not created: `out`, or a fresh `runs/<experiment>-<time>`.
    It may not be, hold or lie inside any `protected` path (the run's inputs), and must be
    writable. A directory of an unfinished run with the same configuration (`record`) and the
    same input fingerprints (`inputs`), both kept in run.json with the commits its Hub models
    resolved to (`hub_models`, `jaxmerge.hub.hub_models`), will be resumed; a run, finished
    or not, that differs only in `search.generations` will be extended (`planned_extension`);
    a finished run asked for the same generations, another configuration's, changed inputs,
    fewer generations than its search's checkpoint holds, or a directory holding anything
    else are refused, naming what differs: runs are never overwritten."""
    path = run_dir_path(out, experiment)
    check_not_an_input(path, list(protected))
    if Path.cwd().resolve().is_relative_to(path.resolve()):
        raise RunDirError(f"{path}: the current directory, or one holding it, cannot be a run directory")
    if path.exists() and not path.is_dir():
        raise RunDirError(f"{path} is a file, not a run directory: choose a new --out")
    if path.exists() and any(path.iterdir()):
        _check_resumable(path, _record(experiment, record, inputs, hub_models))
    existing = path if path.exists() else next(p for p in path.absolute().parents if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirError(f"{path}: cannot be written ({existing} is not a writable directory)")
    return path


def planned_extension(path: Path, record: dict) -> Extension | None:
    """What a run directory checked by `plan_run_dir` holds for this run's `record`: an
    `Extension` where run.json records another `search.generations` (the caller then redoes
    what follows the search), None for a new run or a plain resume. Call it before
    `create_run_dir`, which commits the extension."""
    saved_file = path / "run.json"
    if not saved_file.is_file():
        return None
    recorded, requested = _generations(_read_run_json(saved_file).get("config")), _generations(record)
    if recorded is None or requested is None or recorded == requested:
        return None
    return Extension(path, checkpointed_generations(path / SEARCH_DIR), recorded, requested,
                     (path / "results.json").exists())


def _remove(entry: Path) -> None:
    """`entry` removed, a file or a directory tree; what another process of a multi-host run
    removes at the same moment is no error (its rmtree may remove what ours was about to)."""
    for _ in range(3):
        try:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink(missing_ok=True)
            return
        except FileNotFoundError:
            continue
    if entry.exists() or entry.is_symlink():
        raise OSError(f"{entry}: could not be removed")


def _commit_extension(extension: Extension, stale: tuple[str, ...]) -> None:
    """run.json's `search.generations` set to the extension's, after results.json (the run is
    unfinished again until its new results are written) and the `stale` entries (outputs that
    depend on the search's result) are removed: an interruption at any point leaves a
    directory that the same command extends again."""
    path = extension.path
    for name in ("results.json", *stale):
        _remove(path / name)
    saved = _read_run_json(path / "run.json")
    saved["config"][GENERATIONS[0]][GENERATIONS[1]] = extension.generations
    write_text_atomic(path / "run.json", json.dumps(saved, indent=2, ensure_ascii=False) + "\n")
    log.info("%s", extension)


def create_run_dir(path: Path, experiment: str, record: dict, inputs: dict[str, str] | None = None, *,
                   hub_models: dict[str, dict] | None = None, stale_when_extended: tuple[str, ...] = ()) -> Path:
    """Makes the planned run directory with its run.json; when resuming, run.json is checked
    again (it must still be this run's) and kept. An extension (`planned_extension`) is
    committed here: results.json and the `stale_when_extended` entries of the run directory
    (names of outputs computed from the search's result that are not simply overwritten when
    the run goes on, such as a later search through the merge) are removed, then run.json
    records the new `search.generations`."""
    path.mkdir(parents=True, exist_ok=True)
    expected = _record(experiment, record, inputs, hub_models)
    saved = path / "run.json"
    if saved.exists() or any(path.iterdir()):
        _check_resumable(path, expected)
        extension = planned_extension(path, record)
        if extension is not None:
            _commit_extension(extension, stale_when_extended)
    else:
        write_text_atomic(saved, json.dumps(expected, indent=2, ensure_ascii=False) + "\n")
    return path


def discard_unstarted_run_dir(path: Path) -> None:
    """Removes a run directory that holds nothing but its run.json (a run that failed before
    its search wrote anything), so that the corrected configuration may use the same --out."""
    if path.is_dir() and {p.name for p in path.iterdir()} <= {"run.json"}:
        with contextlib.suppress(OSError):
            (path / "run.json").unlink(missing_ok=True)
            path.rmdir()


def make_run_dir(out: str | None, experiment: str, record: dict) -> Path:
    """`plan_run_dir`, then `create_run_dir`: the run directory, resumed or new."""
    return create_run_dir(plan_run_dir(out, experiment, record), experiment, record)


# ----------------------------------------------------------------------------- one process per run


def lock_path(run_dir: Path) -> Path:
    return run_dir.absolute().parent / f".{run_dir.name}.jaxmerge-lock"


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Holds `run_dir` for this process: an exclusive lock (flock) on `.NAME.jaxmerge-lock`
    beside it, which a second run on the same directory finds taken and is refused, naming
    the holder. The kernel releases the lock when its process dies (kill -9 included), so a
    dead owner's lock never blocks: its file is simply taken over. Removed on release."""
    path = lock_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            try:
                holder = path.read_text().strip() or "another process"
            except OSError:
                holder = "another process"
            raise RunDirError(f"{run_dir} is in use by {holder} (lock {path}): wait for it to end, or choose another "
                              "--out") from None
        try:  # the file may have been removed by its last holder between our open and our lock
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}\n".encode())
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)


# ----------------------------------------------------------------------------- whole files


@contextlib.contextmanager
def atomic_file(path: Path):
    """Yields a temporary path beside `path` (same suffix) to write; renames it over `path` when
    the block ends, removes it on failure. A write error (disk full) is raised naming `path`."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(e, OSError) and not e.filename:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from e
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds `text` whole, or is as it was (temporary file, flushed, then renamed)."""
    with atomic_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())


def json_safe(value):
    """`value` with non-finite floats as null: JSON has no NaN or Infinity."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
