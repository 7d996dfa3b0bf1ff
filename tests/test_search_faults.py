"""Resume integrity: a search killed (kill -9) at any point, or resumed from a damaged
checkpoint or log, either ends exactly as an uninterrupted run or stops with a clear error;
it never finishes with a different result.

Run as a script, this file is a search job that kills itself at a chosen point:

    python tests/test_search_faults.py OUT_DIR GENERATIONS POINT GENERATION
"""

from __future__ import annotations

import functools
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from search_problem import SPACE, assert_same_run, search

GENERATIONS = 8
STOP = 5  # a partial run's last generation; a killed job dies in generation STOP (or saving step STOP + 1)


@functools.cache
def strategy():
    """CMA-ES as `search` makes it by name, made once: evosax compiles ask and tell per
    instance, and this file resumes some forty searches in one process."""
    import jax.numpy as jnp
    from evosax.algorithms import CMA_ES

    return CMA_ES(population_size=8, solution=jnp.zeros(SPACE.num_dims))


def resume(out_dir: Path, generations: int = GENERATIONS):
    return search(out_dir, generations, strategy=strategy())


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return resume(tmp_path_factory.mktemp("whole") / "run")


@pytest.fixture(scope="module")
def partial(tmp_path_factory) -> Path:
    """A run stopped cleanly after STOP generations (checkpoint steps STOP - 2 .. STOP); copy before changing."""
    out = tmp_path_factory.mktemp("partial") / "run"
    resume(out, STOP)
    return out


def copy_of(run: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(run, tmp_path / "run"))


def step_dir(run: Path, step: int) -> Path:
    return run / "checkpoints" / str(step)


def flip_covariance_bit(step: Path) -> None:
    """Flip one exponent bit of the CMA-ES covariance C[0, 0] inside the step's saved arrays,
    leaving a well-formed checkpoint: what a bit flip on disk or in a copy can leave behind
    where the storage format has no checksum of its own (orbax's compressed chunks have none)."""
    import orbax.checkpoint as ocp

    item = (step / "default").resolve()
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(item)
        covariance = np.array(tree["state"]["C"])
        covariance.view(np.uint32)[0, 0] ^= 1 << 23
        tree["state"]["C"] = covariance
        checkpointer.save(item, tree, force=True)
    (item / "_CHECKPOINT_METADATA").unlink(missing_ok=True)  # the item's own; the step's stays as it was


# Defect 4: a checkpoint whose arrays changed on disk was restored without complaint.

def test_flipped_checkpoint_falls_back_to_the_previous_step(whole, partial, tmp_path):
    run = copy_of(partial, tmp_path)
    flip_covariance_bit(step_dir(run, STOP))
    with pytest.warns(UserWarning, match=rf"resuming from checkpoint step {STOP - 1}.*step {STOP}: .*C.* checksum"):
        resumed = resume(run)
    assert_same_run(resumed, whole)


def test_no_good_checkpoint_is_a_clear_error(partial, tmp_path):
    run = copy_of(partial, tmp_path)
    steps = sorted(int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit())
    for step in steps:
        flip_covariance_bit(step_dir(run, step))
    where = re.escape(str(run / "checkpoints"))
    with pytest.raises(ValueError, match=rf"no usable checkpoint in {where}: step {steps[-1]}: .*step {steps[0]}: "):
        resume(run)


def test_step_without_checksum_is_not_trusted(whole, partial, tmp_path):
    """A step an older jaxmerge wrote (no checksum) counts as unverified: the previous step is used."""
    run = copy_of(partial, tmp_path)
    metadata = step_dir(run, STOP) / "_CHECKPOINT_METADATA"
    fields = json.loads(metadata.read_text())
    metadata.write_text(json.dumps({**fields, "custom_metadata": {}}))
    with pytest.warns(UserWarning, match=rf"resuming from checkpoint step {STOP - 1}.*step {STOP}: no checksum"):
        resumed = resume(run)
    assert_same_run(resumed, whole)


# Defect 11: an emptied orbax metadata file gave a bare JSONDecodeError.

@pytest.mark.parametrize("name", ["default/_METADATA", "default/array_metadatas/process_0", "_CHECKPOINT_METADATA"])
def test_emptied_orbax_metadata_falls_back_to_the_previous_step(whole, partial, tmp_path, name):
    run = copy_of(partial, tmp_path)
    (step_dir(run, STOP) / name).write_text("")
    with pytest.warns(UserWarning, match=rf"resuming from checkpoint step {STOP - 1}.*step {STOP}: "):
        resumed = resume(run)
    assert_same_run(resumed, whole)


# Defect 8: a half-written last log line crashed the resume.

def test_half_written_last_log_line_is_dropped(whole, partial, tmp_path):
    run = copy_of(partial, tmp_path)
    line = json.dumps({**whole.history[STOP], "seconds": 0.5}) + "\n"
    with (run / "generations.jsonl").open("a") as log:
        log.write(line[:len(line) // 2])  # generation STOP's line, cut short by a kill
    assert_same_run(resume(run), whole)


def test_corrupt_log_line_before_the_checkpoint_is_an_error(partial, tmp_path):
    run = copy_of(partial, tmp_path)
    log = run / "generations.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    lines[1] = lines[1][:20] + "\n"
    log.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))}, line 2: "):
        resume(run)
    lines[1] = ""  # a missing line: generation 1 is absent
    log.write_text("".join(lines))
    with pytest.raises(ValueError, match=rf"{re.escape(str(log))}, line 2: expected generation 1"):
        resume(run)


# Fault injection: a job that kills itself with SIGKILL at a chosen point of generation STOP.

POINTS = {
    "log_torn": "half of the generation's log line reached the file",
    "log_unflushed": "the log line was written to Python's buffer, not yet flushed",
    "before_save": "the log line is on disk; the checkpoint not begun",
    "save_writing": "orbax's array writes started (tensorstore writes them in the background), not awaited",
    "save_uncommitted": "the arrays and metadata written; the step not committed (renamed)",
    "after_save": "the step committed, with its checksum; the generation not finished",
}


def kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_fault(point: str, generation: int) -> None:  # noqa: C901 (one patch per fault point, side by side)
    """Make this process SIGKILL itself at `point` of `generation` (see POINTS)."""
    import orbax.checkpoint as ocp

    step = generation + 1
    saving = {"step": None}

    class Log:
        """The log file, with the fault at `generation`'s line."""

        def __init__(self, file):
            self.file = file

        def write(self, text: str) -> int:
            if json.loads(text)["generation"] == generation:
                if point == "log_torn":
                    self.file.write(text[:len(text) // 2])
                    self.file.flush()
                    kill_self()
                if point == "log_unflushed":
                    self.file.write(text)
                    kill_self()
            return self.file.write(text)

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return self.file.__exit__(*exc)

    open_file = pathlib.Path.open

    def open_log(self, mode="r", *args, **kwargs):
        file = open_file(self, mode, *args, **kwargs)
        return Log(file) if self.name == "generations.jsonl" and mode == "a" else file

    save = ocp.CheckpointManager.save

    def save_step(self, at, *args, **kwargs):
        if at == step and point == "before_save":
            kill_self()
        saving["step"] = at
        done = save(self, at, *args, **kwargs)
        if at == step and point == "after_save":
            kill_self()
        return done

    def wrap(method, when: str):
        def wrapped(*args, **kwargs):
            if saving["step"] == step and point == when:
                kill_self()
            return method(*args, **kwargs)
        return wrapped

    pathlib.Path.open = open_log
    ocp.CheckpointManager.save = save_step
    write = ocp.StandardCheckpointHandler.async_save

    async def write_arrays(*args, **kwargs):
        writing = await write(*args, **kwargs)
        if saving["step"] == step and point == "save_writing":
            kill_self()
        return writing

    ocp.StandardCheckpointHandler.async_save = write_arrays
    ocp.CompositeCheckpointHandler.finalize = wrap(ocp.CompositeCheckpointHandler.finalize, "save_uncommitted")


@pytest.fixture(scope="module")
def killed(tmp_path_factory) -> dict[str, tuple[int, Path]]:
    """{point: (exit status, run directory)} of a job killed at each point of POINTS. The jobs
    share a persistent compilation cache: the first runs alone to fill it, then the rest together."""
    root = tmp_path_factory.mktemp("killed")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parent), "JAX_COMPILATION_CACHE_DIR": str(root / "cache"),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}

    def start(point: str) -> subprocess.Popen:
        with (root / f"{point}.stderr").open("w") as stderr:
            return subprocess.Popen([sys.executable, __file__, str(root / point), str(GENERATIONS), point, str(STOP)],
                                    env=env, stdout=subprocess.DEVNULL, stderr=stderr)

    first, *rest = POINTS
    jobs = {first: start(first)}
    jobs[first].wait(timeout=300)
    jobs.update({point: start(point) for point in rest})
    return {point: (job.wait(timeout=300), root / point) for point, job in jobs.items()}


@pytest.mark.parametrize("point", POINTS)
def test_kill_9_at_each_point_resumes_like_an_uninterrupted_run(whole, killed, point):
    status, run = killed[point]
    stderr = run.with_suffix(".stderr").read_text()
    assert status == -signal.SIGKILL, f"{point}: the job was not killed: {stderr[-3000:]}"
    log = (run / "generations.jsonl").read_text()
    checkpoints = run / "checkpoints"
    steps = sorted(int(p.name) for p in checkpoints.iterdir() if p.name.isdigit())
    # The fault happened where it says.
    assert log.count("\n") == (STOP if point in ("log_torn", "log_unflushed") else STOP + 1), point
    assert log.endswith("\n") == (point != "log_torn"), point
    assert steps[-1] == (STOP + 1 if point == "after_save" else STOP), point
    leftovers = [p.name for p in checkpoints.iterdir() if not p.name.isdigit()]
    assert bool(leftovers) == (point in ("save_writing", "save_uncommitted")), (point, leftovers)
    assert_same_run(resume(run), whole)


@pytest.mark.filterwarnings("ignore:.*resuming from checkpoint step")  # where the damage is found: expected
@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_newest_step_never_changes_the_result(whole, partial, tmp_path, damage):
    """Every file of the newest step, damaged in turn (a byte flipped in its middle, or cut to
    half): the resumed run ends as an uninterrupted one (the step before is intact, so no
    damage may stop it either)."""
    files = sorted(p.relative_to(partial) for p in step_dir(partial, STOP).rglob("*") if p.is_file())
    assert len(files) > 5
    for i, name in enumerate(files):
        run = Path(shutil.copytree(partial, tmp_path / str(i)))
        data = bytearray((run / name).read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0xFF
        else:
            del data[len(data) // 2:]
        (run / name).write_bytes(bytes(data))
        result = resume(run)
        try:
            assert_same_run(result, whole)
        except AssertionError as error:
            raise AssertionError(f"{damage} {name}: {error}") from None


if __name__ == "__main__":
    install_fault(sys.argv[3], int(sys.argv[4]))
    search(sys.argv[1], int(sys.argv[2]))
