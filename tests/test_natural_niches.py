"""Natural niches (M2N2): one archive step against a plain-numpy reference of the released code's
semantics (resource sharing, attraction, the child's slerp with a split point over the
documented layer-major order, the archive update), sampling frequencies, and compile counts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxmerge.search.natural_niches import (
    ArchiveState,
    Children,
    NicheConfig,
    attraction_probabilities,
    child_params,
    child_records,
    coverage,
    empty_archive,
    global_split_index,
    parameter_order,
    parent_probabilities,
    sample_children,
    shared_fitness,
    update_archive,
    update_archive_in_order,
)

SHAPES = {  # two stacks of different depths, embeddings of each, and non-stacked leaves
    "embed_tokens.weight": (5, 3),
    "layers.mlp.kernel": (3, 2, 4),
    "layers.norm.weight": (3, 2),
    "lm_head.kernel": (3, 5),
    "norm.weight": (3,),
    "vision.embeddings.patch.weight": (2, 2),
    "vision.encoder.layers.fc.kernel": (2, 3, 2),
}
# The documented order, written out: (path, layer), layer -1 for a whole non-stacked leaf.
EXPECTED_BLOCKS = [("embed_tokens.weight", -1), ("vision.embeddings.patch.weight", -1)]
EXPECTED_BLOCKS += [(p, layer) for layer in range(3) for p in ("layers.mlp.kernel", "layers.norm.weight")]
EXPECTED_BLOCKS += [("vision.encoder.layers.fc.kernel", layer) for layer in range(2)]
EXPECTED_BLOCKS += [("lm_head.kernel", -1), ("norm.weight", -1)]
N, ITEMS = 5, 9
# Jitted once for the module (called eagerly, a vmapped while loop dispatches op by op: slow).
sample = jax.jit(sample_children, static_argnames=("config", "num_children", "order"))
update = jax.jit(update_archive, static_argnames="alpha")


def random_model(rng) -> dict[str, np.ndarray]:
    return {p: rng.normal(size=s).astype(np.float32) for p, s in SHAPES.items()}


def flatten(model) -> np.ndarray:
    """The documented layer-major order, in numpy."""
    parts = [np.asarray(model[p] if layer < 0 else model[p][layer]).ravel() for p, layer in EXPECTED_BLOCKS]
    return np.concatenate(parts).astype(np.float64)


def unflatten(vector) -> dict[str, np.ndarray]:
    out = {p: np.zeros(s) for p, s in SHAPES.items()}
    at = 0
    for p, layer in EXPECTED_BLOCKS:
        target = out[p] if layer < 0 else out[p][layer]
        target[...] = vector[at:at + target.size].reshape(target.shape)
        at += target.size
    return out


def numpy_child(a, b, w, split, interpolation="slerp"):
    """The released code's `slerp_w_splitpoint` on the flat vectors (float64)."""
    value = np.where(np.arange(a.size) < split, w, 1 - w)
    if interpolation == "slerp":
        omega = np.arccos(np.clip(np.dot(a / np.linalg.norm(a), b / np.linalg.norm(b)), -1, 1))
        if np.sin(omega) > 1e-6:
            return np.sin((1 - value) * omega) / np.sin(omega) * a + np.sin(value * omega) / np.sin(omega) * b
    return (1 - value) * a + value * b


def numpy_fitness(scores, filled, alpha):
    scores = np.where(filled[:, None], scores, 0.0).astype(np.float64)
    share = scores.sum(axis=0)
    matrix = scores / np.where(share > 0, share, 1.0) ** alpha
    return matrix, matrix.sum(axis=1)


def numpy_normalised(weights, filled):
    weights = np.where(filled, weights, 0.0)
    return weights / weights.sum() if weights.sum() > 0 else filled / filled.sum()


def numpy_replaced_slot(scores, filled, child_scores, alpha):
    """The row the child replaces (None: the child is the worst): least shared fitness over
    members and child, an empty slot first, the first index on a tie."""
    rows = np.concatenate([scores, child_scores[None]])
    present = np.concatenate([filled, [True]])
    _, fitness = numpy_fitness(rows, present, alpha)
    worst = int(np.argmin(np.where(present, fitness, -np.inf)))
    return None if worst == len(scores) else worst, np.sort(fitness[present])


def random_scores(rng, rows=N):
    """Scores in {0, 0.5, 1} (ties), one all-zero column."""
    scores = rng.choice([0.0, 0.5, 1.0], size=(rows, ITEMS)).astype(np.float32)
    scores[:, 2] = 0.0
    return scores


def archive_state(scores, filled=None) -> ArchiveState:
    filled = np.ones(len(scores), bool) if filled is None else filled
    return ArchiveState(scores=jnp.asarray(scores, jnp.float32), filled=jnp.asarray(filled),
                        member_ids=jnp.asarray(np.where(filled, np.arange(len(scores)), -1), jnp.int32))


@pytest.fixture(scope="module")
def world():
    rng = np.random.default_rng(0)
    models = [random_model(rng) for _ in range(N)]
    archive = {p: jnp.asarray(np.stack([m[p] for m in models])) for p in SHAPES}  # {path: [N, ...]}
    return models, archive, parameter_order({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in SHAPES.items()})


def test_order_is_layer_major_with_embeddings_first(world):
    _, _, order = world
    assert list(order.blocks) == EXPECTED_BLOCKS
    assert order.num_params == sum(int(np.prod(s)) for s in SHAPES.values()) == 79
    assert order.block_ids("layers.norm.weight").tolist() == [3, 5, 7]


def test_order_of_a_llava_puts_the_language_model_stack_before_the_vision_tower():
    shapes = {"language_model.embed_tokens.weight": (7, 4), "language_model.layers.mlp.kernel": (4, 4, 4),
              "language_model.norm.weight": (4,), "multi_modal_projector.linear_1.kernel": (3, 4),
              "vision_tower.embeddings.patch_embedding.weight": (3, 2), "vision_tower.post_layernorm.weight": (3,),
              "vision_tower.encoder.layers.fc1.kernel": (2, 3, 3)}
    order = parameter_order({p: jax.ShapeDtypeStruct(s, jnp.float32) for p, s in shapes.items()})
    assert [b for b in order.blocks] == [
        ("language_model.embed_tokens.weight", -1), ("vision_tower.embeddings.patch_embedding.weight", -1),
        *[("language_model.layers.mlp.kernel", i) for i in range(4)],
        *[("vision_tower.encoder.layers.fc1.kernel", i) for i in range(2)],
        ("language_model.norm.weight", -1), ("multi_modal_projector.linear_1.kernel", -1),
        ("vision_tower.post_layernorm.weight", -1)]
    with pytest.raises(ValueError, match="layers.b: the stack 'layers.' has leaves of different layer counts"):
        parameter_order({"layers.b": np.zeros((2, 3)), "layers.c": np.zeros((3, 3))})


@pytest.mark.parametrize("alpha", [1.0, 0.5, 2.0])
def test_selection_probabilities_equal_numpy(alpha):
    rng = np.random.default_rng(1)
    scores = random_scores(rng)
    filled = np.array([True, True, False, True, True])
    garbage = scores.copy()
    garbage[2] = 1.0  # an empty slot's row is ignored, whatever it holds
    matrix, fitness = shared_fitness(jnp.asarray(garbage), jnp.asarray(filled), alpha)
    want_matrix, want_fitness = numpy_fitness(scores, filled, alpha)
    np.testing.assert_allclose(matrix, want_matrix, atol=1e-6)
    np.testing.assert_allclose(fitness, want_fitness, atol=1e-6)
    probs = parent_probabilities(jnp.asarray(garbage), jnp.asarray(filled), alpha)
    np.testing.assert_allclose(probs, want_fitness / want_fitness.sum(), atol=1e-6)
    assert probs[2] == 0
    for a in np.flatnonzero(filled):
        attraction = np.maximum(0.0, want_matrix - want_matrix[a]).sum(axis=1)
        got = attraction_probabilities(jnp.asarray(garbage), jnp.asarray(filled), alpha, jnp.int32(a))
        np.testing.assert_allclose(got, numpy_normalised(attraction, filled), atol=1e-6)
        assert got[2] == 0 and not np.any(np.isnan(got))


def test_zero_sums_fall_back_to_uniform_over_the_filled_members():
    filled = jnp.asarray([True, False, True, True, False])
    zeros = jnp.zeros((N, ITEMS))
    uniform = np.array([1, 0, 1, 1, 0]) / 3
    np.testing.assert_allclose(parent_probabilities(zeros, filled, 1.0), uniform, atol=1e-7)
    np.testing.assert_allclose(attraction_probabilities(zeros, filled, 1.0, jnp.int32(0)), uniform, atol=1e-7)
    dominant = jnp.zeros((N, ITEMS)).at[0].set(1.0).at[2].set(1.0)  # slot 0 solves all; slot 2 is empty
    np.testing.assert_allclose(attraction_probabilities(dominant, filled, 1.0, jnp.int32(0)), uniform, atol=1e-7)
    state = ArchiveState(scores=zeros, filled=filled, member_ids=jnp.arange(N, dtype=jnp.int32))
    children = sample(jax.random.key(0), state, NicheConfig(N), 200, parameter_order({"x": np.zeros(3)}))
    assert set(np.asarray(children.a)) | set(np.asarray(children.b)) <= {0, 2, 3}


@pytest.fixture(scope="module")
def jitted_child():
    """child_params jitted once per config, the compiled functions shared by the tests."""
    return {interpolation: jax.jit(functools.partial(child_params, config=NicheConfig(N, interpolation=interpolation)),
                                   static_argnames="order")
            for interpolation in ("slerp", "linear")}


# (a, b, w, block, position): a split at 0, inside layer 0's kernel, at layer 1's first
# parameter, inside the vision stack's last layer, inside the output head, none (block = B).
SPLITS = [(0, 1, 0.3, 0, 0), (1, 3, 0.8, 2, 5), (2, 0, 0.45, 4, 0), (4, 2, 0.1, 9, 3), (3, 3, 0.6, 10, 14),
          (0, 4, 0.25, 12, 0)]


@pytest.mark.parametrize("interpolation", ["slerp", "linear"])
def test_child_equals_numpy(world, jitted_child, interpolation):
    models, archive, order = world
    for a, b, w, block, position in SPLITS:
        split = int(global_split_index(order, block, position))
        want = unflatten(numpy_child(flatten(models[a]), flatten(models[b]), w, split, interpolation))
        got = jitted_child[interpolation](archive, jnp.int32(a), jnp.int32(b), jnp.float32(w), jnp.int32(block),
                                          jnp.int32(position), order=order)
        for p in SHAPES:
            np.testing.assert_allclose(got[p], want[p], atol=1e-5, err_msg=f"{p} at {(a, b, w, block, position)}")


@pytest.mark.parametrize("interpolation", ["slerp", "linear"])
def test_task_arithmetic_children_equal_numpy(world, interpolation):
    """With a base: the parents' task vectors fused as above, the base added back."""
    models, archive, order = world
    base = random_model(np.random.default_rng(7))
    make = jax.jit(functools.partial(child_params, config=NicheConfig(N, interpolation=interpolation)),
                   static_argnames="order")
    for a, b, w, block, position in SPLITS[:3]:
        split = int(global_split_index(order, block, position))
        fused = numpy_child(flatten(models[a]) - flatten(base), flatten(models[b]) - flatten(base), w, split,
                            interpolation)
        want = unflatten(fused + flatten(base))
        got = make(archive, jnp.int32(a), jnp.int32(b), jnp.float32(w), jnp.int32(block), jnp.int32(position),
                   order=order, base={p: jnp.asarray(v) for p, v in base.items()})
        for p in SHAPES:
            np.testing.assert_allclose(got[p], want[p], atol=1e-5, err_msg=f"{p} at {(a, b, w, block, position)}")


def test_new_parents_and_splits_never_recompile(world):
    _, archive, order = world
    make = jax.jit(functools.partial(child_params, order=order, config=NicheConfig(N)))
    outputs = [make(archive, jnp.int32(a), jnp.int32(b), jnp.float32(w), jnp.int32(block), jnp.int32(position))
               for a, b, w, block, position in SPLITS[:3]]
    assert make._cache_size() == 1
    assert not np.allclose(outputs[0]["norm.weight"], outputs[1]["norm.weight"])


def test_children_batch_equals_one_by_one(world, jitted_child):
    _, archive, order = world
    columns = [jnp.asarray(c) for c in zip(*SPLITS, strict=True)]
    columns = [c.astype(jnp.float32 if i == 2 else jnp.int32) for i, c in enumerate(columns)]
    batch = jax.jit(jax.vmap(functools.partial(child_params, order=order, config=NicheConfig(N)),
                             (None, 0, 0, 0, 0, 0)))(archive, *columns)
    for k in range(len(SPLITS)):
        one = jitted_child["slerp"](archive, *(c[k] for c in columns), order=order)
        for p in SHAPES:
            np.testing.assert_allclose(batch[p][k], one[p], atol=1e-6)


def test_no_splitpoint_mixes_every_parameter_by_w(world, jitted_child):
    models, archive, order = world
    config = NicheConfig(N, splitpoint=False)
    state = ArchiveState(scores=jnp.asarray(random_scores(np.random.default_rng(2))), filled=jnp.ones(N, bool),
                         member_ids=jnp.arange(N, dtype=jnp.int32))
    children = sample(jax.random.key(1), state, config, 3, order)
    assert np.all(np.asarray(children.block) == order.num_blocks) and np.all(np.asarray(children.position) == 0)
    a, b, w = int(children.a[0]), int(children.b[0]), float(children.w[0])
    got = jitted_child["slerp"](archive, children.a[0], children.b[0], children.w[0], children.block[0],
                                children.position[0], order=order)  # the same child_params as without a split
    want = unflatten(numpy_child(flatten(models[a]), flatten(models[b]), w, order.num_params))
    for p in SHAPES:
        np.testing.assert_allclose(got[p], want[p], atol=1e-5)


def test_archive_update_equals_numpy(world):
    models, archive, _ = world
    rng = np.random.default_rng(3)
    child = random_model(rng)
    checked, compiled = 0, update._cache_size()
    for trial in range(30):
        scores = rng.uniform(size=(N, ITEMS)).astype(np.float32) * (rng.uniform(size=(N, ITEMS)) < 0.6)
        scores[:, 4] = 0.0
        child_scores = (rng.uniform(size=ITEMS) * (rng.uniform(size=ITEMS) < 0.6)).astype(np.float32)
        filled = np.ones(N, bool) if trial % 3 else rng.uniform(size=N) < 0.6
        scores[~filled] = 0.0
        alpha = [1.0, 0.5, 2.0][trial % 3]
        want, fitness = numpy_replaced_slot(scores, filled, child_scores, alpha)
        if filled.all() and fitness[1] - fitness[0] < 1e-4:
            continue  # a near tie: float32 may break it otherwise than float64
        ids = np.where(filled, np.arange(N), -1).astype(np.int32)
        state = ArchiveState(scores=jnp.asarray(scores), filled=jnp.asarray(filled), member_ids=jnp.asarray(ids))
        new_state, new_archive, slot = update(state, archive, jnp.asarray(child_scores),
                                              {p: jnp.asarray(v) for p, v in child.items()}, jnp.int32(99), alpha=alpha)
        assert int(slot) == (-1 if want is None else want), trial
        want_scores, want_filled, want_ids = scores.copy(), filled.copy(), ids.copy()
        if want is not None:
            want_scores[want], want_filled[want], want_ids[want] = child_scores, True, 99
        np.testing.assert_array_equal(new_state.scores, want_scores)
        np.testing.assert_array_equal(new_state.filled, want_filled)
        np.testing.assert_array_equal(new_state.member_ids, want_ids)
        for p in SHAPES:
            for row in range(N):
                np.testing.assert_array_equal(new_archive[p][row], child[p] if row == want else models[row][p])
        checked += 1
    assert checked >= 20
    assert update._cache_size() - compiled <= 3  # one per alpha: new scores, children and ids never recompile


def test_worst_child_changes_nothing_and_ties_replace_the_first():
    scores = jnp.asarray([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    state = ArchiveState(scores=scores, filled=jnp.ones(3, bool), member_ids=jnp.arange(3, dtype=jnp.int32))
    archive = {"x": jnp.arange(3.0)}
    same, same_archive, slot = update(state, archive, jnp.zeros(3), {"x": jnp.float32(9.0)}, 7, 1.0)
    assert int(slot) == -1 and np.array_equal(same.member_ids, [0, 1, 2])
    assert np.array_equal(same.scores, scores) and np.array_equal(same_archive["x"], [0.0, 1.0, 2.0])
    tied = ArchiveState(scores=scores.at[2].set(scores[1]), filled=state.filled, member_ids=state.member_ids)
    # slots 1 and 2 now share item 1 (fitness 1/2 each); the child solves item 2 alone (fitness 1)
    new, new_archive, slot = update(tied, archive, jnp.asarray([0.0, 0.0, 1.0]), {"x": jnp.float32(9.0)},
                                            7, 1.0)
    assert int(slot) == 1 and np.array_equal(new.member_ids, [0, 7, 2])
    assert np.array_equal(new_archive["x"], [0.0, 9.0, 2.0])


def test_sources_fill_an_empty_archive_in_order_then_compete(world):
    models, _, order = world
    config = NicheConfig(3)
    state, archive = empty_archive(config, ITEMS, models[0])
    # Source 0 solves nothing: the empty slots fill first all the same (the released code would
    # put source 1 in its place); sources 1-3 solve an item each, so source 3 replaces source 0;
    # source 4 solves nothing in a full archive: it stays out.
    source_scores = np.eye(ITEMS, dtype=np.float32)[:5]
    source_scores[[0, 4]] = 0.0
    slots = []
    for k in range(5):
        state, archive, slot = update(state, archive, jnp.asarray(source_scores[k]),
                                              {p: jnp.asarray(v) for p, v in models[k].items()}, k, config.alpha)
        slots.append(int(slot))
    assert slots == [0, 1, 2, 0, -1]
    assert np.array_equal(state.member_ids, [3, 1, 2]) and bool(state.filled.all())
    np.testing.assert_array_equal(archive["norm.weight"][1], models[1]["norm.weight"])
    np.testing.assert_array_equal(coverage(state), np.pad(np.ones(3), (1, ITEMS - 4)))
    children = sample(jax.random.key(0), state, config, 4, order)
    assert len(child_records(children, state.member_ids, order)) == 4


def test_update_in_order_equals_updates_one_by_one(world):
    models, archive, _ = world
    rng = np.random.default_rng(4)
    scores = rng.uniform(size=(N, ITEMS)).astype(np.float32)
    state = archive_state(scores)
    children = [random_model(rng) for _ in range(3)]
    child_scores = np.stack([scores[0] * 2 % 1, np.ones(ITEMS), np.zeros(ITEMS)]).astype(np.float32)
    batch = {p: jnp.asarray(np.stack([c[p] for c in children])) for p in SHAPES}
    ids = jnp.asarray([10, 11, 12], jnp.int32)
    got_state, got_archive, got_slots = jax.jit(update_archive_in_order, static_argnames="alpha")(
        state, archive, jnp.asarray(child_scores), batch, ids, alpha=1.0)
    want_state, want_archive, want_slots = state, archive, []
    for k in range(3):
        want_state, want_archive, slot = update(want_state, want_archive, jnp.asarray(child_scores[k]),
                                                        {p: v[k] for p, v in batch.items()}, ids[k], 1.0)
        want_slots.append(int(slot))
    assert np.asarray(got_slots).tolist() == want_slots and want_slots[1] >= 0 and want_slots[2] == -1
    np.testing.assert_array_equal(got_state.member_ids, want_state.member_ids)
    for p in SHAPES:
        np.testing.assert_array_equal(got_archive[p], want_archive[p])


@pytest.mark.parametrize("matchmaker", [True, False])
def test_parents_are_drawn_with_their_probabilities(matchmaker):
    rng = np.random.default_rng(5)
    scores = random_scores(rng)
    filled = np.array([True, True, True, False, True])
    scores[~filled] = 0.0
    state = archive_state(scores, filled)
    config = NicheConfig(N, matchmaker=matchmaker)
    draws = 4000
    children = sample(jax.random.key(2), state, config, draws, parameter_order({"x": np.zeros(7)}))
    a, b = np.asarray(children.a), np.asarray(children.b)
    matrix, fitness = numpy_fitness(scores, filled, config.alpha)
    probs = numpy_normalised(fitness, filled)
    np.testing.assert_allclose(np.bincount(a, minlength=N) / draws, probs, atol=0.03)
    assert not np.any(a == 3) and not np.any(b == 3)
    first = np.bincount(a).argmax()
    given = b[a == first]
    want_b = numpy_normalised(np.maximum(0.0, matrix - matrix[first]).sum(axis=1), filled) if matchmaker else probs
    np.testing.assert_allclose(np.bincount(given, minlength=N) / given.size, want_b, atol=0.05)
    w = np.asarray(children.w)
    assert 0 <= w.min() and w.max() < 1 and abs(w.mean() - 0.5) < 0.03


def test_split_points_are_uniform_over_the_parameters(world):
    _, _, order = world
    draws = 24_000
    children = sample(
        jax.random.key(3), ArchiveState(jnp.ones((N, ITEMS)), jnp.ones(N, bool), jnp.arange(N, dtype=jnp.int32)),
        NicheConfig(N), draws, order)
    block, position = np.asarray(children.block), np.asarray(children.position)
    assert np.all(position < np.asarray(order.sizes)[block]) and np.all(position >= 0)
    split = global_split_index(order, block, position)
    assert split.dtype == np.int64 and split.min() >= 0 and split.max() < order.num_params
    counts = np.bincount(split, minlength=order.num_params)
    expected = draws / order.num_params
    chi_square = np.sum((counts - expected) ** 2 / expected)  # df 78: mean 78, sd 12.5
    assert chi_square < 160 and counts.min() > 0
    records = child_records(Children(children.a[:2], children.b[:2], children.w[:2], children.block[:2],
                                     children.position[:2]), np.arange(N) + 100, order)
    assert records[0]["split"] == int(split[0]) and records[1]["parent_a"] == int(children.a[1]) + 100


def test_split_points_of_a_model_past_int32():
    """n above 2^33 (7B-sized): blocks and positions in int32, the global index exact in int64."""
    shapes = {"embed_tokens.weight": (3, 5), "layers.kernel": (40, 2**14, 2**14 - 3), "norm.weight": (7,)}
    order = parameter_order({p: jax.ShapeDtypeStruct(s, jnp.bfloat16) for p, s in shapes.items()})
    assert order.num_params == 15 + 40 * 2**14 * (2**14 - 3) + 7 > 2**33
    state = ArchiveState(jnp.ones((2, 1)), jnp.ones(2, bool), jnp.arange(2, dtype=jnp.int32))
    children = sample(jax.random.key(4), state, NicheConfig(2), 4000, order)
    block, position = np.asarray(children.block), np.asarray(children.position)
    assert np.all(position < np.asarray(order.sizes)[block])
    split = global_split_index(order, block, position)
    assert split.max() < order.num_params
    fraction = split / order.num_params
    assert abs(fraction.mean() - 0.5) < 0.02 and abs(np.mean(fraction < 0.25) - 0.25) < 0.03
    assert np.all((block >= 1) & (block <= 40))  # the embeddings and the norm: 22 in 1.07e10
    assert int(global_split_index(order, 41, 6)) == order.num_params - 1


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="NicheConfig.interpolation must be one of slerp, linear"):
        NicheConfig(4, interpolation="cubic")
    with pytest.raises(ValueError, match="NicheConfig.alpha"):
        NicheConfig(4, alpha=-1.0)
    with pytest.raises(ValueError, match="NicheConfig.archive_size"):
        NicheConfig(0)
