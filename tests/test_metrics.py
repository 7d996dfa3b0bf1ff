"""The paper's metrics, against values worked out by hand."""

import pytest

from jaxmerge.metrics import exact_match, extract_answer, is_japanese, mgsm_correct, normalize_japanese, rouge_l_ja


@pytest.mark.parametrize("text,value", [
    ("答えは 1,000 円です", 1000.0),        # the public code's regex reads this as 0 or 1
    ("気温は -7 度になりました", -7.0),      # and this as 7
    ("3 + 4 = 7。答え：12.5", 12.5),
    ("合計は１２個です", 12.0),              # full-width digits
    ("2,345,678 と 9", 9.0),
    ("1,2345", 2345.0),                    # not a thousands separator: "1" and "2345"
    ("数字はありません", None),
])
def test_extract_answer(text, value):
    assert extract_answer(text) == value


def test_is_japanese():
    assert is_japanese("りんごは3個あります。")
    assert is_japanese("答えは 42 です")
    assert not is_japanese("The answer is 42.")
    assert not is_japanese("42")
    assert not is_japanese("The total is 5 apples, 答え")  # mostly English


def test_mgsm_correct_requires_japanese():
    assert mgsm_correct("よって、答えは18です。", 18)
    assert not mgsm_correct("So the answer is 18.", 18)
    assert mgsm_correct("So the answer is 18.", 18, require_japanese=False)
    assert not mgsm_correct("答えは17です。", 18)


def test_exact_match_and_normalisation():
    assert exact_match(" 赤い  ボール ", "赤い ボール")
    assert not exact_match("赤いボール", "青いボール")
    assert normalize_japanese("ﾊﾝｶｸ😀　テスト") == "ハンカクテスト"


def test_rouge_l_ja():
    # MeCab: 東京 / タワー / は / 赤い and 東京 / タワー / は / 白い -> LCS 3 of 4 tokens each side.
    assert rouge_l_ja(["東京タワーは赤い"], ["東京タワーは白い"], bootstrap=False) == pytest.approx(75.0)
    assert rouge_l_ja(["東京タワーは赤い"], ["東京タワーは赤い"]) == pytest.approx(100.0)
    assert rouge_l_ja(["Tokyo tower is red"], ["東京タワーは赤い"], bootstrap=False) == 0.0
    assert rouge_l_ja(["東京タワーは赤い", "はい"], ["東京タワーは白い", "はい"], bootstrap=False) == pytest.approx(87.5)
