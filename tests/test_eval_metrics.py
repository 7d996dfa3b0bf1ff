"""The text metrics, against values worked out by hand and plain-Python oracles."""

import numpy as np
import pytest

from jaxmerge.eval.metrics import (
    SCRIPTS,
    exact_match,
    extract_number,
    in_script,
    is_language,
    language_fraction,
    normalize_japanese,
    number_correct,
    resolve_language,
    rouge_l_ja,
    rouge_l_tokens,
)


@pytest.mark.parametrize("text,value", [
    ("答えは 1,000 円です", 1000.0),        # the public code's regex reads this as 0 or 1
    ("気温は -7 度になりました", -7.0),      # and this as 7
    ("気温は −7 度", -7.0),                 # the minus sign U+2212
    ("3 + 4 = 7。答え：12.5", 12.5),
    ("合計は１２個です", 12.0),              # full-width digits
    ("合計は１，２３４個", 1234.0),          # full-width digits and comma
    ("2,345,678 と 9", 9.0),
    ("The total is 2,345,678", 2345678.0),
    ("1,2345", 2345.0),                    # not a thousands separator: "1" and "2345"
    ("-0.25 then 3.", 3.0),
    ("Ответ: -0.25", -0.25),
    ("数字はありません", None),
    ("", None),
])
def test_extract_number(text, value):
    assert extract_number(text) == value


def test_japanese_script_is_the_kana_and_kanji_ranges():
    """SCRIPTS["japanese"] holds exactly the code points the Japanese check has always used."""
    def oracle(code):
        return 0x3040 <= code <= 0x30FF or 0x4E00 <= code <= 0x9FFF or 0x3400 <= code <= 0x4DBF or \
            0xFF66 <= code <= 0xFF9F

    codes = range(0x20000)
    assert [in_script(chr(c), "japanese") for c in codes] == [oracle(c) for c in codes]


EDGE_LETTERS = {  # letters at the ends of each script's blocks, and a few from the extra blocks
    "chinese": "一龥㐀䶵豈",
    "korean": "가힣ᄀᇿㄱㆎꥠퟻ",
    "cyrillic": "ЀЖяӿԯꙀ",
    "arabic": "ءيݐﭐﻼ",
    "greek": "ΑωἀῼΆ",
    "hebrew": "אתשׁ",
    "devanagari": "अहॐ",
    "thai": "กฮ",
    "latin": "AZazÀÖØöøÿĀžǍɏẠỹ",
}


@pytest.mark.parametrize("language", sorted(EDGE_LETTERS))
def test_in_script_edges(language):
    for char in EDGE_LETTERS[language]:
        assert in_script(char, language), (language, char, hex(ord(char)))
        for other in EDGE_LETTERS:
            if other != language and {language, other} != {"japanese", "chinese"}:
                assert not in_script(char, other), (language, other, char)
    for char in "×÷ 0-!":  # Latin-1 symbols between its letters, digits, punctuation
        assert not in_script(char, language)


def test_scripts_are_well_formed():
    for language, ranges in SCRIPTS.items():
        assert ranges and all(0 <= low <= high <= 0x10FFFF for low, high in ranges), language
        assert resolve_language(language) == language


SAMPLES = {
    "japanese": "りんごは3個あります。",
    "chinese": "我们今天去公园散步",
    "korean": "안녕하세요 세계",
    "cyrillic": "Привет, мир! Ответ 42.",
    "arabic": "مرحبا بالعالم",
    "greek": "Γειά σου κόσμε",
    "hebrew": "שלום עולם",
    "devanagari": "नमस्ते दुनिया",
    "thai": "สวัสดีชาวโลก",
    "latin": "Hello world, ça va très bien",
}


def test_every_script_has_a_sample():
    assert set(SAMPLES) == set(SCRIPTS)


@pytest.mark.parametrize("language", sorted(SAMPLES))
def test_is_language(language):
    """Each sample is in its own language and in no other (Chinese is also Japanese: kanji)."""
    assert is_language(SAMPLES[language], language)
    assert language_fraction(SAMPLES[language], language) == 1.0
    for other, text in SAMPLES.items():
        if other != language and {language, other} != {"japanese", "chinese"}:
            assert not is_language(text, language), (language, other)


def test_is_language_mixed_and_empty():
    assert is_language("答えは 42 です", "ja")
    assert is_language("我们今天去公园散步", "japanese")  # kanji count as Japanese
    assert not is_language("りんごは3個あります。", "chinese")  # one hanzi of nine letters
    assert not is_language("The answer is 42.", "japanese")
    # No letters: in no script, so in no wrong one (tests/test_language_checks.py).
    assert is_language("42", "japanese") and is_language("-1,000.5 = ?", "latin")
    assert is_language("", "korean") and language_fraction("", "korean") == 0.0
    # strict (a task's language_strict, the paper's MGSM-ja rule): no letters, no language.
    assert not is_language("42", "japanese", strict=True) and not is_language("", "korean", strict=True)
    assert is_language("答えは42", "japanese", strict=True) and not is_language("42 is it", "japanese", strict=True)
    assert not is_language("The total is 5 apples, 答え", "japanese")  # mostly English
    assert language_fraction("안녕 hello", "ko") == pytest.approx(2 / 7)
    assert language_fraction("ｱｲｳ abc", "japanese") == pytest.approx(0.5)  # half-width katakana, NFKC
    assert not is_language("ｱｲｳ abc", "japanese") and is_language("ｱｲｳ abc", "japanese", threshold=0.4)
    assert is_language("Xin chào thế giới", "vi")  # Latin extended additional
    assert in_script("Ж", "ru") and not in_script("Ж", "greek") and in_script("ω", "el")


def test_resolve_language():
    assert resolve_language("ja") == resolve_language("Japanese") == "japanese"
    assert resolve_language("ru") == "cyrillic" and resolve_language("en") == "latin"
    assert resolve_language("hi") == "devanagari" and resolve_language("ko") == "korean"
    with pytest.raises(ValueError, match="klingon.*korean"):
        resolve_language("klingon")
    with pytest.raises(ValueError, match="klingon"):
        is_language("qapla'", "klingon")


def test_number_correct():
    assert number_correct("よって、答えは18です。", 18, "japanese")
    assert not number_correct("So the answer is 18.", 18, "japanese")
    assert number_correct("So the answer is 18.", 18)
    assert number_correct("So the answer is 18.", 18.0, "en")
    assert not number_correct("答えは17です。", 18, "japanese")
    assert not number_correct("答えはありません", 18)
    assert number_correct("정답은 1,234 입니다", 1234, "korean")
    assert not number_correct("정답은 1,234 입니다", 1234, "japanese")
    assert number_correct("Ответ: −3", -3, "ru")
    assert not number_correct("Ответ: 3", -3, "ru")
    # A bare number: in no script, so it passes the language check, unless strict (MGSM-ja's rule).
    assert number_correct("18", 18, "japanese") and not number_correct("18", 18, "japanese", strict=True)
    assert number_correct("答えは18", 18, "japanese", strict=True) and number_correct("18", 18, strict=True)


def test_exact_match_and_normalisation():
    assert exact_match(" 赤い  ボール ", "赤い ボール")
    assert exact_match("ＡＢＣ", "ABC")  # NFKC
    assert not exact_match("赤いボール", "青いボール")
    assert normalize_japanese("ﾊﾝｶｸ😀　テスト") == "ハンカクテスト"


def lcs_oracle(a, b):
    """Longest common subsequence by brute force over b's subsequences (tiny inputs)."""
    from itertools import combinations

    def is_subsequence(sub, seq):
        it = iter(seq)
        return all(x in it for x in sub)

    for size in range(min(len(a), len(b)), 0, -1):
        if any(is_subsequence(sub, a) for sub in combinations(b, size)):
            return size
    return 0


def test_rouge_l_tokens_known_values():
    assert rouge_l_tokens([1, 2, 3, 4], [1, 3, 4, 5]) == pytest.approx(0.75)
    assert rouge_l_tokens([1, 2], [1, 2]) == 1.0
    assert rouge_l_tokens([1, 2], [3, 4]) == 0.0
    assert rouge_l_tokens([], [1]) == 0.0 and rouge_l_tokens([1], []) == 0.0
    # LCS 2 ([7, 9]); precision 2/3, recall 2/5.
    assert rouge_l_tokens([7, 8, 9], [7, 1, 2, 9, 3]) == pytest.approx(2 * (2 / 3) * (2 / 5) / (2 / 3 + 2 / 5))


def test_rouge_l_tokens_equal_the_oracles():
    """Random pairs: the LCS F-measure equals brute force and rouge-score's ROUGE-L."""
    from rouge_score import rouge_scorer

    class IdTokenizer:
        def tokenize(self, text):
            return text.split()

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=IdTokenizer())
    rng = np.random.default_rng(0)
    partial = 0
    for _ in range(300):
        response = rng.integers(0, 5, rng.integers(0, 8)).tolist()
        reference = rng.integers(0, 5, rng.integers(0, 8)).tolist()
        got = rouge_l_tokens(response, reference)
        lcs = lcs_oracle(response, reference)
        expected = 0.0 if lcs == 0 else 2 * lcs / (len(response) + len(reference))  # F1 of lcs/|r|, lcs/|ref|
        assert got == pytest.approx(expected), (response, reference)
        score = scorer.score(" ".join(map(str, reference)), " ".join(map(str, response)))["rougeL"].fmeasure
        assert got == pytest.approx(score), (response, reference)
        partial += 0 < got < 1
    assert partial > 100


def test_rouge_l_ja():
    # MeCab: 東京 / タワー / は / 赤い and 東京 / タワー / は / 白い -> LCS 3 of 4 tokens each side.
    assert rouge_l_ja(["東京タワーは赤い"], ["東京タワーは白い"], bootstrap=False) == pytest.approx(75.0)
    assert rouge_l_ja(["東京タワーは赤い"], ["東京タワーは赤い"]) == pytest.approx(100.0)
    assert rouge_l_ja(["Tokyo tower is red"], ["東京タワーは赤い"], bootstrap=False) == 0.0
    # A non-Japanese prediction is kept against a non-Japanese reference.
    assert rouge_l_ja(["Tokyo tower is red"], ["Tokyo tower is white"], bootstrap=False) > 0.0
    scores = rouge_l_ja(["東京タワーは赤い", "はい"], ["東京タワーは白い", "はい"], bootstrap=False)
    assert scores == pytest.approx(87.5)
    with pytest.raises(ValueError):
        rouge_l_ja(["はい"], [])


def test_rouge_l_ja_bootstrap_is_repeatable():
    """The bootstrap's resampling is seeded: the same responses score the same every time
    (they moved by 0.1-0.2 between runs), near the plain mean, and numpy's global generator
    is left as it was."""
    import numpy as np

    rng = np.random.default_rng(0)
    words = ["東京", "タワー", "は", "赤い", "白い", "です", "高い", "大きい"]
    predictions = ["".join(rng.choice(words, 4)) for _ in range(60)]
    references = ["".join(rng.choice(words, 4)) for _ in range(60)]
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first, second = rouge_l_ja(predictions, references), rouge_l_ja(predictions, references)
    assert first == second and abs(first - rouge_l_ja(predictions, references, bootstrap=False)) < 2.0
    np.testing.assert_array_equal(np.random.get_state()[1], before)
