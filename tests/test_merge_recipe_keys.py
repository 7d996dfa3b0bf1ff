"""Recipe keys and `jaxmerge merge` flags as mergekit 0.1.5 treats them, and random merges
(DARE, DELLA) that an exported recipe rebuilds bit for bit through its `jaxmerge_seed`."""

import logging

import jax
import numpy as np
import pytest
import torch
import yaml
from conftest import write_fine_tuned_family
from safetensors.numpy import load_file

from jaxmerge import cli
from jaxmerge.merge.plan import RecipeError
from jaxmerge.merge.recipe import SEED_KEY, merge_from_yaml, parse_recipe, seeded_text

mergekit = pytest.importorskip("mergekit")
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.merge_methods import registry as mergekit_methods  # noqa: E402
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402
from mergekit.sparsify import della_magprune  # noqa: E402


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """A base with tokenizer and generation files, and three fine-tunes of it (base + noise)."""
    root = tmp_path_factory.mktemp("family")
    write_fine_tuned_family(root, num_hidden_layers=2)
    (root / "base" / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    (root / "base" / "generation_config.json").write_text('{"bos_token_id": 1}')
    return root


@pytest.fixture
def records(caplog):
    """jaxmerge's log records (its logger does not propagate to the root's)."""
    logger = logging.getLogger("jaxmerge")
    logger.addHandler(caplog.handler)
    caplog.set_level(logging.INFO, logger="jaxmerge")
    yield caplog
    logger.removeHandler(caplog.handler)


def read(directory):
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(f))
    return tensors


def assert_bits(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        np.testing.assert_array_equal(ours[key].view(np.uint8), theirs[key].view(np.uint8), err_msg=key)


def write(path, text: str):
    path.write_text(text)
    return path


# ----------------------------------------------------------------------------- keys


SLERP = """\
merge_method: slerp
base_model: {f}/base
slices:
  - sources:
      - {{model: {f}/base, layer_range: [0, 2], parameters: {{weight: 1.0}}}}
      - {{model: {f}/ft0, layer_range: [0, 2], parameters: {{weight: 0.3}}, note: tuned}}
    residual_weight: 0.5
parameters: {{t: [0.2, 0.7]}}
dtype: float32
comment: an evolved merge
"""

MODEL_STOCK = """\
merge_method: model_stock
base_model: {f}/base
models:
  - {{model: {f}/ft0, parameters: {{weight: 0.6}}}}
  - {{model: {f}/ft1, parameters: {{weight: 0.4}}}}
  - {{model: {f}/base, parameters: {{weight: 1.0}}}}
dtype: float32
"""


@pytest.mark.parametrize("recipe,ignored", [
    (SLERP, {"weight", "note", "residual_weight", "comment"}),
    (MODEL_STOCK, {"weight"}),
])
def test_keys_mergekit_ignores_are_ignored_with_a_warning(family, tmp_path, records, recipe, ignored):
    """slerp and model_stock entries carrying `weight:`, keys mergekit's schema does not read
    (a source's, a slice's `residual_weight`, a top-level one): one warning per key, naming
    where it is, and the merge mergekit makes of the same recipe."""
    path = write(tmp_path / "recipe.yml", recipe.format(f=family))
    ours = read(merge_from_yaml(path, tmp_path / "ours", progress=False))
    warned = {r.getMessage() for r in records.records if r.levelno == logging.WARNING}
    for key in ignored:
        assert any(f"ignoring {key!r} as mergekit does" in m for m in warned), (key, warned)
    assert any("recipe.slices[0].sources[0].parameters: ignoring 'weight'" in m or
               "recipe.models[0].parameters: ignoring 'weight'" in m for m in warned)
    config = MergeConfiguration.model_validate(yaml.safe_load(path.read_text()))
    run_merge(config, str(tmp_path / "theirs"), options=MergeOptions(quiet=True, copy_tokenizer=False))
    theirs = read(tmp_path / "theirs")
    assert ours.keys() == theirs.keys()
    for key in ours:
        np.testing.assert_allclose(ours[key], theirs[key], rtol=0, atol=1e-5, err_msg=key)


def test_what_mergekit_reads_elsewhere_warns_and_what_it_uses_is_refused(tmp_path, records):
    """A merge-wide parameter among a model's own (mergekit reads it from slices and the recipe
    only), a parameter of the base (ties never reads one) and a method's stray option are
    ignored with a warning; a key that changes mergekit's merge and jaxmerge lacks is refused."""
    recipe = parse_recipe("merge_method: ties\nbase_model: b\nmodels:\n"
                          "  - {model: b, parameters: {weight: 1}}\n"
                          "  - {model: m, parameters: {weight: 0.5, density: 0.5, lambda: 2, densty: 0.1}}\n"
                          "parameters: {int8_mask: true, normalize: false}\n", base_dir=tmp_path)
    source = next(s for s in recipe.slices[0].sources if s.model.endswith("/m"))
    assert source.parameters == {"weight": 0.5, "density": 0.5}
    assert recipe.parameters == {"int8_mask": True, "normalize": False}
    warned = " ".join(r.getMessage() for r in records.records if r.levelno == logging.WARNING)
    assert "recipe.models[1].parameters: ignoring 'lambda'" in warned
    assert "recipe.models[1].parameters: ignoring 'densty'" in warned
    assert "recipe.models[0].parameters: ignoring 'weight'" in warned
    records.clear()
    parse_recipe("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\n"
                 "parameters: {int8_mask: true, rescale: true}\n", base_dir=tmp_path)
    warned = " ".join(r.getMessage() for r in records.records)
    assert "ignoring 'int8_mask'" in warned and "ignoring 'rescale'" in warned
    for key in ("chat_template: x", "tokenizer: {source: base}", "modules: {}"):
        with pytest.raises(RecipeError, match=f"recipe: unsupported key.*'{key.split(':')[0]}'"):
            parse_recipe(f"merge_method: linear\nmodels: [{{model: a, parameters: {{weight: 1}}}}]\n{key}\n")


@pytest.mark.parametrize("density,epsilon", [
    (0.7, 0.3),  # 0.7 + 0.3 is 0.9999999999999999 in float64: mergekit accepts it
    (0.9, 0.1),  # ... and 0.9 + 0.1 is 1.0: refused
    (0.5, 0.5), (0.3, 0.3), (0.2, 0.25), (0.5, -0.1), (1.0, 0.5), (0.0, 0.5),
])
def test_della_epsilon_is_refused_where_mergekit_refuses_it(family, tmp_path, density, epsilon):
    try:
        della_magprune(torch.linspace(-1, 1, 16).reshape(4, 4), density, epsilon)
        mergekit_accepts = True
    except ValueError:
        mergekit_accepts = False
    path = write(tmp_path / "della.yml", f"merge_method: della\nbase_model: {family}/base\nmodels:\n"
                                         f"  - {{model: {family}/ft0, parameters: {{weight: 1.0}}}}\n"
                                         f"parameters: {{density: {density}, epsilon: {epsilon}}}\n")
    if mergekit_accepts:
        merge_from_yaml(path, tmp_path / "out", progress=False)
    else:
        with pytest.raises(RecipeError, match=r"della with density .* epsilon .*must lie in \(0, 1\)"):
            merge_from_yaml(path, tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()


def test_della_epsilon_is_checked_per_tensor(family, tmp_path):
    """A gradient takes density to 0.9 at the last layer: epsilon 0.1 is refused there."""
    path = write(tmp_path / "della.yml", f"merge_method: della_linear\nbase_model: {family}/base\nmodels:\n"
                                         f"  - {{model: {family}/ft0, parameters: {{weight: 1.0}}}}\n"
                                         f"parameters: {{density: [0.5, 0.9], epsilon: 0.1}}\n")
    with pytest.raises(RecipeError, match=r"density 0\.9 and epsilon 0\.1 .*tensor model\.layers\.1\."):
        merge_from_yaml(path, tmp_path / "out", progress=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_int8_mask_cannot_change_mergekits_merge(dtype):
    """mergekit's int8_mask makes its sign masks int8 instead of the merge dtype: values -1, 0,
    1, exact in both, compared into a bool mask either way (sce's 0/1 selection multiplies
    exactly). Half-precision task vectors with many ties and zeros give the same bits, so
    jaxmerge takes the flag as the no-op it is."""
    generator = torch.Generator().manual_seed(0)
    base = torch.randint(-4, 5, (32, 48), generator=generator).to(dtype) * 0.125
    tensors = [base] + [base + torch.randint(-2, 3, (32, 48), generator=generator).to(dtype) * 0.0625
                        for _ in range(3)]
    group = TensorGroup.from_tensors(tensors, base_index=0)
    for name, parameters in (("ties", {"weight": [0.5, 0.3, 0.2], "density": 0.5}),
                             ("dare_ties", {"weight": [0.5, 0.3, 0.2], "density": 1.0}),
                             ("sce", {"select_topk": 0.5})):
        method = mergekit_methods.get(name)
        with_int8, = method([group], parameters={**parameters, "int8_mask": True})
        without, = method([group], parameters={**parameters, "int8_mask": False})
        assert with_int8.dtype == dtype and torch.equal(with_int8.view(torch.int16), without.view(torch.int16)), name


# ----------------------------------------------------------------------------- flags


def test_every_mergekit_yaml_flag_parses(family, tmp_path, records):
    """mergekit-yaml 0.1.5's command line (mergekit/options.py) runs: --out-shard-size (bytes,
    mergekit's 1M = 10^6), --random-seed and --no-copy-tokenizer are honoured, the rest noted."""
    path = write(tmp_path / "r.yml", f"merge_method: dare_linear\nbase_model: {family}/base\nmodels:\n"
                                     f"  - {{model: {family}/ft0, parameters: {{weight: 0.5, density: 0.5}}}}\n")
    flags = ["--cuda", "--no-copy-tokenizer", "--lazy-unpickle", "--allow-crimes", "--out-shard-size", "20k",
             "--write-model-card", "--safe-serialization", "--no-safe-serialization", "--trust-remote-code",
             "--random-seed", "5", "--lora-merge-cache", str(tmp_path / "lora"), "--lora-merge-dtype", "bfloat16",
             "--low-cpu-memory", "--clone-tensors", "--transformers-cache", str(tmp_path / "hf"), "-v", "-v",
             "--device", "auto", "--read-to-gpu", "--multi-gpu", "--gpu-rich", "--num-threads", "2", "-j", "2",
             "--async-write", "--write-threads", "2", "--quiet", "--unsafe-truncate-embeddings", "--no-cuda",
             "--cuda"]
    assert cli.main(["merge", str(path), str(tmp_path / "out"), *flags]) == 0
    lines = [r.getMessage() for r in records.records]
    notes = [line for line in lines if line.startswith("note: ")]
    for flag in ("--cuda", "--lazy-unpickle", "--allow-crimes", "--write-model-card", "--no-safe-serialization",
                 "--trust-remote-code", "--lora-merge-cache", "--lora-merge-dtype", "--low-cpu-memory",
                 "--clone-tensors", "--device", "--read-to-gpu", "--multi-gpu", "--gpu-rich", "--num-threads",
                 "--async-write", "--write-threads", "--unsafe-truncate-embeddings"):
        assert sum(line.startswith(f"note: {flag}: accepted") for line in notes) == 1, flag
    assert jax.default_backend() in next(line for line in notes if line.startswith("note: --cuda"))
    assert "dare_linear masks drawn from seed 5" in lines
    out_dir = tmp_path / "out"
    assert yaml.safe_load((out_dir / "mergekit_config.yml").read_text())[SEED_KEY] == 5
    assert not (out_dir / "tokenizer_config.json").exists() and not (out_dir / "generation_config.json").exists()
    # the same merge from jaxmerge's own flags: the same tensors in the same shards
    own = tmp_path / "own"
    assert cli.main(["merge", str(path), str(own), "--seed", "5", "--shard-size", "20KB"]) == 0
    assert_bits(read(own), read(out_dir))
    shards = sorted(p.name for p in out_dir.glob("*.safetensors"))
    assert len(shards) > 1 and shards == sorted(p.name for p in own.glob("*.safetensors"))
    assert (own / "tokenizer_config.json").exists() and (own / "generation_config.json").exists()
    assert cli.main(["merge", str(path), str(tmp_path / "x"), "--shard-size", "1GB", "--out-shard-size", "1B"]) == 2
    assert cli.main(["merge", str(path), str(tmp_path / "y"), "--no-write-model-card", "--quiet"]) == 0
    assert not (tmp_path / "y" / "mergekit_config.yml").exists()


# ----------------------------------------------------------------------------- seeds


def test_seeded_text_sets_the_key_and_keeps_the_rest():
    assert seeded_text("merge_method: x  # m\nmodels: []\n", 3, "r") == \
        "merge_method: x  # m\nmodels: []\njaxmerge_seed: 3\n"
    assert seeded_text("merge_method: x\njaxmerge_seed: 1 # s\n", 9, "r") == "merge_method: x\njaxmerge_seed: 9 # s\n"
    assert yaml.safe_load(seeded_text("{merge_method: x, models: []}", 4, "r"))[SEED_KEY] == 4
    with pytest.raises(RecipeError, match="recipe.jaxmerge_seed: expected an integer from 0 to 4294967295"):
        parse_recipe("merge_method: linear\nmodels: [{model: a, parameters: {weight: 1}}]\njaxmerge_seed: -1\n")


def test_split_is_the_fold_the_streamed_merge_uses():
    """The in-memory merge splits a key over layers and sources, the streamed one folds the
    index in: the same keys under JAX's default (partitionable) threefry."""
    key = jax.random.key(7)
    for n, i in ((6, 0), (6, 5), (3, 2)):
        assert (jax.random.key_data(jax.random.split(key, n)[i]) == jax.random.key_data(jax.random.fold_in(key, i))
                ).all()


@pytest.fixture(scope="module")
def evolved(family, tmp_path_factory):
    """An evolve run's DARE-TIES merge (per layer, search.seed 7) exported as `evolve` exports
    it: merged/ with its mergekit_config.yml, and the recipe."""
    import jaxmerge
    from jaxmerge.pipeline.config import EvolveConfig, GenomeConfig, SearchSettings
    from jaxmerge.pipeline.problem import MergeProblem
    from jaxmerge.pipeline.sources import Sources

    paths = [str(family / n) for n in ("ft0", "ft1")]
    config = EvolveConfig(GenomeConfig(tuple(paths), str(family / "base"), merge_method="dare_ties",
                                       layer_granularity=1), tasks=(), search=SearchSettings(seed=7))
    sources = Sources([jaxmerge.load(p) for p in paths], jaxmerge.load(family / "base"), ["ft0", "ft1"], paths,
                      str(family / "base"), None, None, None)
    problem = MergeProblem.from_config(config, sources)
    genome = problem.space.initial() + 0.3 * jax.random.normal(jax.random.key(1), (problem.space.num_dims,))
    out = tmp_path_factory.mktemp("evolved")
    recipe = problem.export(genome, out / "merged", inputs=[*paths, str(family / "base")])
    assert recipe == problem.recipe(genome)  # front recipes are written by problem.recipe
    return out, recipe


def test_an_evolved_dare_ties_recipe_rebuilds_the_merge_bit_for_bit(evolved, tmp_path):
    out, recipe = evolved
    assert yaml.safe_load(recipe)[SEED_KEY] == 7 and "slices" in yaml.safe_load(recipe)
    assert (out / "merged" / "mergekit_config.yml").read_text() == recipe
    assert cli.main(["merge", str(out / "merged" / "mergekit_config.yml"), str(tmp_path / "rebuilt")]) == 0
    assert_bits(read(tmp_path / "rebuilt"), read(out / "merged"))
    assert (tmp_path / "rebuilt" / "mergekit_config.yml").read_text() == recipe
    # --seed overrides the recipe's: other masks, and the recipe written beside them says so
    assert cli.main(["merge", str(out / "merged" / "mergekit_config.yml"), str(tmp_path / "other"),
                     "--seed", "8"]) == 0
    other, merged = read(tmp_path / "other"), read(out / "merged")
    assert any((other[k] != merged[k]).any() for k in merged)
    assert yaml.safe_load((tmp_path / "other" / "mergekit_config.yml").read_text())[SEED_KEY] == 8


def test_an_exported_della_recipe_rebuilds_the_merge_bit_for_bit(family, tmp_path):
    """`save_merged` (the genome's merge in memory) and `jaxmerge merge` of the recipe it wrote."""
    import jaxmerge
    from jaxmerge.search import GenomeSpace
    from jaxmerge.search.export import save_merged

    space = GenomeSpace("della", num_sources=2, num_layers=2, layer_groups=1)
    genome = np.asarray(space.initial()) + 0.1 * np.asarray(jax.random.normal(jax.random.key(3), (space.num_dims,)))
    paths = [str(family / n) for n in ("base", "ft1", "ft2")]
    ours = save_merged(space, genome, jaxmerge.load(paths[0]), [jaxmerge.load(p) for p in paths[1:]],
                       tmp_path / "merged", base_path=paths[0], source_paths=paths[1:], seed=11)
    assert yaml.safe_load((ours / "mergekit_config.yml").read_text())[SEED_KEY] == 11
    assert cli.main(["merge", str(ours / "mergekit_config.yml"), str(tmp_path / "rebuilt")]) == 0
    assert_bits(read(tmp_path / "rebuilt"), read(ours))
