"""Extending, resuming and interrupting a search, said and done: a run directory asked for
more `search.generations` is extended (no other key may change; fewer generations than its
checkpoint holds are refused), and its search goes on to end as one started with the new
number; a resume says where it starts, without orbax's warnings; Ctrl-C and SIGTERM stop a
search after its last finished generation, saying how to go on, and the rerun ends as an
uninterrupted search."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from search_problem import SPACE, assert_same_run, make_problem, score

from jaxmerge.pipeline.rundir import Extension, RunDirError, create_run_dir, plan_run_dir, planned_extension
from jaxmerge.search import SearchConfig, run_search
from jaxmerge.search.evolution import Terminated, checkpointed_generations, sigterm_as_interrupt

GENERATIONS = 6
STOP = 2  # the generation (counted from 0) an interrupted search is stopped in


@functools.cache
def strategy():
    """CMA-ES made once: evosax compiles ask and tell per instance."""
    import jax.numpy as jnp
    from evosax.algorithms import CMA_ES

    return CMA_ES(population_size=8, solution=jnp.zeros(SPACE.num_dims))


@functools.cache
def problem():
    return make_problem()


def searched(out_dir: Path, generations: int, stop: str | None = None):
    """search_problem's search with a host fitness (the jitted part returns the errors), which
    `stop` ("ctrl_c": KeyboardInterrupt; "sigterm": SIGTERM to this process) interrupts when
    it scores generation STOP's population."""
    data, masks, validation = problem()
    calls = []

    def host_fitness(outputs, batch_index):
        calls.append(batch_index)
        if stop is not None and len(calls) == 2 * STOP + 1:  # each generation: its minibatch, then validation
            if stop == "ctrl_c":
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises in this thread long before
        return -np.asarray(outputs)

    return run_search(SPACE, sorted(data["base"]), lambda *a: -score(*a), data, masks, validation,
                      config=SearchConfig(generations=generations, population_size=8, seed=3, strategy=strategy()),
                      out_dir=out_dir, progress=False, host_fitness=host_fitness)


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return searched(tmp_path_factory.mktemp("whole") / "run", GENERATIONS)


@pytest.fixture
def messages(caplog):
    """The messages logged by jaxmerge (its logger may not propagate to the root's) and by absl
    (orbax's warnings), as a function that returns those since the last call."""
    loggers = [logging.getLogger("jaxmerge"), logging.getLogger("absl")]
    for logger in loggers:
        logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="jaxmerge")

    def since_last() -> list[str]:
        # Each once: a second capturing handler on the way to the root logger may repeat a record.
        found = list(dict.fromkeys(r.getMessage() for r in caplog.records))
        caplog.clear()
        return found

    yield since_last
    for logger in loggers:
        logger.removeHandler(caplog.handler)


def checkpoints(out: Path) -> str:
    return str((out / "checkpoints").resolve())


def test_extended_search_ends_as_one_started_with_its_generations(whole, tmp_path, messages, recwarn):
    out = tmp_path / "run"
    searched(out, 4)
    messages()
    extended = searched(out, GENERATIONS)
    said = messages()
    assert f"resuming at generation 5 of {GENERATIONS} (checkpoint step 4 in {checkpoints(out)})" in said
    assert not [m for m in said if "could not be restored" in m], said  # orbax's, on reading a step's metadata
    assert not [str(w.message) for w in recwarn]
    assert_same_run(extended, whole)

    # Asked again for as many generations as it holds: nothing is run, nothing written.
    steps = sorted(p.name for p in (out / "checkpoints").iterdir())
    log = (out / "generations.jsonl").read_text()
    again = searched(out, GENERATIONS)
    assert f"the search is complete: its {GENERATIONS} generations are in checkpoint step {GENERATIONS} in " \
           f"{checkpoints(out)}; nothing to run" in messages()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == steps
    assert (out / "generations.jsonl").read_text() == log
    assert_same_run(again, whole)
    # Fewer than it holds: refused, naming both numbers.
    with pytest.raises(ValueError, match=f"checkpoint holds {GENERATIONS} generations, more than the 4 asked for"):
        searched(out, 4)


@pytest.mark.parametrize("stop", ["ctrl_c", "sigterm"])
def test_interrupted_search_keeps_its_last_generation_and_resumes_as_uninterrupted(whole, tmp_path, messages,
                                                                                    stop):
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt) as interrupted, sigterm_as_interrupt():
        searched(out, GENERATIONS, stop)
    assert isinstance(interrupted.value, Terminated) == (stop == "sigterm")
    assert f"interrupted at generation {STOP + 1} of {GENERATIONS}; rerun the same command to resume" in messages()
    assert checkpointed_generations(out) == STOP  # the last finished generation's checkpoint, whole
    assert len((out / "generations.jsonl").read_text().splitlines()) == STOP
    resumed = searched(out, GENERATIONS)
    assert f"resuming at generation {STOP + 1} of {GENERATIONS} (checkpoint step {STOP} in {checkpoints(out)})" \
           in messages()
    assert_same_run(resumed, whole)


def test_sigterm_as_interrupt_puts_the_previous_handler_back():
    previous = signal.getsignal(signal.SIGTERM)
    seen = []

    def mine(signum, frame):
        seen.append(signum)

    signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(Terminated, match="SIGTERM") as terminated, sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        assert terminated.value.signum == signal.SIGTERM  # the command's exit status: 128 + 15
        assert signal.getsignal(signal.SIGTERM) is mine and not seen
        outside = []  # in another thread (where Python takes no signals) it leaves the handler alone
        thread = threading.Thread(target=lambda: outside.append(sigterm_as_interrupt().__enter__() or
                                                                signal.getsignal(signal.SIGTERM)))
        thread.start()
        thread.join()
        assert outside == [mine]
    finally:
        signal.signal(signal.SIGTERM, previous)


def record(generations: int, seed: int = 0) -> dict:
    return {"search": {"generations": generations, "seed": seed}, "tasks": [{"name": "t"}]}


def test_run_dir_is_extended_only_in_search_generations(whole, tmp_path):
    run = tmp_path / "run"
    create_run_dir(plan_run_dir(str(run), "x", record(4)), "x", record(4))
    searched(run / "search", 4)
    (run / "results.json").write_text("{}")  # the run finished
    (run / "search_after").mkdir()  # an output computed from the search's result
    saved = json.loads((run / "run.json").read_text())

    with pytest.raises(RunDirError, match=r"holds a finished run \(results.json\): choose a new --out, or ask for "
                                          r"more than its 4 search.generations to extend it"):
        plan_run_dir(str(run), "x", record(4))
    with pytest.raises(RunDirError, match="its search's checkpoint holds 4 generations, more than the 3 asked for"):
        plan_run_dir(str(run), "x", record(3))
    with pytest.raises(RunDirError, match=r"finished run of another configuration \(it differs in "
                                          r"config.search.seed\)") as refused:
        plan_run_dir(str(run), "x", record(GENERATIONS, seed=1))
    assert "generations" not in str(refused.value).split("differs in")[1]
    with pytest.raises(RunDirError, match=re.escape("differs in config.search.generations")):
        plan_run_dir(str(run), "x", {"search": {"generations": "six", "seed": 0}, "tasks": [{"name": "t"}]})

    # More generations: planned (nothing changes yet), then committed by create_run_dir.
    path = plan_run_dir(str(run), "x", record(GENERATIONS))
    extension = planned_extension(path, record(GENERATIONS))
    assert extension == Extension(run, done=4, recorded=4, generations=GENERATIONS, finished=True)
    assert str(extension) == f"{run}: extending the finished run's search from 4 to {GENERATIONS} generations " \
                             "(run.json recorded 4)"
    assert json.loads((run / "run.json").read_text()) == saved and (run / "results.json").exists()
    create_run_dir(path, "x", record(GENERATIONS), stale_when_extended=("search_after", "not_there"))
    assert not (run / "results.json").exists() and not (run / "search_after").exists()
    saved["config"]["search"]["generations"] = GENERATIONS
    assert json.loads((run / "run.json").read_text()) == saved
    assert planned_extension(run, record(GENERATIONS)) is None  # a plain resume now
    # Unfinished, fewer than run.json records but no fewer than done: the plan changes again.
    assert planned_extension(plan_run_dir(str(run), "x", record(5)), record(5)) == \
        Extension(run, done=4, recorded=GENERATIONS, generations=5, finished=False)
    assert_same_run(searched(run / "search", GENERATIONS), whole)
    (run / "results.json").write_text("{}")
    with pytest.raises(RunDirError, match="checkpoint holds 6 generations, more than the 5 asked for"):
        plan_run_dir(str(run), "x", record(5))
