"""The ja_vlm experiment (the README's main job) end to end on the shipped toy VLM world."""

import dataclasses

import numpy as np
import torch
from transformers import LlavaForConditionalGeneration

import jaxmerge
from jaxmerge.experiments import ja_vlm
from jaxmerge.testing import toy_vlm_world as tv


def test_toy_images_differ_by_colour_and_shape():
    rng = np.random.default_rng(0)
    scene = tv.Scene("red", "circle", (16, 16), 8)
    image = tv.draw(scene, rng)
    assert tuple(image[16, 16]) == tv.RGB["red"] and image.shape == (tv.IMAGE_SIZE, tv.IMAGE_SIZE, 3)
    square = tv.draw(tv.Scene("red", "square", (16, 16), 8), rng)
    assert (square != image).any(axis=-1).mean() > 0.5  # noise and shape differ
    pixels = tv.pixel_values(image[None])
    assert pixels.shape == (1, 3, tv.IMAGE_SIZE, tv.IMAGE_SIZE) and pixels.dtype == np.float32


def test_blind_column_questions_say_nothing_of_the_column():
    """The Japanese LM's guesses: the question after as many characters as an image has
    tokens, none a digit, answered in the Japanese form."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        prompt, answer = tv.text_example("ja_where_blind", rng)
        context = prompt[:-len(tv.JA_WHERE_Q)]
        assert prompt.endswith(tv.JA_WHERE_Q) and len(context) == (tv.IMAGE_SIZE // tv.PATCH_SIZE) ** 2
        assert not any(c.isdigit() for c in context) and answer[0] in "1234" and answer[1:] == "れつ"


def test_toy_vlm_world_builds(tmp_path):
    """build_world's stages run end to end (a few steps each) into checkpoints that load."""
    steps = tv.Steps(base=2, japanese=2, projector=2, vlm=2, batch_size=4)
    lm = dataclasses.replace(tv.LM, num_layers=1)  # one layer of each: compiled in a fraction of the time
    vision = dataclasses.replace(tv.VISION, num_layers=1)
    paths = tv.build_world(tmp_path / "world", seed=5, steps=steps, lm=lm, vision=vision)
    assert set(paths) == {"base", "japanese", "vlm"}
    vlm = jaxmerge.load(paths["vlm"])
    assert vlm.config.image_features == (tv.IMAGE_SIZE // tv.PATCH_SIZE) ** 2
    assert jaxmerge.load(paths["japanese"]).config.vocab_size == len(tv.build_tokenizer())


def test_ja_vlm_toy_run(tmp_path):
    out = tmp_path / "run"
    results = ja_vlm.main(["--out", str(out), "--generations", "2", "--dfs-generations", "2", "--test-size", "8",
                           "--population", "4", "--dfs-population", "4"])  # small: the run's structure is checked
    kinds = [row["kind"] for row in results["rows"]]
    assert kinds == ["source", "source", "trivial", "merge", "merge", "merge", "evolved", "evolved", "evolved"]
    assert results["search"]["method"] == "task_arithmetic"  # the toy's default operator (real checkpoints: dare_ties)
    assert (out / "merged_dfs" / "modeling_layer_path.py").exists()
    assert (out / "path_ps_dfs.png").exists()
    assert set(results["rows"][-1]["scores"]) == {"ja_vqa_rouge_l", "ja_vqa_exact", "en_vqa", "ja_text_qa"}
    for name in ("results.json", "results.md", "fitness.png", "genome.png", "recipe.yml", "merged/config.json"):
        assert (out / name).exists(), name
    # The merged VLM is a real LLaVA checkpoint: transformers opens it and agrees with us;
    # its vision tower is the source VLM's, untouched.
    merged, source = jaxmerge.load(out / "merged"), jaxmerge.load(tv.world_dir(0) / "vlm")
    np.testing.assert_array_equal(merged.vision_tower.embeddings.class_embedding[...],
                                  source.vision_tower.embeddings.class_embedding[...])
    hf = LlavaForConditionalGeneration.from_pretrained(out / "merged", dtype=torch.float32).eval()
    features = merged.config.image_features
    ids = np.array([[1] + [merged.config.image_token_id] * features + [10, 11, 12]])
    pixels = tv.pixel_values(tv.draw(tv.random_scene(np.random.default_rng(1)), np.random.default_rng(2))[None])
    with torch.no_grad():
        theirs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels)).logits.numpy()
    np.testing.assert_allclose(np.asarray(merged(ids, pixel_values=pixels)), theirs, atol=1e-4)


def test_ja_vlm_real_checkpoint_mode(tmp_path):
    """--vlm/--ja-lm/--base with JSONL image sets through the VLM's own transformers
    processor: the paper's setting, here on the toy checkpoints as files."""
    import json

    from PIL import Image

    world = tv.world_dir(0)
    rng = np.random.default_rng(3)
    for name, count in (("fitness", 24), ("test", 12)):
        rows = []
        for i in range(count):
            image, question, answer = tv.image_example("ja", rng)
            Image.fromarray(image).save(tmp_path / f"{name}{i}.png")
            rows.append({"image": f"{name}{i}.png", "question": question, "answer": answer})
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    results = ja_vlm.main(["--out", str(tmp_path / "run"), "--vlm", str(world / "vlm"), "--ja-lm",
                           str(world / "japanese"), "--base", str(world / "base"),
                           "--fitness-set", str(tmp_path / "fitness.jsonl"), "--test-set", str(tmp_path / "test.jsonl"),
                           "--prompt-template", "<image>{question}", "--validation-size", "8", "--minibatch", "8",
                           "--max-new-tokens", "6", "--generations", "2", "--population", "4",
                           "--no-dfs"])
    assert results["splits"] == {"ja_vqa": {"fitness": 16, "validation": 8, "test": 12}}
    assert set(results["rows"][0]["scores"]) == {"ja_vqa_rouge_l", "ja_vqa_exact"}
    assert "token ROUGE-L F, in japanese" in results["fitness"]  # the real default
    assert (tmp_path / "run" / "merged" / "config.json").exists()


def _toy_llava_next(world, out):
    """The toy VLM as a LLaVA-NeXT checkpoint (its weights, a random image_newline, anyres
    tiles of 32 x 32), saved with a transformers LlavaNextProcessor."""
    import dataclasses
    import tempfile
    from pathlib import Path

    from flax import nnx
    from transformers import AutoTokenizer, LlavaNextImageProcessorPil, LlavaNextProcessor

    from jaxmerge.models.llava import Llava

    vlm = jaxmerge.load(world / "vlm")
    config = dataclasses.replace(vlm.config, image_grid_pinpoints=((32, 64), (64, 32), (64, 64)))
    graphdef, state = nnx.split(Llava(config, rngs=nnx.Rngs(0)))
    source = nnx.state(vlm)
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        state[part] = source[part]
    state["image_newline"] = nnx.Param(jax_normal(config.text.hidden_size))
    model = nnx.merge(graphdef, state)
    tokenizer = AutoTokenizer.from_pretrained(world / "vlm")
    images = LlavaNextImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                        image_grid_pinpoints=[[32, 64], [64, 32], [64, 64]],
                                        image_mean=list(tv.MEAN), image_std=list(tv.STD))
    processor = LlavaNextProcessor(image_processor=images, tokenizer=tokenizer, patch_size=tv.PATCH_SIZE,
                                   vision_feature_select_strategy="default", image_token=tv.IMAGE_TOKEN,
                                   num_additional_image_tokens=1)
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        files = {f.name: f.read_text() for f in Path(tmp).iterdir() if f.name.endswith("processor_config.json")}
    return jaxmerge.save(model, out, architecture="LlavaNextForConditionalGeneration", tokenizer_dir=world / "vlm",
                         extra_files=files)


def jax_normal(size):
    import jax.numpy as jnp
    return jnp.asarray(np.random.default_rng(0).normal(0, 0.1, size), jnp.float32)


def test_ja_vlm_real_mode_with_llava_next(tmp_path):
    """The paper's VLM is LLaVA-1.6 (NeXT): images of several sizes become different tile
    counts and image-token counts; the search and the tables run through them."""
    import json

    from PIL import Image

    world = tv.world_dir(0)
    next_dir = _toy_llava_next(world, tmp_path / "next")
    rng = np.random.default_rng(4)
    shapes = [(32, 32), (64, 32), (40, 72), (50, 50)]  # (height, width) after upscaling the toy image
    for name, count in (("fitness", 16), ("test", 8)):
        rows = []
        for i in range(count):
            image, question, answer = tv.image_example("ja", rng)
            h, w = shapes[i % len(shapes)]
            Image.fromarray(image).resize((w, h)).save(tmp_path / f"{name}{i}.png")
            rows.append({"image": f"{name}{i}.png", "question": question, "answer": answer})
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    results = ja_vlm.main(["--out", str(tmp_path / "run"), "--vlm", str(next_dir), "--ja-lm",
                           str(world / "japanese"), "--base", str(world / "base"),
                           "--fitness-set", str(tmp_path / "fitness.jsonl"), "--test-set", str(tmp_path / "test.jsonl"),
                           "--prompt-template", "<image>{question}", "--validation-size", "8", "--minibatch", "4",
                           "--max-new-tokens", "4", "--generations", "2", "--population", "4",
                           "--dfs-generations", "1", "--dfs-population", "4"])
    assert results["splits"] == {"ja_vqa": {"fitness": 8, "validation": 8, "test": 8}}
    merged = jaxmerge.load(tmp_path / "run" / "merged")
    assert merged.config.is_next
    np.testing.assert_array_equal(np.asarray(merged.image_newline), np.asarray(jaxmerge.load(next_dir).image_newline))


def test_ja_vlm_default_operator():
    """Task arithmetic on the toy (DARE's random drops are noise at its size), the paper's
    DARE-TIES on real checkpoints; --method overrides both."""
    assert ja_vlm.parse_args([]).method == "task_arithmetic"
    real = ["--vlm", "v", "--ja-lm", "j", "--base", "b", "--fitness-set", "f", "--test-set", "t"]
    assert ja_vlm.parse_args(real).method == "dare_ties"
    assert ja_vlm.parse_args(["--method", "dare_ties"]).method == "dare_ties"


def test_ja_vlm_default_fitness():
    """ROUGE-L on real checkpoints (free-form answers, the paper's metric), exact match on
    the toy's one-word answers; --fitness overrides both."""
    assert ja_vlm.parse_args([]).fitness == "exact"
    real = ["--vlm", "v", "--ja-lm", "j", "--base", "b", "--fitness-set", "f", "--test-set", "t"]
    assert ja_vlm.parse_args(real).fitness == "rouge_l"
    assert ja_vlm.parse_args(real + ["--fitness", "exact"]).fitness == "exact"


def test_toy_tokenizer_is_the_shipped_worlds():
    """The toy tokenizer is built in a fixed order (not a set's hash order, which changes
    per process), so a rebuilt world has the shipped world's token ids; with that, a
    rebuild of seed 0 reproduced the shipped weights exactly."""
    from transformers import AutoTokenizer

    shipped = AutoTokenizer.from_pretrained(tv.world_dir(0) / "vlm")
    assert tv.build_tokenizer().get_vocab() == shipped.get_vocab()


def test_natural_niches_fuses_a_vlms_language_model_and_its_provenance_rederives_it(tmp_path):
    """Issue #30 on a VLM: the archive fuses the VLM's language model with the Japanese LLM
    (vocabularies aligned), each member scored in the VLM's place; merged/ is a LLaVA whose
    vision tower is the source VLM's, and `jaxmerge merge provenance.json` rebuilds it."""
    from jaxmerge import cli
    from jaxmerge.merge.tree import flat_params

    out = tmp_path / "run"
    results = ja_vlm.main(["--out", str(out), "--strategy", "natural_niches", "--generations", "2",
                           "--test-size", "8", "--population", "4"])
    assert results["search"]["strategy"] == "natural_niches" and results["best"]["name"] == "niches"
    assert [r["model"] for r in results["rows"] if r["kind"] == "source"] == [
        "vlm", "japanese in the VLM's place (its vision, projector)"]
    merged, source = jaxmerge.load(out / "merged"), jaxmerge.load(tv.world_dir(0) / "vlm")
    np.testing.assert_array_equal(merged.vision_tower.embeddings.class_embedding[...],
                                  source.vision_tower.embeddings.class_embedding[...])
    assert cli.main(["merge", str(out / "provenance.json"), str(tmp_path / "again")]) in (None, 0)
    again = flat_params(jaxmerge.load(tmp_path / "again"))
    for path, value in flat_params(merged).items():
        np.testing.assert_allclose(np.asarray(again[path]), np.asarray(value), atol=1e-5, rtol=1e-5)
