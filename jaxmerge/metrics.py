"""The paper's metrics: MGSM-style answer extraction with a Japanese-response check, exact
match, and Japanese ROUGE-L (MeCab tokens, the public evaluation code's normalisation).

Differences from the public evaluation code, on purpose: numbers with thousands
separators ("1,000") and signs ("-7") parse correctly, and full-width digits count; the
Japanese check is script-based (no model download), with fastText's lid.176 as an option
where the user has the file.
"""

from __future__ import annotations

import functools
import re
import unicodedata

_NUMBER = re.compile(r"[-−]?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?")
# Emoticons, pictographs, transport, flags, dingbats. (The range U+24C2-U+1F251 that
# circulates in copies of this pattern would delete every kanji and kana.)
_EMOJI = re.compile("[\U0001F600-\U0001F64F\U0001F300-\U0001F5FF\U0001F680-\U0001F6FF\U0001F1E0-\U0001F1FF"
                    "\U00002702-\U000027B0]+", flags=re.UNICODE)


def extract_answer(text: str) -> float | None:
    """The last number in a response: "1,000" is 1000, "-7" is -7, "１２" is 12."""
    matches = _NUMBER.findall(unicodedata.normalize("NFKC", text))
    if not matches:
        return None
    return float(matches[-1].replace(",", "").replace("−", "-"))


def _is_japanese_char(c: str) -> bool:
    code = ord(c)
    return (0x3040 <= code <= 0x30FF  # hiragana, katakana
            or 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF  # kanji
            or 0xFF66 <= code <= 0xFF9F)  # half-width katakana


@functools.lru_cache(maxsize=2)
def _fasttext_model(path: str):
    import fasttext  # optional: only where the user has lid.176

    return fasttext.load_model(path)


def is_japanese(text: str, threshold: float = 0.5, fasttext_model: str | None = None) -> bool:
    """Whether a response is in Japanese: more than `threshold` of its letters are kana or
    kanji (or, with a fastText lid.176 model file, P(ja) > threshold)."""
    if fasttext_model is not None:
        labels, probs = _fasttext_model(fasttext_model).predict(text.replace("\n", " "), k=5)
        return dict(zip(labels, probs)).get("__label__ja", 0.0) > threshold
    letters = [c for c in unicodedata.normalize("NFKC", text) if c.isalpha()]
    if not letters:
        return False
    return sum(_is_japanese_char(c) for c in letters) / len(letters) > threshold


def mgsm_correct(response: str, answer: float, require_japanese: bool = True) -> bool:
    """An MGSM answer counts if its last number equals the answer (and it is in Japanese)."""
    value = extract_answer(response)
    if value is None or abs(value - float(answer)) > 1e-6:
        return False
    return is_japanese(response) if require_japanese else True


def exact_match(prediction: str, reference: str) -> bool:
    def norm(s):
        return " ".join(unicodedata.normalize("NFKC", s).split())
    return norm(prediction) == norm(reference)


def normalize_japanese(text: str) -> str:
    """The public evaluation code's normalisation: emoji removed, neologdn, white space collapsed."""
    import emoji
    import neologdn

    text = "".join("" if emoji.is_emoji(c) else c for c in text)
    text = _EMOJI.sub("", text)
    text = neologdn.normalize(text)
    return " ".join(text.split())


class _MecabTokenizer:
    def __init__(self):
        from fugashi import Tagger

        self.tagger = Tagger("-Owakati")

    def tokenize(self, text: str) -> list[str]:
        return self.tagger.parse(normalize_japanese(text)).split()


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_MecabTokenizer())


def rouge_l_ja(predictions: list[str], references: list[str], bootstrap: bool = True) -> float:
    """Japanese ROUGE-L F-measure x 100 over a set (bootstrap-aggregated mid, as the public
    code reports it). A prediction not in Japanese scores against "" when the reference is."""
    from rouge_score import scoring

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    scorer = _rouge_scorer()
    aggregator = scoring.BootstrapAggregator() if bootstrap else None
    scores = []
    for prediction, reference in zip(predictions, references):
        if is_japanese(reference) and not is_japanese(prediction):
            prediction = ""
        score = scorer.score(reference, prediction)
        scores.append(score["rougeL"].fmeasure)
        if aggregator is not None:
            aggregator.add_scores(score)
    if aggregator is None:
        return 100.0 * sum(scores) / max(len(scores), 1)
    return 100.0 * aggregator.aggregate()["rougeL"].mid.fmeasure
