"""The ja_math toy world: tiny models, a tokenizer and task data for evolutionary merging,
small enough for a laptop CPU (what `python -m jaxmerge.experiments.ja_math` runs on by
default, and what tests and examples merge).

Text comes from templates in English and Japanese (kana), is tokenised by characters
with a real HF `tokenizers` tokenizer (saved so that transformers' AutoTokenizer opens
it), and is learnt by tiny Mistral-architecture models trained with optax and saved as HF
checkpoints, loaded back like any real model:

  base      both languages (including stories like "tom has 3 cats. gets 4 more." and
            their Japanese counterparts), question answering in English, and arithmetic in
            a neutral form ("3+4=7"): the shared skills real base models have;
  japanese  a brief fine-tune on Japanese questions answered "<n>こ" (copying a number;
            no arithmetic);
  math      a brief fine-tune on English addition word problems.

Fine-tunes are pulled toward the base (an L2 penalty on the task vector) so that they stay
small deltas that route existing skills, as real fine-tunes do. The target neither was
shown: Japanese addition word problems answered "<a+b>こ" (`tasks`: it and the sources'
own skills as `TaskSpec`s with fitness, validation and test splits).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from jaxmerge.checkpoint import load
from jaxmerge.eval.tasks import TaskData, TaskSpec
from jaxmerge.models.config import TransformerConfig
from jaxmerge.models.transformer import Transformer
from jaxmerge.outputs import staged_output
from jaxmerge.saving import save

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
EN_NAMES = ("tom", "ann", "ken", "mia", "bob", "eva")
JA_NAMES = ("トム", "アン", "ケン", "ミア", "ボブ", "エバ")
EN_THINGS = ("apples", "pens", "cats", "books", "cups", "eggs")
JA_THINGS = ("りんご", "ペン", "ねこ", "ほん", "カップ", "たまご")

log = logging.getLogger(__name__)


def _pick(rng: np.random.Generator, options) -> str:
    return options[int(rng.integers(len(options)))]


def _digit(rng: np.random.Generator) -> int:
    return int(rng.integers(10))


# Each template returns (prompt, answer); plain text has an empty prompt.
def english_statement(rng):
    return "", f"{_pick(rng, EN_NAMES)} has {_digit(rng)} {_pick(rng, EN_THINGS)}."


def japanese_statement(rng):
    return "", f"{_pick(rng, JA_NAMES)}は{_pick(rng, JA_THINGS)}を{_digit(rng)}こもっています。"


def english_story(rng):
    return "", f"{_pick(rng, EN_NAMES)} has {_digit(rng)} {_pick(rng, EN_THINGS)}. gets {_digit(rng)} more."


def japanese_story(rng):
    return "", (f"{_pick(rng, JA_NAMES)}は{_pick(rng, JA_THINGS)}を{_digit(rng)}こもっています。"
                f"{_digit(rng)}こもらいました。")


def arithmetic(rng):
    a, b = _digit(rng), _digit(rng)
    return f"{a}+{b}=", f"{a + b}"


def english_qa(rng):
    a = _digit(rng)
    return f"Q:{_pick(rng, EN_NAMES)} has {a} {_pick(rng, EN_THINGS)}. how many? A:", f"{a}"


def japanese_qa(rng):
    a = _digit(rng)
    return f"問:{_pick(rng, JA_NAMES)}は{_pick(rng, JA_THINGS)}を{a}こもっています。なんこ?答:", f"{a}こ"


def english_math(rng):
    a, b = _digit(rng), _digit(rng)
    return f"Q:{_pick(rng, EN_NAMES)} has {a} {_pick(rng, EN_THINGS)}. gets {b} more. how many? A:", f"{a + b}"


def japanese_math(rng):
    a, b = _digit(rng), _digit(rng)
    return (f"問:{_pick(rng, JA_NAMES)}は{_pick(rng, JA_THINGS)}を{a}こもっています。{b}こもらいました。なんこ?答:",
            f"{a + b}こ")


TEMPLATES: dict[str, Callable] = {
    "english_statement": english_statement, "japanese_statement": japanese_statement,
    "english_story": english_story, "japanese_story": japanese_story, "arithmetic": arithmetic,
    "english_qa": english_qa, "japanese_qa": japanese_qa, "english_math": english_math,
    "japanese_math": japanese_math,
}

# What each model is trained on: template -> relative frequency. The base answers questions
# only in English; Japanese question answering lives in the Japanese fine-tune alone, and
# the fine-tunes replay some base data so that they stay small deltas.
MIXES = {
    "base": {"english_statement": 1, "japanese_statement": 1, "english_story": 1, "japanese_story": 1,
             "arithmetic": 3, "english_qa": 1},
    "japanese": {"japanese_qa": 1, "japanese_statement": 0.5, "arithmetic": 0.3},
    "math": {"english_math": 1, "arithmetic": 0.5, "english_statement": 0.3, "japanese_statement": 0.3},
}


def alphabet() -> list[str]:
    """Every character the templates produce (checked by drawing from each many times)."""
    rng = np.random.default_rng(0)
    chars = set("0123456789")
    for template in TEMPLATES.values():
        for _ in range(300):
            prompt, answer = template(rng)
            chars.update(prompt + answer)
    return sorted(chars)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer in HF `tokenizers` format."""
    vocab = {token: i for i, token in enumerate(list(SPECIALS) + alphabet())}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", unk_token="<unk>")


def sample_texts(mix: dict[str, float], count: int, rng: np.random.Generator) -> list[str]:
    names = list(mix)
    weights = np.array([mix[n] for n in names], float)
    picks = rng.choice(len(names), size=count, p=weights / weights.sum())
    return ["".join(TEMPLATES[names[i]](rng)) for i in picks]


def encode(tokenizer, texts: list[str], length: int) -> tuple[np.ndarray, np.ndarray]:
    """ids [B, length] (<s> text </s>, right-padded) and a loss mask [B, length]."""
    ids = np.full((len(texts), length), tokenizer.pad_token_id, np.int32)
    mask = np.zeros((len(texts), length), np.float32)
    for row, text in enumerate(texts):
        tokens = ([tokenizer.bos_token_id] + tokenizer(text, add_special_tokens=False).input_ids
                  + [tokenizer.eos_token_id])[:length]
        ids[row, :len(tokens)] = tokens
        mask[row, :len(tokens)] = 1.0
    return ids, mask


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int
    learning_rate: float
    batch_size: int = 32
    length: int = 72
    pull: float = 0.0  # L2 penalty on the distance from the anchor (the base) per parameter


def train(model: Transformer, tokenizer, mix: dict[str, float], config: TrainConfig, seed: int,
          anchor: nnx.State | None = None) -> tuple[Transformer, list[float]]:
    """Next-token training with optax AdamW; returns the model and the loss per step."""
    graphdef, params = nnx.split(model)
    optimizer = optax.adamw(config.learning_rate, weight_decay=0.0)
    opt_state = optimizer.init(params)
    anchor = params if anchor is None else anchor

    @jax.jit
    def step(params, opt_state, anchor, ids, mask):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(ids[:, :-1])  # [B, T-1, V]
            nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], axis=-1)[..., 0]
            loss = jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])
            drift = sum(jnp.sum((a - b) ** 2) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(anchor), strict=True))
            return loss + config.pull * drift, loss

        (_, loss), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    losses = []
    for _ in range(config.steps):
        ids, mask = encode(tokenizer, sample_texts(mix, config.batch_size, rng), config.length)
        params, opt_state, loss = step(params, opt_state, anchor, ids, mask)
        losses.append(float(loss))
    return nnx.merge(graphdef, params), losses


MODEL = TransformerConfig(vocab_size=0, hidden_size=64, intermediate_size=192, num_layers=6, num_heads=4,
                          num_kv_heads=2, head_dim=16, max_position_embeddings=128)  # vocab set by the tokenizer
TRAINING = {"base": TrainConfig(steps=1500, learning_rate=3e-3),
            "japanese": TrainConfig(steps=150, learning_rate=1e-3, pull=1e-2),
            "math": TrainConfig(steps=250, learning_rate=1e-3, pull=1e-2)}


def build_world(out_dir, seed: int = 0, training: dict[str, TrainConfig] | None = None,
                model: TransformerConfig = MODEL) -> dict[str, Path]:
    """Trains the base and both fine-tunes and saves them (with the tokenizer) as HF
    checkpoints under out_dir/{base,japanese,math}."""
    out_dir = Path(out_dir)
    training = training or TRAINING
    tokenizer = build_tokenizer()
    tokenizer_dir = out_dir / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    config = dataclasses.replace(model, vocab_size=len(tokenizer))
    base, _ = train(Transformer(config, rngs=nnx.Rngs(seed)), tokenizer, MIXES["base"], training["base"], seed)
    anchor = nnx.state(base)
    models = {"base": base}
    for i, name in enumerate(("japanese", "math")):
        start = nnx.merge(*nnx.split(base))  # a copy of the base
        models[name], _ = train(start, tokenizer, MIXES[name], training[name], seed + 1 + i, anchor)
    return {name: save(m, out_dir / name, architecture="MistralForCausalLM", tokenizer_dir=tokenizer_dir)
            for name, m in models.items()}


# Seed 0, made by build_world(out, seed=0); package data of jaxmerge.experiments, whose
# experiments and example configs run on it.
SHIPPED = Path(__file__).parent.parent / "experiments" / "toy_world_checkpoints"


def cached_world(name: str, seed: int, shipped: Path, build, marker: str) -> Path:
    """A toy world: `shipped` if it is there, else `name`/seed<N> under the cache
    ($JAXMERGE_HOME or ~/.cache/jaxmerge), built once by `build(directory, seed=)` into a
    staging directory renamed into place. `marker`: a file a complete world has."""
    if (shipped / marker).exists():
        return shipped
    home = Path(os.environ.get("JAXMERGE_HOME", Path.home() / ".cache" / "jaxmerge"))
    path = home / name / f"seed{seed}"
    if not (path / marker).exists():
        log.info("building the %s for seed %d into %s (once; about 5 minutes on 2 cores)", name, seed, path)
        with staged_output(path, overwrite=path.exists()) as staging:  # an unfinished build is replaced whole
            build(staging, seed=seed)
    return path


def world_dir(seed: int = 0) -> Path:
    """The ja_math toy world of a seed: shipped (seed 0) or built once into the cache."""
    return cached_world("toy_world", seed, SHIPPED / f"seed{seed}", build_world, "math/config.json")


# Distractors for a pool of sources (`ja_math --distractors`): fine-tunes of the same base on
# toy tasks that neither Japanese math nor its parts need, and a copy of the base with noise.
DISTRACTOR_MIXES = {
    "stories": {"english_story": 1, "japanese_story": 1, "english_statement": 0.3},
    "statements": {"english_statement": 1, "japanese_statement": 1},
}
DISTRACTOR_TRAINING = TrainConfig(steps=200, learning_rate=1e-3, pull=1e-2)
DISTRACTORS = (*DISTRACTOR_MIXES, "noise")


def build_distractors(out_dir, seed: int = 0) -> dict[str, Path]:
    """out_dir/{stories,statements,noise}: two fine-tunes of the seed's base on unrelated
    tasks, and the base plus Gaussian noise as large, per tensor, as the math fine-tune's delta."""
    world, out_dir = world_dir(seed), Path(out_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(world / "base")
    base = load(world / "base")
    anchor = nnx.state(base)
    models = {}
    for i, (name, mix) in enumerate(DISTRACTOR_MIXES.items()):
        start = nnx.merge(*nnx.split(base))
        models[name], _ = train(start, tokenizer, mix, DISTRACTOR_TRAINING, seed + 10 + i, anchor)
    math = nnx.state(load(world / "math"))
    rng = np.random.default_rng(seed + 20)

    def noisy(b, m):
        noise = rng.standard_normal(b.shape).astype(np.float32)
        scale = np.linalg.norm(np.asarray(m) - np.asarray(b)) / max(np.linalg.norm(noise), 1e-12)
        return jnp.asarray(np.asarray(b) + scale * noise, b.dtype)

    graphdef, state = nnx.split(base)
    models["noise"] = nnx.merge(graphdef, jax.tree.map(noisy, state, math))
    return {name: save(m, out_dir / name, architecture="MistralForCausalLM", tokenizer_dir=world / "base")
            for name, m in models.items()}


def distractors_dir(seed: int = 0) -> Path:
    """The seed's distractor checkpoints, built once into the cache (about a minute)."""
    return cached_world("toy_distractors", seed, SHIPPED / f"distractors{seed}", build_distractors,
                        "noise/config.json")


# Task data: the problems `python -m jaxmerge.experiments.ja_math` evolves on and reports.
NEW_TOKENS = 4


def task_data(seed: int, count: int, template, strip_counter: bool, exclude: set = frozenset()) -> TaskData:
    """`count` distinct problems from a toy template, none of them in `exclude`; number
    answers lose the Japanese counter ("3こ" -> "3")."""
    rng = np.random.default_rng(seed)
    seen, prompts, answers = set(exclude), [], []
    while len(prompts) < count:
        prompt, answer = template(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        prompts.append(prompt)
        answers.append(answer.rstrip("こ") if strip_counter else answer)
    return TaskData(tuple(prompts), tuple(answers))


def tasks(seed: int, test_size: int, keep_skills: float, likelihood: bool = False) -> tuple[TaskSpec, ...]:
    """The target (Japanese math, the answer's number in a Japanese response) and the
    sources' own skills (Japanese QA, English math), each with its test split; with
    `keep_skills` > 0, the skills join the fitness with that share of the weight and rows.
    `likelihood`: the target's fitness is the log-likelihood of the reference answer ("14こ";
    no generation), its test still generated and scored by number."""
    fitness = task_data(10_000 + seed, 256, japanese_math, not likelihood)
    validation = task_data(20_000 + seed, 128, japanese_math, not likelihood, set(fitness.prompts))
    held = set(fitness.prompts) | set(validation.prompts)
    share = keep_skills / 2
    rows = round(64 * share)
    test = task_data(30_000 + seed, test_size, japanese_math, True, held)
    # language_strict: the paper's MGSM-ja rule; the math model's bare "7" is not a Japanese answer.
    target = TaskSpec("ja_math", metric="number", language="japanese", language_strict=True, fitness=fitness,
                      validation=validation, test=test, max_new_tokens=NEW_TOKENS, weight=1.0 - keep_skills,
                      minibatch=64 - 2 * rows)
    if likelihood:
        target = (TaskSpec("ja_math_loglik", metric="loglik", fitness=fitness, validation=validation, delimiter="",
                           weight=1.0 - keep_skills, minibatch=64 - 2 * rows),
                  TaskSpec("ja_math", metric="number", language="japanese", language_strict=True, test=test,
                           max_new_tokens=NEW_TOKENS))
    skills = []
    for i, (name, template, metric) in enumerate((("ja_qa", japanese_qa, "exact"),
                                                  ("en_math", english_math, "number"))):
        number = metric == "number"
        splits = {"fitness": task_data(60_000 + seed + i, 256, template, number),
                  "validation": task_data(70_000 + seed + i, 128, template, number)} if keep_skills else {}
        skills.append(TaskSpec(name, metric=metric, test=task_data((40_000, 50_000)[i] + seed, test_size, template,
                                                                number),
                               max_new_tokens=NEW_TOKENS, weight=share, minibatch=rows or None, **splits))
    return (*(target if likelihood else (target,)), *skills)
