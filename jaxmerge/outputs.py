"""Output directories written safely: never over an input, never over what is not a previous
model output, never half-written.

`check_output_dir` says whether a path may be written (before anything is loaded or
computed); `staged_output` gives a temporary directory beside it, renamed into place when
complete and removed on an error, Ctrl-C or SIGTERM. Used by `save`, `jaxmerge merge`, the
run directory of `evolve` and the toy world's builds.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import socket
from pathlib import Path

from safetensors import SafetensorError

from jaxmerge.architectures import ARCHITECTURES
from jaxmerge.checkpoint import COMPANION_FILES, INDEX_NAME, WEIGHTS_NAME, check_no_symlink_loop, describe_error
from jaxmerge.errors import CheckpointError

# What a model directory written by jaxmerge, mergekit or transformers holds. `overwrite` replaces
# only a directory of these files: anything else (notes, data, the recipe being run) is the user's.
_OUTPUT_FILES = frozenset({
    "config.json", WEIGHTS_NAME, INDEX_NAME, "mergekit_config.yml", "README.md", "vocab.txt", *COMPANION_FILES,
    *(name for arch in ARCHITECTURES.values() for name in arch.code_files),
})
_SHARD_NAME = re.compile(r"model-\d{5}-of-\d{5}\.safetensors")


def _unexpected_entries(directory: Path) -> list[str]:
    """Entries of `directory` that no model output has (a subdirectory is shown with a '/')."""
    return sorted(
        entry.name + ("/" if entry.is_dir() else "") for entry in directory.iterdir()
        if entry.is_dir() or not (entry.name in _OUTPUT_FILES or _SHARD_NAME.fullmatch(entry.name))
    )


def _is_model_output(directory: Path) -> bool:
    names = {entry.name for entry in directory.iterdir()}
    has_weights = WEIGHTS_NAME in names or INDEX_NAME in names or any(map(_SHARD_NAME.fullmatch, names))
    return "config.json" in names and has_weights


def check_not_an_input(out: Path, protected: list[Path]) -> None:
    """Raises, naming both, if `out` is the filesystem root, or is, holds or lies inside any of
    `protected` (the inputs: model directories, data files, a recipe); symlinks resolved."""
    for path in (out, *protected):
        check_no_symlink_loop(path)
    resolved = out.resolve()
    if resolved.parent == resolved:
        raise CheckpointError(f"{out}: refusing to write over the filesystem root")
    for p in protected:
        p_resolved = p.resolve()
        if resolved == p_resolved or p_resolved.is_relative_to(resolved) or resolved.is_relative_to(p_resolved):
            kind = "input file" if p_resolved.is_file() else \
                "input model directory" if (p_resolved / "config.json").is_file() else "input directory"
            raise CheckpointError(f"{out}: refusing to write over, inside or around an {kind} ({p})")


def check_output_dir(out: Path, protected: list[Path], overwrite: bool) -> None:
    """Raises, naming the path at fault, unless `out` may be written; writes nothing. Symlinks
    are resolved. `out` must not be, hold or lie inside any of `protected` (the inputs: model
    directories, a recipe), nor be the filesystem root or the working directory (replaced by a
    rename, the shell would be left in a deleted directory); its nearest existing ancestor must
    be a writable directory. An existing `out` must be empty, or, with `overwrite`, a previous
    model output: config.json, safetensors weights, tokenizer, generation and recipe files, and
    nothing else, since replacing it deletes every file in it."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if cwd.is_relative_to(resolved) and resolved.parent != resolved:
        raise CheckpointError(f"{out}: refusing to replace the current directory or one holding it "
                              "(name a new directory)")
    check_not_an_input(out, protected)
    if resolved.exists() and not resolved.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if resolved.is_dir() and any(resolved.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out}: exists and is not empty (overwrite=True, or --overwrite, replaces a "
                                  "previous model output)")
        unexpected = _unexpected_entries(resolved)
        if unexpected:
            shown = ", ".join(unexpected[:8]) + (f" and {len(unexpected) - 8} more" if len(unexpected) > 8 else "")
            raise CheckpointError(f"{out}: not replaced: it holds files that are not a model's ({shown}); move "
                                  "them or choose another directory")
        if not _is_model_output(resolved):
            raise CheckpointError(f"{out}: not replaced: not a previous model output (no config.json and "
                                  "safetensors weights)")
        if not os.access(resolved, os.W_OK | os.X_OK):
            raise CheckpointError(f"{out}: not writable (its files could not be replaced)")
    ancestor = resolved.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise CheckpointError(f"{out}: cannot be created: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise CheckpointError(f"{out}: cannot be written: {ancestor} is not writable")


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", socket.gethostname())


def _temporary_path(out: Path, kind: str) -> Path:
    """`.OUT.jaxmerge-HOST-PID-RANDOM.KIND` beside `out`: a later save can tell the leftovers of
    a killed process from those of a live one."""
    return out.parent / f".{out.name}.jaxmerge-{_host()}-{os.getpid()}-{secrets.token_hex(4)}.{kind}"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove_stale_temporaries(out: Path) -> None:
    """Removes what killed saves to `out` left beside it (kill -9, OOM, power loss): the
    temporaries of processes of this host that no longer run. A live process's, or another
    host's (a shared filesystem), stay."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.jaxmerge-(\w+)-(\d+)-[0-9a-f]{{8}}\.(?:tmp|old)")
    for path in out.parent.iterdir():
        match = pattern.fullmatch(path.name)
        if (match and match[1] == _host() and int(match[2]) != os.getpid() and not _process_alive(int(match[2]))
                and path.is_dir() and not path.is_symlink()):
            shutil.rmtree(path, ignore_errors=True)


@contextlib.contextmanager
def staged_output(out: Path, overwrite: bool = False):
    """Yields a fresh temporary directory beside `out` (`.OUT.jaxmerge-HOST-PID-RANDOM.tmp`,
    0777 less the umask) to write an output into; renames it into place when the block ends,
    or removes it on an error, Ctrl-C or SIGTERM. A killed process's leftovers beside `out`
    are removed first. A symlink `out` has its target replaced, the link kept. Checks of
    `out` itself (`check_output_dir`) are the caller's, before."""
    target = Path(out).resolve()
    tmp = _temporary_path(target, "tmp")
    with _sigterm_as_interrupt():
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale_temporaries(target)
            tmp.mkdir()  # 0777 less the umask (mkdtemp's would be 0700)
            yield tmp
            _replace_dir(tmp, target, overwrite)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (OSError, SafetensorError)):  # disk full, quota, I/O error: nothing left behind
                raise CheckpointError(f"{out}: writing failed, nothing written ({describe_error(e)})") from e
            raise


def _replace_dir(tmp: Path, out: Path, overwrite: bool) -> None:
    """Renames tmp to out. Without `overwrite` the rename itself refuses a non-empty out
    (another process's output, written since the check); with it an existing out is moved
    aside first and removed after."""
    if not overwrite or not out.exists():
        os.replace(tmp, out)  # replaces nothing, or an empty directory
        return
    old = _temporary_path(out, "old")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:  # (SIGTERM between the renames) the previous output goes back
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


class _Terminated(BaseException):
    """SIGTERM, raised where the process is, so that a save's cleanup runs as for Ctrl-C."""


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """Within: SIGTERM raises _Terminated (cleanup runs); afterwards the signal goes to its
    previous handler, by default ending the process as SIGTERM does (exit status 143)."""
    try:
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    except ValueError:  # not the main thread: signals stay as they are
        yield
        return
    if previous == signal.SIG_IGN:  # the process ignores SIGTERM: so does the save
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        yield
        return
    previous = signal.SIG_DFL if previous is None else previous
    try:
        yield
    except _Terminated:
        signal.signal(signal.SIGTERM, previous)
        signal.raise_signal(signal.SIGTERM)
        raise  # the previous handler returned: the save is still interrupted
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_terminated(signum, frame):
    raise _Terminated()
