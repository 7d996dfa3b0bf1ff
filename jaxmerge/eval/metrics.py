"""Text metrics, on the host: the last number of a response with a language check, exact
match, ROUGE-L over token ids, and the paper's Japanese ROUGE-L (MeCab tokens, the public
evaluation code's normalisation). These are the oracles of `jaxmerge.eval.token_metrics`.

Differences from the public evaluation code, on purpose: numbers with thousands separators
("1,000") and signs ("-7") parse correctly, and full-width digits count; the language check
is script-based (the share of a response's letters in the language's script; no model
download), so it works for any language of `SCRIPTS`; and a response without letters ("42",
"-7.5") passes it, as it is in no script (the public code's language detector guesses one),
unless the check is `strict` (a task's `language_strict`: the paper's MGSM-ja rule, the
answer must be written in the language, so a bare number fails).

Japanese ROUGE-L's packages (MeCab through fugashi and unidic-lite, neologdn, emoji) come
with the `ja` extra, `pip install "jaxmerge[ja]"`, and are imported only when it runs.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import unicodedata
from collections.abc import Sequence

import numpy as np

NUMBER_PATTERN = re.compile(r"[-−]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# Emoticons, pictographs, transport, flags, dingbats. (The range U+24C2-U+1F251 that
# circulates in copies of this pattern would delete every kanji and kana.)
_EMOJI = re.compile("[\U0001F600-\U0001F64F\U0001F300-\U0001F5FF\U0001F680-\U0001F6FF\U0001F1E0-\U0001F1FF"
                    "\U00002702-\U000027B0]+", flags=re.UNICODE)

# Inclusive code-point ranges of each script's letters. Only characters that are also
# `str.isalpha()` count, so marks and punctuation inside a block never weigh.
SCRIPTS: dict[str, tuple[tuple[int, int], ...]] = {
    "japanese": (
        (0x3040, 0x30FF),  # hiragana, katakana
        (0x4E00, 0x9FFF), (0x3400, 0x4DBF),  # kanji: CJK unified ideographs and extension A
        (0xFF66, 0xFF9F),  # half-width katakana
    ),
    "chinese": ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0xF900, 0xFAFF)),  # unified, extension A, compatibility
    "korean": (
        (0xAC00, 0xD7A3),  # Hangul syllables
        (0x1100, 0x11FF), (0x3130, 0x318F),  # jamo, compatibility jamo
        (0xA960, 0xA97F), (0xD7B0, 0xD7FF),  # jamo extended A and B
    ),
    "cyrillic": ((0x0400, 0x052F), (0x1C80, 0x1C8F), (0x2DE0, 0x2DFF), (0xA640, 0xA69F)),
    "arabic": ((0x0600, 0x06FF), (0x0750, 0x077F), (0x08A0, 0x08FF), (0xFB50, 0xFDFF), (0xFE70, 0xFEFF)),
    "greek": ((0x0370, 0x03FF), (0x1F00, 0x1FFF)),
    "hebrew": ((0x0590, 0x05FF), (0xFB1D, 0xFB4F)),
    "devanagari": ((0x0900, 0x097F), (0xA8E0, 0xA8FF)),
    "thai": ((0x0E00, 0x0E7F),),
    "latin": (
        (0x0041, 0x005A), (0x0061, 0x007A),  # Basic Latin letters
        (0x00C0, 0x00D6), (0x00D8, 0x00F6), (0x00F8, 0x00FF),  # Latin-1 supplement letters
        (0x0100, 0x024F),  # Latin extended A and B
        (0x1E00, 0x1EFF),  # Latin extended additional (Vietnamese)
    ),
}

ALIASES: dict[str, str] = {
    "ja": "japanese", "zh": "chinese", "ko": "korean",
    "ru": "cyrillic", "russian": "cyrillic", "uk": "cyrillic", "ukrainian": "cyrillic", "bg": "cyrillic",
    "ar": "arabic", "el": "greek", "he": "hebrew", "hi": "devanagari", "hindi": "devanagari", "th": "thai",
    "en": "latin", "english": "latin", "fr": "latin", "de": "latin", "es": "latin", "it": "latin",
    "pt": "latin", "vi": "latin",
}


def resolve_language(name: str) -> str:
    """The key of `SCRIPTS` for a language or script name or alias ("ko" -> "korean")."""
    key = name.lower()
    if key in SCRIPTS:
        return key
    if key in ALIASES:
        return ALIASES[key]
    raise ValueError(f"unknown language {name!r}: known are {', '.join(sorted(SCRIPTS))} "
                     f"(aliases {', '.join(sorted(ALIASES))})")


def in_script(char: str, language: str) -> bool:
    """Whether one character lies in the language's script ranges."""
    code = ord(char)
    return any(low <= code <= high for low, high in SCRIPTS[resolve_language(language)])


def language_fraction(text: str, language: str) -> float:
    """Share of the (NFKC-normalised) text's letters in the language's script; 0 with no letters."""
    ranges = SCRIPTS[resolve_language(language)]
    letters = [ord(c) for c in unicodedata.normalize("NFKC", text) if c.isalpha()]
    if not letters:
        return 0.0
    return sum(any(low <= code <= high for low, high in ranges) for code in letters) / len(letters)


def is_language(text: str, language: str, threshold: float = 0.5, strict: bool = False) -> bool:
    """The language check of a response: more than `threshold` of its letters are in the
    language's script, and a response without letters (digits, signs, punctuation, spaces)
    passes: "42" is in no script, so it is not in a wrong one. `strict`: a response without
    letters fails (the paper's MGSM-ja rule: the answer must be written in the language)."""
    if not any(c.isalpha() for c in unicodedata.normalize("NFKC", text)):
        return not strict
    return language_fraction(text, language) > threshold


def extract_number(text: str) -> float | None:
    """The last number in a response: "1,000" is 1000, "-7" is -7, "１２" is 12."""
    matches = NUMBER_PATTERN.findall(unicodedata.normalize("NFKC", text))
    if not matches:
        return None
    return float(matches[-1].replace(",", "").replace("−", "-"))


def number_correct(response: str, answer: float, language: str | None = None, strict: bool = False) -> bool:
    """Whether the response's last number equals the answer (and, given a language, the
    response is in it by `is_language`: the MGSM rule, where a right number in the wrong
    language fails; a bare number, "42", is in no language and passes unless `strict`)."""
    value = extract_number(response)
    if value is None or abs(value - float(answer)) > 1e-6:
        return False
    return language is None or is_language(response, language, strict=strict)


def exact_match(prediction: str, reference: str) -> bool:
    """Equal up to NFKC normalisation and white space."""
    def norm(s: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", s).split())
    return norm(prediction) == norm(reference)


def rouge_l_tokens(response: Sequence[int], reference: Sequence[int]) -> float:
    """ROUGE-L F-measure of two token-id sequences by their longest common subsequence
    (0 if either is empty): the oracle of `token_metrics.rouge_l_scores`."""
    previous = [0] * (len(response) + 1)
    for ref in reference:
        current = [0]
        for j, token in enumerate(response):
            current.append(previous[j] + 1 if token == ref else max(previous[j + 1], current[j]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(response), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


# Japanese ROUGE-L's packages (module names), installed by the `ja` extra.
JAPANESE_PACKAGES = ("fugashi", "unidic_lite", "neologdn", "emoji")


def check_japanese_packages() -> None:
    """A one-line ImportError naming the missing packages of Japanese ROUGE-L and the extra
    that installs them; nothing when they are all installed."""
    missing = [name for name in JAPANESE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"Japanese ROUGE-L (MeCab words) needs {', '.join(missing)}, not installed: "
                          'pip install "jaxmerge[ja]"')


def normalize_japanese(text: str) -> str:
    """The public evaluation code's normalisation: emoji removed, neologdn, white space collapsed."""
    check_japanese_packages()
    import emoji
    import neologdn

    text = "".join("" if emoji.is_emoji(c) else c for c in text)
    text = _EMOJI.sub("", text)
    text = neologdn.normalize(text)
    return " ".join(text.split())


class _MecabTokenizer:
    def __init__(self):
        check_japanese_packages()
        from fugashi import Tagger

        self.tagger = Tagger("-Owakati")

    def tokenize(self, text: str) -> list[str]:
        return self.tagger.parse(normalize_japanese(text)).split()


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_MecabTokenizer())


def rouge_l_ja(predictions: list[str], references: list[str], bootstrap: bool = True, strict: bool = False) -> float:
    """Japanese ROUGE-L F-measure x 100 over a set (bootstrap-aggregated mid, as the public
    code reports it, with a fixed seed). A prediction not in Japanese scores against "" when
    the reference is (`is_language`: a text without letters is in every language, unless
    `strict`, where it is in none: then a bare number scores "" against a Japanese reference,
    and a reference without letters checks nothing)."""
    from rouge_score import scoring

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = _rouge_scorer()
    aggregator = scoring.BootstrapAggregator() if bootstrap else None
    scores = []
    for prediction, reference in zip(predictions, references, strict=True):
        in_japanese = is_language(reference, "japanese", strict=strict)
        if in_japanese and not is_language(prediction, "japanese", strict=strict):
            prediction = ""
        score = scorer.score(reference, prediction)
        scores.append(score["rougeL"].fmeasure)
        if aggregator is not None:
            aggregator.add_scores(score)
    if aggregator is None:
        return 100.0 * sum(scores) / max(len(scores), 1)
    # The bootstrap resamples with numpy's global generator: seeded here (and restored after),
    # or the same responses score 0.1-0.2 apart from one run to the next.
    state = np.random.get_state()
    np.random.seed(0)
    try:
        return 100.0 * aggregator.aggregate()["rougeL"].mid.fmeasure
    finally:
        np.random.set_state(state)
