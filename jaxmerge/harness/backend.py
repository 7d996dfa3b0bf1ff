"""`jaxmerge` as an lm-evaluation-harness model: the harness's requests, answered in JAX.

    jaxmerge lm-eval --model jaxmerge --model_args pretrained=DIR_OR_HUB_ID,dtype=bfloat16 --tasks ...
    (model_args layout=PxM: each batch split over P devices, the weights sharded over M, as `jaxmerge.parallel`)
    import jaxmerge.harness; lm_eval.simple_evaluate(model="jaxmerge", model_args="pretrained=...", ...)

It answers as lm-eval's `hf` backend answers on the same checkpoint: the same tokenization (the
harness's own `_encode_pair`, and `tok_encode` with `add_bos_token` as hf reads it), the same
left truncation to the model's length, the same stop-sequence handling and decoding of
generations. What differs is how: requests are sorted by length and padded to power-of-two
buckets and a fixed batch size, so a task compiles a few programs; generation keeps a KV cache
and decodes in chunks, stopping once every row has ended (EOS, or a stop sequence in its text).
Greedy decoding only: a request asking to sample is refused.

lm-eval 0.4.13 has no plugin entry point for models; importing this module registers the model
(`jaxmerge lm-eval` does it for the command line).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import (
    handle_stop_sequences,
    has_bos_prefix,
    normalize_gen_kwargs,
    postprocess_generated_text,
)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from jaxmerge.checkpoint import load, load_tokenizer, read_config
from jaxmerge.generation import text_config
from jaxmerge.harness.programs import bucket, decode_program, prefill_program, score_program
from jaxmerge.hub import resolve_model
from jaxmerge.models.interfaces import CausalLM, language_model
from jaxmerge.parallel import POPULATION, Layout

logger = logging.getLogger(__name__)

DEFAULT_MAX_LENGTH = 2048  # lm-eval's, where neither config nor tokenizer says
DECODE_CHUNK = 16  # tokens decoded between checks for stop sequences


@dataclasses.dataclass(frozen=True)
class TokenRequest:
    """One scoring request as token ids: the model reads `inputs`, and the logits at the last
    `len(continuation)` positions score the continuation."""

    inputs: list[int]
    continuation: list[int]


def _flag(value, name: str) -> bool | None:
    if value is None or isinstance(value, bool):
        return value
    if str(value).lower() in ("true", "false"):
        return str(value).lower() == "true"
    raise ValueError(f"jaxmerge model_args: {name} must be true or false, got {value!r}")


@register_model("jaxmerge")
class JaxmergeLM(TemplateLM):
    """An lm-eval model of a checkpoint loaded by jaxmerge (a directory or Hub reference), or of
    a model already in memory (`model=` and `tokenizer=`, e.g. a merge under evaluation)."""

    def __init__(self, pretrained: str | None = None, *, model: CausalLM | None = None, tokenizer=None,
                 dtype: str | None = "float32", batch_size: int | str = 16, max_batch_size: int | None = None,
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | str | None = None,
                 prefix_token_id: int | None = None, truncation: bool | str = False, device: str | None = None,
                 layout: str | None = None, **unused):
        super().__init__()
        if unused:
            logger.warning("jaxmerge model_args: ignoring %s (not used by the jaxmerge backend)", ", ".join(unused))
        if device is not None:
            logger.info("jaxmerge model_args: device=%s ignored; JAX places the model on %s", device,
                        jax.devices()[0].platform)
        if (pretrained is None) == (model is None):
            raise ValueError("jaxmerge model_args: give pretrained=DIR_OR_HUB_ID, or model= and tokenizer= in Python")
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self._mesh = None if layout is None else Layout.parse(str(layout)).mesh()
        if self._mesh is not None and self.batch_size % self._mesh.shape[POPULATION]:
            raise ValueError(f"jaxmerge model_args: batch_size {self.batch_size} is not a multiple of layout "
                             f"{layout}'s {self._mesh.shape[POPULATION]} population devices, which split each batch")
        if model is None:
            directory = resolve_model(pretrained)
            model = load(directory, dtype=dtype, sharding=self._mesh)
            tokenizer = load_tokenizer(directory) if tokenizer is None else tokenizer
            self._generation_eos = _generation_eos_ids(directory)
            self._from_directory = True
        else:
            if tokenizer is None:
                raise ValueError("jaxmerge: a model given in memory needs its tokenizer too")
            self._generation_eos, self._from_directory = None, False
        self.pretrained = str(pretrained) if pretrained is not None else type(model).__name__
        self.tokenizer = _with_pad_token(tokenizer)
        self._graphdef, self._state = nnx.split(language_model(model))
        self._config = text_config(model)
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.add_bos_token = _flag(add_bos_token, "add_bos_token")
        self.custom_prefix_token_id = None if prefix_token_id is None else int(prefix_token_id)
        self.truncation = _flag(truncation, "truncation")
        self._rank, self._world_size = 0, 1

    # What lm-eval asks of a model.

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        if self._max_length:
            return self._max_length
        if self._config.max_position_embeddings:
            return int(self._config.max_position_embeddings)
        limit = getattr(self.tokenizer, "model_max_length", None)
        return int(limit) if limit and limit < 1e29 else DEFAULT_MAX_LENGTH

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                   **kwargs) -> list[int]:
        special = self._special_tokens(add_special_tokens)
        if add_special_tokens is None and has_bos_prefix(string, self.tokenizer.decode(self.prefix_token_id)):
            special["add_special_tokens"] = False  # the text carries BOS already (a chat template's)
        encoding = self.tokenizer.encode(string, **special)
        return encoding[-left_truncate_len:] if left_truncate_len else encoding

    def tok_decode(self, tokens, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    def _special_tokens(self, add_special_tokens: bool | None) -> dict:
        if add_special_tokens is not None:
            return {"add_special_tokens": add_special_tokens}
        if self.add_bos_token is not None:
            return {"add_special_tokens": self.add_bos_token}
        return {}

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = [self.token_request(context, continuation) for _, context, continuation in requests]
        return self.score(rows, disable_tqdm=disable_tqdm)

    def token_request(self, context: list[int], continuation: list[int]) -> TokenRequest:
        whole = (context + continuation)[-(self.max_length + 1):]  # left truncation, as hf does
        return TokenRequest(inputs=whole[:-1], continuation=continuation)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(request.args for request in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append(self.token_request(context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self.score(windows, disable_tqdm=disable_tqdm), strict=True):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):  # one batch never mixes generation settings
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(index)
        eos = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        bar = tqdm(total=len(requests), desc="jaxmerge generate_until", disable=disable_tqdm)
        for indices in groups.values():
            settings = normalize_gen_kwargs(dict(requests[indices[0]].args[1]), self.max_gen_toks)
            until = handle_stop_sequences(settings.pop("until", None), eos=eos)
            max_gen_toks = int(settings.pop("max_gen_toks"))
            if settings.get("do_sample") or settings.get("temperature", 0.0) > 0.0:
                raise ValueError(f"task {requests[indices[0]].task_name!r} asks to sample ({settings}); the jaxmerge "
                                 "backend decodes greedily (set do_sample: false in its generation_kwargs)")
            contexts = [self._encode_prompt(requests[i].args[0], self.max_length - max_gen_toks) for i in indices]
            # hf's batches (longest first, then by text), so that a batch ends where hf's does
            order = sorted(range(len(indices)), key=lambda i: (-len(self.tok_encode(requests[indices[i]].args[0])),
                                                               requests[indices[i]].args[0]))
            for start in range(0, len(order), self.batch_size):
                chosen = order[start:start + self.batch_size]
                texts = self.generate([contexts[i] for i in chosen], max_gen_toks, until)
                for i, text in zip(chosen, texts, strict=True):
                    results[indices[i]] = text
                    self.cache_hook.add_partial("generate_until", requests[indices[i]].args, text)
                bar.update(len(chosen))
        bar.close()
        return results

    # The work, in JAX.

    def score(self, rows: list[TokenRequest], disable_tqdm: bool = True) -> list[tuple[float, bool]]:
        """(summed log-probability, all tokens greedy) of each row's continuation: rows sorted by
        length, batched, padded to a length bucket; one compiled program per bucket."""
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i].inputs))
        bar = tqdm(total=len(rows), desc="jaxmerge loglikelihood", disable=disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            chosen = order[start:start + self.batch_size]
            length = bucket(len(rows[chosen[0]].inputs))
            inputs, mask, targets, scored = (np.zeros((self.batch_size, length), np.int32) for _ in range(4))
            for b, i in enumerate(chosen):
                row = rows[i]
                n, k = len(row.inputs), len(row.continuation)
                if not 0 < k <= n:
                    raise ValueError(f"request {i}: {k} continuation tokens after {n - k} context tokens")
                inputs[b, length - n:] = row.inputs
                mask[b, length - n:] = 1
                targets[b, length - n:-1] = row.inputs[1:]
                targets[b, -1] = row.continuation[-1]
                scored[b, length - k:] = 1
            mask[len(chosen):, -1] = 1  # padding rows: one token each, so no row is empty
            tail = bucket(max(len(rows[i].continuation) for i in chosen), smallest=8)  # positions scored
            logprob, greedy = score_program(self._graphdef, self._state, *map(self._place, (inputs, mask, targets,
                                                                                              scored)),
                                            tail=min(tail, length))
            logprob, greedy = np.asarray(logprob), np.asarray(greedy)
            for b, i in enumerate(chosen):
                results[i] = (float(logprob[b]), bool(greedy[b]))
            bar.update(len(chosen))
        bar.close()
        return results

    def generate(self, prompts: list[list[int]], max_new_tokens: int, until: list[str]) -> list[str]:
        """Greedy continuations of token-id prompts (at most batch_size), as text cut at the first
        stop sequence. As transformers' generate under hf's stopping criteria: a row ends at an EOS
        id of the model's generation config; the batch ends when every row has ended or every row
        has produced one same stop sequence (rows that have stopped go on generating until then, so
        a text can depend on its batch, as hf's does)."""
        B, T = self.batch_size, bucket(max(map(len, prompts)))
        chunks = -(-max_new_tokens // DECODE_CHUNK)
        pad = self.tokenizer.pad_token_id
        ids, mask = np.full((B, T), pad, np.int32), np.zeros((B, T), np.int32)
        for b, prompt in enumerate(prompts):
            ids[b, T - len(prompt):], mask[b, T - len(prompt):] = prompt, 1
        mask[len(prompts):, -1] = 1
        token, cache, key_valid, position = prefill_program(self._graphdef, self._state, self._place(ids),
                                                            self._place(mask), cache_length=T + chunks * DECODE_CHUNK)
        carry = (token, cache, position, jnp.int32(T), jnp.zeros((B,), bool))
        eos_ids = self._eos_ids()
        stops = StopSequences(self.tokenizer, until, len(prompts), eos_ids)
        emitted, end = [], None
        for _ in range(chunks):
            tokens, carry = decode_program(self._graphdef, self._state, carry[0], carry[1], key_valid, *carry[2:],
                                           jnp.asarray(eos_ids or [-1], jnp.int32), jnp.int32(pad),
                                           steps=DECODE_CHUNK)
            emitted.append(np.asarray(tokens)[:len(prompts)])
            end = stops.end(np.concatenate(emitted, axis=1)[:, :max_new_tokens])
            if end is not None:
                break
        tokens = np.concatenate(emitted, axis=1)[:, :end or max_new_tokens]
        return [postprocess_generated_text(self.tok_decode(row.tolist()), until, None) for row in tokens]

    def _place(self, rows: np.ndarray) -> jax.Array:
        """A batch's rows on the device, or split over the layout's population devices (the
        weights sharded over its model devices, as the search shards them)."""
        if self._mesh is None:
            return jnp.asarray(rows)
        return jax.device_put(rows, NamedSharding(self._mesh, P(POPULATION)))

    def _encode_prompt(self, context: str, max_context: int) -> list[int]:
        """A generation prompt's tokens as hf's `tok_batch_encode` makes them (then left-truncated)."""
        if max_context <= 0:
            raise ValueError(f"max_gen_toks leaves no room for a prompt in the model's {self.max_length} tokens")
        if has_bos_prefix(context, getattr(self.tokenizer, "bos_token", None)):
            special = {"add_special_tokens": False}
        else:
            special = self._special_tokens(None)
        tokens = self.tokenizer(context, **special).input_ids
        if len(tokens) > max_context:
            logger.warning("a prompt of %d tokens is cut to its last %d", len(tokens), max_context)
        return tokens[-max_context:]

    def _eos_ids(self) -> list[int]:
        """The ids that end a row, as transformers' generate reads them: generation_config.json's
        eos_token_id, else config.json's (none: rows end by stop sequences only). A model given in
        memory: its tokenizer's EOS."""
        ids = self._generation_eos if self._from_directory else self.tokenizer.eos_token_id
        return [] if ids is None else list(np.atleast_1d(ids).tolist())


class StopSequences:
    """hf's stopping criteria for one batch (`MultiTokenEOSCriteria` per stop sequence): a sequence
    has stopped a row once it appears in the decoded last (its token count + 2) generated tokens;
    the batch ends at the first step where one sequence has stopped every row, or every row has
    emitted an EOS id."""

    def __init__(self, tokenizer, until: list[str], rows: int, eos_ids: list[int]):
        self.tokenizer = tokenizer
        self.sequences = [(s, len(tokenizer.encode(s, add_special_tokens=False)) + 2) for s in until]
        self.stopped = np.zeros((len(until), rows), bool)  # [stop sequence, row]
        self.eos_ids = eos_ids
        self.checked = 0  # steps already checked

    def end(self, tokens: np.ndarray) -> int | None:
        """The number of generated tokens [rows, steps] at which the batch ends, if it has."""
        ended = np.isin(tokens, self.eos_ids)  # [rows, steps]
        for step in range(self.checked, tokens.shape[1]):
            for k, (sequence, lookback) in enumerate(self.sequences):
                for row in np.flatnonzero(~self.stopped[k]):
                    window = tokens[row, max(0, step + 1 - lookback):step + 1].tolist()
                    self.stopped[k, row] = sequence in self.tokenizer.decode(window)
            if self.stopped.all(axis=1).any() or ended[:, :step + 1].any(axis=1).all():
                return step + 1
        self.checked = tokens.shape[1]
        return None


def _generation_eos_ids(directory: Path):
    """generation_config.json's eos_token_id, else config.json's (a VLM's: its text config's); None if neither."""
    generation = directory / "generation_config.json"
    if generation.is_file() and (ids := json.loads(generation.read_text()).get("eos_token_id")) is not None:
        return ids
    config = read_config(directory)
    return config.get("eos_token_id", config.get("text_config", {}).get("eos_token_id"))


def _with_pad_token(tokenizer):
    """A pad token as hf's backend chooses one (`configure_pad_token`): the tokenizer's, else unk, else EOS."""
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.unk_token_id if tokenizer.unk_token is not None else tokenizer.eos_token_id
    return tokenizer


def _batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    if str(batch_size).startswith("auto"):
        chosen = int(max_batch_size or 16)
        logger.info("jaxmerge backend: batch_size=%s read as %d (buckets keep compiled shapes few)", batch_size, chosen)
        return chosen
    try:
        size = int(batch_size)
    except ValueError:
        raise ValueError(f"jaxmerge model_args: batch_size must be a positive integer, got {batch_size!r}") from None
    if size < 1:
        raise ValueError(f"jaxmerge model_args: batch_size must be a positive integer, got {batch_size!r}")
    return size
