"""The natural-niches search loop (issue #30): it fuses two specialists into a model that covers
both, compiles nothing after its first generation, resumes exactly as an uninterrupted run,
refuses a log that disagrees with its checkpoint, and its provenance re-derives the winner."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.search.natural_niches import NicheConfig, parameter_order
from jaxmerge.search.niche_search import NicheSearchConfig, rebuild, run_natural_niches

ITEMS = 8  # items 0-3 test the first half of the parameters (skill A), 4-7 the second (skill B)


def make_world():
    """Two specialists: source 0 is target A everywhere, source 1 target B everywhere. An item
    scores how close a model is to its skill's target on its half of the parameters (in the
    layer-major order), so a child split in the middle (A before, B after) solves all 8."""
    key = jax.random.key(0)
    shapes = {"embed_tokens.weight": (6, 4), "layers.mlp.up_proj.kernel": (2, 4, 4), "norm.weight": (4,)}
    target = [{p: jax.random.normal(jax.random.fold_in(key, 10 * t + i), s) for i, (p, s) in enumerate(shapes.items())}
              for t in range(2)]
    sources = [dict(target[0]), dict(target[1])]
    order = parameter_order(sources[0])
    return sources, {"targets": [flatten(t, order) for t in target]}, order


def flatten(model, order):
    """The parameters as one vector in the layer-major order."""
    parts = []
    for path, layer in order.blocks:
        parts.append((model[path][layer] if layer >= 0 else model[path]).reshape(-1))
    return jnp.concatenate(parts)


def score_fn(order):
    def score(child, data, batch, key):  # [I] in [0, 1]
        x = flatten(child, order)
        half = order.num_params // 2
        first = jnp.mean((x[:half] - data["targets"][0][:half]) ** 2)
        second = jnp.mean((x[half:] - data["targets"][1][half:]) ** 2)
        items = jnp.concatenate([jnp.full(4, first), jnp.full(4, second)]) * batch["difficulty"]
        return jnp.exp(-items)
    return score


FITNESS = {"difficulty": jnp.linspace(1.0, 8.0, ITEMS)}
VALIDATION = {"difficulty": jnp.full(ITEMS, 4.0)}


def search(out_dir, generations, **config):
    sources, data, order = make_world()
    niches = NicheConfig(archive_size=4, interpolation=config.pop("interpolation", "slerp"))
    return run_natural_niches(sources, score_fn(order), data, FITNESS, VALIDATION,
                              config=NicheSearchConfig(generations=generations, children=3, niches=niches, seed=1,
                                                       **config),
                              out_dir=out_dir, progress=False, source_names=["skill_a", "skill_b"])


@pytest.fixture(scope="module")
def whole(tmp_path_factory):
    return search(tmp_path_factory.mktemp("whole"), 8)


def strip_times(history):
    return [{k: v for k, v in entry.items() if k != "seconds"} for entry in history]


def test_fusion_covers_what_no_source_does(whole):
    validation = whole.member_validation
    sources_alone = search_sources_validation()
    assert whole.best_validation > max(sources_alone) + 0.05
    assert whole.best_id >= 2  # a child, not a source
    assert all(0.0 <= e["coverage"] <= 1.0 for e in whole.history)
    assert np.nanmax(validation) == pytest.approx(whole.best_validation)
    log = [json.loads(line) for line in (whole.out_dir / "generations.jsonl").read_text().splitlines()]
    assert strip_times(log) == strip_times(whole.history)
    assert len(whole.records) == 8 * 3


def search_sources_validation():
    sources, data, order = make_world()
    score = score_fn(order)
    return [float(np.mean(score(s, data, VALIDATION, None))) for s in sources]


def test_resume_ends_as_the_uninterrupted_run(whole, tmp_path):
    search(tmp_path, 3)
    resumed = search(tmp_path, 8)
    assert strip_times(resumed.history) == strip_times(whole.history)
    assert resumed.member_ids == whole.member_ids and resumed.best_id == whole.best_id
    for p in whole.best_params:
        np.testing.assert_array_equal(resumed.best_params[p], whole.best_params[p])


def test_a_log_that_disagrees_with_the_checkpoint_is_refused(tmp_path):
    search(tmp_path, 3)
    log_path = tmp_path / "generations.jsonl"
    entries = [json.loads(line) for line in log_path.read_text().splitlines()]
    kept = [c for e in entries for c in e["children"] if c["id"] in entries[-1]["archive"]]
    assert kept, "no child is in the archive: the test shows nothing"
    kept[0]["w"] = kept[0]["w"] / 2 + 0.1  # a different child in that slot
    log_path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    with pytest.raises(ValueError, match="fingerprints"):
        search(tmp_path, 4)


def test_provenance_rederives_the_winner(whole):
    sources, _, order = make_world()
    tree = whole.ancestry()
    assert "a" in tree and "b" in tree
    rebuilt = rebuild(tree, {"skill_a": sources[0], "skill_b": sources[1]}, order, NicheConfig(archive_size=4))
    for p in whole.best_params:
        np.testing.assert_allclose(rebuilt[p], whole.best_params[p], atol=1e-5, rtol=1e-5)


def test_generations_after_the_first_compile_nothing(tmp_path):
    compiled, counts = [0], []

    def count(event, duration, **kwargs):
        if event == "/jax/core/compile/backend_compile_duration":
            compiled[0] += 1

    class Generations(logging.Handler):
        def emit(self, record):
            if record.getMessage().startswith("generation "):
                counts.append(compiled[0])

    logger, handler = logging.getLogger("jaxmerge.search.niche_search"), Generations()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        search(tmp_path, 5, interpolation="linear")
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert len(counts) == 5
    assert counts[1:] == [counts[0]] * 4, counts
