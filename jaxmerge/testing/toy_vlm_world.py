"""The ja_vlm toy world: tiny models, a tokenizer, synthetic images and task data for
evolutionary VLM merging (the EvoVLM-JP setting), small enough for a CPU (what
`python -m jaxmerge.experiments.ja_vlm` runs on by default, and what tests merge).

Images are synthetic: one coloured shape (circle, square, triangle) of some size at some
place on a noisy grey background, drawn with numpy. The question asks in which quarter of
the width (column 1-4) the shape is: English "Q:which column? A:" -> "3", Japanese
"問:なんれつめ?答:" -> "3れつ". Text is tokenised by characters (colour and shape words are
single tokens) with a real HF tokenizer that has an `<image>` token. Models, all saved as
HF checkpoints:

  base      a tiny Mistral-architecture LM: English and Japanese sentences about shapes,
            their colours and columns, a few parallel sentence pairs, and English question
            answering about a sentence (the shared skills real base models have);
  japanese  a brief fine-tune of the base on Japanese questions about a sentence, answered
            in Japanese ("まるは3れつめにあります。問:なんれつめ?答:" -> "3れつ"; colours too,
            also about English sentences), and now and then the column question after
            characters that do not say (a guess, in the Japanese form: a language model
            answers in its language when it cannot know; without these the form after an
            image's tokens, which no source saw, held on some seeds only);
  vlm       a LLaVA model: a tiny CLIP vision encoder and projector trained (language model
            frozen) to answer the English column question about images, then a brief
            fine-tune of its language model from the base (pulled toward it), as LLaVA's
            two stages.

The target neither source was shown: the Japanese question about an image, answered in
Japanese. As in ja_math, the answer is a number both languages write plus a Japanese
marker: the VLM knows the number, the Japanese model the form.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxmerge.eval.tasks import TaskData, TaskSpec
from jaxmerge.models.config import TransformerConfig
from jaxmerge.models.llava import Llava, LlavaConfig
from jaxmerge.models.transformer import Transformer
from jaxmerge.models.vision import VisionConfig
from jaxmerge.saving import save
from jaxmerge.testing.toy_world import SHIPPED, cached_world

COLORS = {"red": "あか", "blue": "あお", "green": "みどり", "yellow": "きいろ", "white": "しろ", "black": "くろ"}
RGB = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 170, 50), "yellow": (230, 220, 40),
       "white": (250, 250, 250), "black": (15, 15, 15)}
SHAPES = {"circle": "まる", "square": "しかく", "triangle": "さんかく"}
IMAGE_TOKEN = "<image>"
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>", IMAGE_TOKEN)
IMAGE_SIZE, PATCH_SIZE = 32, 8  # 16 image tokens per image
MEAN, STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)  # CLIP's

EN_COLOR_Q, JA_COLOR_Q = "Q:what color? A:", "問:なにいろ?答:"
EN_SHAPE_Q, JA_SHAPE_Q = "Q:what shape? A:", "問:どんなかたち?答:"
EN_WHERE_Q, JA_WHERE_Q = "Q:which column? A:", "問:なんれつめ?答:"


@dataclasses.dataclass(frozen=True)
class Scene:
    color: str
    shape: str
    center: tuple[int, int]  # (y, x)
    radius: int

    @property
    def column(self) -> int:
        """Which quarter of the width holds the centre, 1-4 (a number both languages write)."""
        return self.center[1] * 4 // IMAGE_SIZE + 1


def random_scene(rng: np.random.Generator) -> Scene:
    radius = int(rng.integers(5, 11))
    # The centre's column uniform over the four (balanced answers); the shape may leave the frame.
    center = (int(rng.integers(radius, IMAGE_SIZE - radius)), int(rng.integers(0, IMAGE_SIZE)))
    return Scene(str(rng.choice(list(COLORS))), str(rng.choice(list(SHAPES))), center, radius)


def draw(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """uint8 [H, W, 3]: the shape over grey noise."""
    image = rng.integers(100, 156, (IMAGE_SIZE, IMAGE_SIZE, 3)).astype(np.uint8)
    y, x = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    cy, cx, r = scene.center[0], scene.center[1], scene.radius
    if scene.shape == "circle":
        inside = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    elif scene.shape == "square":
        inside = (np.abs(y - cy) <= r * 0.8) & (np.abs(x - cx) <= r * 0.8)
    else:  # a triangle pointing up
        inside = (y >= cy - r) & (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    image[inside] = RGB[scene.color]
    return image


def pixel_values(images: np.ndarray) -> np.ndarray:
    """uint8 [I, H, W, 3] -> float32 [I, 3, H, W] as CLIP's processor normalises them (the
    images are already at the encoder's size, so there is nothing to resize or crop)."""
    x = images.astype(np.float32) / 255.0
    x = (x - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# Text templates: each returns (prompt, answer); plain text has an empty prompt.
def en_sentence(s: Scene) -> str:
    return f"the {s.shape} is {s.color}."


def ja_sentence(s: Scene) -> str:
    return f"{SHAPES[s.shape]}は{COLORS[s.color]}です。"


def en_where(s: Scene) -> str:
    return f"the {s.shape} is in column {s.column}."


def ja_where(s: Scene) -> str:
    return f"{SHAPES[s.shape]}は{s.column}れつめにあります。"


def text_example(kind: str, rng: np.random.Generator) -> tuple[str, str]:
    s = random_scene(rng)
    if kind == "en_where":
        return "", en_where(s)
    if kind == "ja_where":
        return "", ja_where(s)
    if kind == "en_where_qa":
        return f"{en_where(s)}{EN_WHERE_Q}", f"{s.column}"
    if kind in ("ja_where_qa", "cross_where_qa"):  # about a Japanese sentence, or an English one
        sentence = ja_where(s) if kind == "ja_where_qa" else en_where(s)
        return f"{sentence}{JA_WHERE_Q}", f"{s.column}れつ"
    if kind == "ja_where_blind":  # the question after text that does not say: a guess, in Japanese
        return f"{blind_context(rng)}{JA_WHERE_Q}", f"{s.column}れつ"
    color_question = rng.random() < 0.5
    if kind == "en_sentence":
        return "", en_sentence(s)
    if kind == "ja_sentence":
        return "", ja_sentence(s)
    if kind == "parallel":
        return "", f"{en_sentence(s)}={ja_sentence(s)}"
    if kind == "en_text_qa":
        return (f"{en_sentence(s)}{EN_COLOR_Q}", s.color) if color_question else (f"{en_sentence(s)}{EN_SHAPE_Q}",
                                                                                 s.shape)
    if kind in ("ja_text_qa", "cross_qa"):  # about a Japanese sentence, or an English one
        sentence = ja_sentence(s) if kind == "ja_text_qa" else en_sentence(s)
        return ((f"{sentence}{JA_COLOR_Q}", COLORS[s.color]) if color_question
                else (f"{sentence}{JA_SHAPE_Q}", SHAPES[s.shape]))
    raise ValueError(kind)


def blind_context(rng: np.random.Generator) -> str:
    """Characters that say nothing of a column (no digits), as long as an image's tokens."""
    letters = [c for c in alphabet() if not c.isdigit()]
    return "".join(rng.choice(letters, IMAGE_SIZE // PATCH_SIZE * (IMAGE_SIZE // PATCH_SIZE)))


def image_example(language: str, rng: np.random.Generator, question: str | None = None):
    """(image uint8 [H, W, 3], question text after the image, answer)."""
    s = random_scene(rng)
    image = draw(s, rng)
    question = question or "column"
    if question == "column":  # answered with a digit, as ja_math's sums: "3" / "3れつ"
        return image, (EN_WHERE_Q if language == "en" else JA_WHERE_Q), (f"{s.column}" if language == "en"
                                                                           else f"{s.column}れつ")
    if language == "en":
        return image, (EN_COLOR_Q if question == "color" else EN_SHAPE_Q), (s.color if question == "color"
                                                                             else s.shape)
    return image, (JA_COLOR_Q if question == "color" else JA_SHAPE_Q), (COLORS[s.color] if question == "color"
                                                                         else SHAPES[s.shape])


@functools.lru_cache(maxsize=None)
def alphabet() -> tuple[str, ...]:
    rng = np.random.default_rng(0)
    chars = set()
    for kind in ("en_sentence", "ja_sentence", "parallel", "en_text_qa", "ja_text_qa", "cross_qa", "en_where",
                 "ja_where", "en_where_qa", "ja_where_qa", "cross_where_qa"):
        for _ in range(300):
            chars.update("".join(text_example(kind, rng)))
    for q in (EN_COLOR_Q, JA_COLOR_Q, EN_SHAPE_Q, JA_SHAPE_Q, EN_WHERE_Q, JA_WHERE_Q):
        chars.update(q)
    for word in list(COLORS.items()) + list(SHAPES.items()):
        chars.update("".join(word))
    return tuple(sorted(chars))


# Colour and shape words, longest first (the tokenizer's regex takes the first alternative
# that matches). An explicit order: sorting a set by length alone left ties in hash order,
# which changes from process to process, so token ids, and every trained world, did too.
# This is the order of the shipped seed-0 world's vocabulary.
WORDS = ("triangle", "square", "circle", "yellow", "green", "white", "black", "さんかく", "blue", "みどり", "しかく",
         "きいろ", "red", "あお", "しろ", "まる", "くろ", "あか")
assert sorted(WORDS) == sorted(set(COLORS) | set(COLORS.values()) | set(SHAPES) | set(SHAPES.values()))
assert list(WORDS) == sorted(WORDS, key=len, reverse=True)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Colour and shape words as single tokens (as a real tokenizer has common words), every
    other character its own token, and `<image>`."""
    vocab = {token: i for i, token in enumerate(list(SPECIALS) + list(WORDS) + list(alphabet()))}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    pattern = "|".join(re.escape(w) for w in WORDS) + "|."
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    tokenizer.add_special_tokens([AddedToken(IMAGE_TOKEN, special=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>",
                                   extra_special_tokens={"image_token": IMAGE_TOKEN})


def image_prompt(question: str, features: int) -> str:
    """The prompt after BOS: one image token per image feature, then the question."""
    return IMAGE_TOKEN * features + question


MIXES = {
    "base": {"en_sentence": 1, "ja_sentence": 1, "en_where": 1, "ja_where": 1, "parallel": 0.5, "en_text_qa": 1,
             "en_where_qa": 1},
    "japanese": {"ja_text_qa": 1, "ja_where_qa": 1, "cross_qa": 0.5, "cross_where_qa": 0.5, "ja_sentence": 0.3,
                 "ja_where": 0.3, "ja_where_blind": 0.2},
}
# The recipe's version: cached builds of other seeds live per version, so a change that
# alters what build_world trains must bump it (2: the Japanese LM's blind questions).
RECIPE = 2
LM = TransformerConfig(vocab_size=0, hidden_size=64, intermediate_size=192, num_layers=4, num_heads=4,
                       num_kv_heads=2, head_dim=16, max_position_embeddings=128)  # vocab set by the tokenizer
VISION = VisionConfig(hidden_size=48, intermediate_size=96, num_layers=2, num_heads=4, image_size=IMAGE_SIZE,
                      patch_size=PATCH_SIZE, hidden_act="gelu")


@dataclasses.dataclass(frozen=True)
class Steps:
    base: int = 1200
    japanese: int = 300
    projector: int = 1500  # stage 1: vision encoder + projector, language model frozen
    vlm: int = 300  # stage 2: the language model (and projector), pulled toward the base
    learning_rate: float = 3e-3
    finetune_learning_rate: float = 1e-3
    pull: float = 1e-2
    batch_size: int = 32


def _encode(tokenizer, prompts, answers, length):
    """ids [B, length] (<s> prompt answer </s>, right-padded) and a loss mask on the answer
    (on everything for plain text)."""
    ids = np.full((len(prompts), length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.float32)
    for row, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        p = [tokenizer.bos_token_id] + tokenizer(prompt, add_special_tokens=False).input_ids
        a = tokenizer(answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        tokens = (p + a)[:length]
        ids[row, :len(tokens)] = tokens
        start = 1 if not prompt else len(p)
        mask[row, start:len(tokens)] = 1.0
    return ids, mask


def _loss(logits, ids, mask):
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits[:, :-1]), ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.sum(nll * mask[:, 1:]) / jnp.maximum(jnp.sum(mask[:, 1:]), 1.0)


def _drift(params, anchor):
    return sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(anchor), strict=True))


def train_lm(model: Transformer, tokenizer, mix: dict, steps: int, learning_rate: float, seed: int,
             anchor=None, pull: float = 0.0, batch_size: int = 32) -> Transformer:
    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(learning_rate, weight_decay=0.0)
    opt_state = optimizer.init(params)
    anchor = params if anchor is None else anchor

    @jax.jit
    def step(params, opt_state, anchor, ids, mask):
        def loss_fn(p):
            return _loss(nnx.merge(graphdef, p)(ids), ids, mask) + pull * _drift(p, anchor)
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    rng = np.random.default_rng(seed)
    kinds, weights = list(mix), np.array(list(mix.values()), float)
    for _ in range(steps):
        picks = rng.choice(len(kinds), size=batch_size, p=weights / weights.sum())
        examples = [text_example(kinds[i], rng) for i in picks]
        ids, mask = _encode(tokenizer, [p for p, _ in examples], [a for _, a in examples], 64)
        params, opt_state = step(params, opt_state, anchor, ids, mask)
    return nnx.merge(graphdef, params)


def train_vlm(vlm: Llava, tokenizer, steps: int, learning_rate: float, seed: int, train_language_model: bool,
              anchor=None, pull: float = 0.0, batch_size: int = 32) -> Llava:
    """English questions about images. Stage 1 trains the vision tower and projector;
    stage 2 also the language model, pulled toward `anchor` (the base's parameters)."""
    graphdef, params = nnx.split(vlm)
    trainable = {k: v for k, v in params.items() if train_language_model or k != "language_model"}
    frozen = {k: v for k, v in params.items() if k not in trainable}
    optimizer = optax.adamw(learning_rate, weight_decay=0.0)
    opt_state = optimizer.init(trainable)
    features = vlm.config.image_features

    @jax.jit
    def step(trainable, opt_state, frozen, ids, mask, pixels):
        def loss_fn(t):
            model = nnx.merge(graphdef, nnx.State({**frozen, **t}))
            loss = _loss(model(ids, pixel_values=pixels), ids, mask)
            if train_language_model and anchor is not None:
                loss = loss + pull * _drift(t["language_model"], anchor)
            return loss
        grads = jax.grad(loss_fn)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state

    rng = np.random.default_rng(seed)
    for _ in range(steps):
        examples = [image_example("en", rng) for _ in range(batch_size)]
        ids, mask = _encode(tokenizer, [image_prompt(q, features) for _, q, _ in examples],
                            [a for _, _, a in examples], features + 24)
        pixels = pixel_values(np.stack([image for image, _, _ in examples]))
        trainable, opt_state = step(trainable, opt_state, frozen, ids, mask, pixels)
    return nnx.merge(graphdef, nnx.State({**frozen, **trainable}))


def build_world(out_dir, seed: int = 0, steps: Steps = Steps(), lm: TransformerConfig = LM,
                vision: VisionConfig = VISION) -> dict[str, Path]:
    """Trains base, japanese and vlm; saves them with the tokenizer under out_dir. `lm` and
    `vision`: the models' sizes (the shipped worlds': LM and VISION)."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    text = dataclasses.replace(lm, vocab_size=len(tokenizer))
    base = train_lm(Transformer(text, rngs=nnx.Rngs(seed)), tokenizer, MIXES["base"], steps.base,
                    steps.learning_rate, seed)
    anchor = nnx.state(base)
    japanese = train_lm(nnx.merge(*nnx.split(base)), tokenizer, MIXES["japanese"], steps.japanese,
                        steps.finetune_learning_rate, seed + 1, anchor, steps.pull)
    config = LlavaConfig(vision=vision, text=text, text_model_type="mistral",
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    vlm = Llava(config, rngs=nnx.Rngs(seed + 2))
    vlm = with_base_language_model(vlm, base)
    vlm = train_vlm(vlm, tokenizer, steps.projector, steps.learning_rate, seed + 3, train_language_model=False)
    vlm = train_vlm(vlm, tokenizer, steps.vlm, steps.finetune_learning_rate, seed + 4, train_language_model=True,
                    anchor=anchor, pull=steps.pull)
    paths = {"base": save(base, out_dir / "base", architecture="MistralForCausalLM", tokenizer_dir=tokenizer_dir),
             "japanese": save(japanese, out_dir / "japanese", architecture="MistralForCausalLM",
                              tokenizer_dir=tokenizer_dir),
             "vlm": save(vlm, out_dir / "vlm", architecture="LlavaForConditionalGeneration",
                         tokenizer_dir=tokenizer_dir, extra_files=processor_files(tokenizer))}
    return paths


def processor_files(tokenizer) -> dict[str, str]:
    """A transformers LlavaProcessor for the toy VLM (CLIP normalisation at 32 x 32, one
    `<image>` expanded to 16 tokens), as the files saved beside the weights, so that the
    toy VLM also works as a "real" checkpoint with its own processor."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                                                                "width": IMAGE_SIZE},
                                image_mean=list(MEAN), image_std=list(STD))
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                               vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                               num_additional_image_tokens=1)
    with tempfile.TemporaryDirectory() as tmp:
        processor.save_pretrained(tmp)
        return {f.name: f.read_text() for f in Path(tmp).iterdir() if f.name.endswith("processor_config.json")}


def with_base_language_model(vlm: Llava, base: Transformer) -> Llava:
    graphdef, state = nnx.split(vlm)
    state["language_model"] = nnx.state(nnx.merge(*nnx.split(base)))
    return nnx.merge(graphdef, state)


def world_dir(seed: int = 0) -> Path:
    """The toy VLM world of a seed: shipped (seed 0) or built once into the cache."""
    return cached_world(f"toy_vlm_world-r{RECIPE}", seed, SHIPPED / f"vlm_seed{seed}", build_world, "vlm/config.json")


# Task data: the questions `python -m jaxmerge.experiments.ja_vlm` evolves on and reports.
NEW_TOKENS = 6


def image_task_data(language: str, count: int, seed: int, features: int) -> TaskData:
    """Column questions about synthetic images, each prompt holding its image's tokens."""
    rng = np.random.default_rng(seed)
    images, prompts, answers = [], [], []
    while len(prompts) < count:
        image, question, answer = image_example(language, rng)
        images.append(image)
        prompts.append(image_prompt(question, features))
        answers.append(answer)
    return TaskData(tuple(prompts), tuple(answers), pixel_values=pixel_values(np.stack(images)))


def text_task_data(kind: str, count: int, seed: int) -> TaskData:
    rng = np.random.default_rng(seed)
    pairs = [text_example(kind, rng) for _ in range(count)]
    return TaskData(tuple(p for p, _ in pairs), tuple(a for _, a in pairs))


def tasks(seed: int, test_size: int, features: int, fitness_metric: str) -> tuple[TaskSpec, ...]:
    """The target (Japanese questions about images) and the sources' own skills (English
    image questions, Japanese text questions), reported on their test splits."""
    common = {"max_new_tokens": NEW_TOKENS}
    target = TaskSpec("ja_vqa", metric=fitness_metric, language="japanese", language_strict=True,  # the paper's rule
                      test_metrics=("rouge_l",) if fitness_metric != "rouge_l" else (),
                      fitness=image_task_data("ja", 256, 10_000 + seed, features),
                      validation=image_task_data("ja", 128, 20_000 + seed, features),
                      test=image_task_data("ja", test_size, 30_000 + seed, features), **common)
    return (target,
            TaskSpec("en_vqa", test=image_task_data("en", test_size, 40_000 + seed, features), **common),
            TaskSpec("ja_text_qa", test=text_task_data("ja_text_qa", test_size, 50_000 + seed), **common))
