"""The study's paired tests of claims (b) and (c) (bench/study_report.py), against binomial tails by hand."""

import importlib.util
import math
import os

import pytest

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "study_report.py")
_spec = importlib.util.spec_from_file_location("study_report", _PATH)
study_report = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(study_report)


def cell(correct):
    """A study cell of {prompt: (correct, kv bytes)} as _cell builds it."""
    return study_report._cell({i: (c, 0.5) for i, c in enumerate(correct)})


def two_sided_binomial(k, n):
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_paired_test_counts_only_discordant_prompts():
    a = cell([1, 1, 1, 0, 0, 1, 1, 1])
    b = cell([1, 0, 0, 0, 1, 0, 1, 0])
    wins, losses, p = study_report.paired_test(a, b)
    assert (wins, losses) == (4, 1)
    assert p == pytest.approx(two_sided_binomial(1, 5))
    assert study_report.paired_test(a, a)[2] == 1.0


def test_pooled_test_counts_each_prompt_once_over_budgets():
    # prompt 0 gains at both budgets (one prompt, not two); prompt 1 gains at one, loses at the other (no change)
    high = [cell([1, 1, 0, 1, 1, 1, 1, 1, 1]), cell([1, 0, 1, 1, 1, 1, 1, 1, 1])]
    low = [cell([0, 0, 0, 0, 0, 0, 0, 0, 1]), cell([0, 1, 1, 0, 0, 0, 0, 0, 1])]
    gains, losses, p = study_report.pooled_test(list(zip(high, low)))
    assert (gains, losses) == (6, 0)  # prompts 0 and 3-7
    assert p == pytest.approx(two_sided_binomial(0, 6))


def test_verdict_needs_every_budget_and_significance():
    assert study_report._verdict([(0.6, 0.5), (0.5, 0.4)], (7, 0, 0.016)) == "held"
    assert study_report._verdict([(0.6, 0.5), (0.5, 0.4)], (3, 0, 0.25)) == "leans its way, not significant"
    assert study_report._verdict([(0.6, 0.5), (0.4, 0.4)], (7, 0, 0.016)) == "not held"


def test_kept_interval_matches_agresti_min_by_hand():
    # 100 prompts, the full cache right on 61; the row loses 4 of them and gains 1: difference -0.03
    full, row = {"n": 100, "accuracy": 0.61}, {"n": 100, "accuracy": 0.58}
    low, high = study_report.kept_interval(row, full, won=1, lost=4)
    # by hand: cells + 1/2 -> 1.5 / 4.5 of 102; diff -3/102; half-width 1.96 sqrt(6 - 9/102) / 102
    half = 1.96 * math.sqrt(6 - 9 / 102) / 102
    assert low == pytest.approx((0.61 - 3 / 102 - half) / 0.61)
    assert high == pytest.approx((0.61 - 3 / 102 + half) / 0.61)
    # no prompt disagrees: still an interval of positive width (a plain Wald interval would collapse to 100-100%)
    low, high = study_report.kept_interval(full, full, won=0, lost=0)
    assert low < 1.0 < high


def test_kept_interval_covers_the_true_share_about_95_percent_of_the_time():
    import numpy as np

    rng = np.random.default_rng(0)
    n, p_full, p_lose, p_gain = 100, 0.6, 0.08, 0.03  # true share kept: (0.6 - 0.05) / 0.6
    truth, covered = (p_full - p_lose + p_gain) / p_full, 0
    for _ in range(2000):
        full_right = rng.random(n) < p_full
        flip = rng.random(n)
        row_right = np.where(full_right, flip >= p_lose / p_full, flip < p_gain / (1 - p_full))
        won, lost = int((row_right & ~full_right).sum()), int((~row_right & full_right).sum())
        full = {"n": n, "accuracy": full_right.mean()}
        low, high = study_report.kept_interval({"n": n}, full, won, lost)
        covered += low <= truth <= high
    # the interval divides by the observed full-cache accuracy, so coverage is near, not exactly, 95%
    assert 0.90 <= covered / 2000 <= 0.99


def test_ratio_interval_matches_the_delta_method_by_hand():
    full, row = [1.0, 0.5, 0.0, 1.0], [1.0, 0.0, 0.0, 0.5]
    ratio, low, high = study_report.ratio_interval(row, full)
    # by hand: means 0.375 / 0.625, r = 0.6; sample (co)variances with n - 1 = 3
    r, my = 0.6, 0.625
    s_xx = ((1 - .375) ** 2 + .375 ** 2 + .375 ** 2 + .125 ** 2) / 3
    s_yy = (.375 ** 2 + .125 ** 2 + .625 ** 2 + .375 ** 2) / 3
    s_xy = ((1 - .375) * .375 + (-.375) * (-.125) + (-.375) * (-.625) + .125 * .375) / 3
    half = 1.96 * math.sqrt((s_xx - 2 * r * s_xy + r * r * s_yy) / 4) / my
    assert ratio == pytest.approx(r)
    assert (low, high) == pytest.approx((r - half, r + half))


def test_ratio_interval_covers_the_true_share_about_95_percent_of_the_time():
    import numpy as np

    rng = np.random.default_rng(1)
    n, covered = 100, 0
    # each prompt's full cache recalls 0, 1 or 2 of 2 items (mean 0.6); the row drops an item it had with
    # probability 0.1 (true share kept: 0.9)
    for _ in range(2000):
        items = rng.choice([0, 1, 2], size=n, p=[0.25, 0.3, 0.45])
        kept = items - rng.binomial(items, 0.1)
        ratio, low, high = study_report.ratio_interval(list(kept / 2), list(items / 2))
        covered += low <= 0.9 <= high
    assert 0.92 <= covered / 2000 <= 0.98


def test_ratio_interval_refuses_what_it_cannot_measure():
    assert study_report.ratio_interval([0.5, 1.0], [0.0, 0.0]) is None  # no share of nothing
    with pytest.raises(ValueError, match="equal-length"):
        study_report.ratio_interval([1.0, 0.5, 0.0], [1.0, 1.0])
    with pytest.raises(ValueError, match=">= 2 prompts"):
        study_report.ratio_interval([1.0], [1.0])


def test_items_recalled_is_rulers_string_match_all():
    # RULER: sum(r.lower() in pred.lower() for r in refs) / len(refs), substrings, case ignored
    assert study_report.items_recalled("1234567 7654321", "are 12345678 and 7654321.") == 1.0
    assert study_report.items_recalled("Alpha 7654321", "ALPHA: none") == 0.5
    assert study_report.items_recalled("1234567 7654321", "nothing here") == 0.0


def test_claim_a_on_items_picks_among_rows_sharing_the_most_prompts():
    full = {i: 1.0 for i in range(4)}
    recall = {("multi_value", 1024, "full", 1.0): full,
              ("multi_value", 1024, "joint(snapkv)+look24", 0.375): {0: 1.0, 1: 1.0, 2: 0.5, 3: 0.5},
              ("multi_value", 1024, "joint(kvzip)@global", 0.375): {0: 1.0}}  # 1 prompt in: not eligible
    [line] = study_report.claim_a_on_items(recall, ["multi_value"], [1024])
    assert "joint(snapkv)+look24" in line and "75.0%" in line and "4 prompts" in line


def test_claim_c_pooled_counts_each_task_prompt_once():
    cell = lambda *correct: {"items": {i: (c,) for i, c in enumerate(correct)}}  # noqa: E731
    ours = {("needle", 1024, "joint(snapkv)", 0.5): cell(1, 1, 0), ("needle", 1024, "snapkv", 0.5): cell(1, 0, 0),
            ("needle", 1024, "joint(snapkv)", 0.25): cell(1, 1, 0), ("needle", 1024, "snapkv", 0.25): cell(0, 0, 1),
            # prompt 0 of multi_key is a different prompt from needle's prompt 0
            ("multi_key", 1024, "joint(snapkv)", 0.5): cell(0, 1), ("multi_key", 1024, "snapkv", 0.5): cell(1, 1)}
    [line] = study_report.claim_c_pooled(ours, ["needle", "multi_key"], [1024], [0.5, 0.25])
    # needle: prompt 0 +1, prompt 1 +2, prompt 2 -1; multi_key: prompt 0 -1 -> 2 gained, 2 lost
    assert "over 2 task-lengths" in line and "gained-lost 2-2" in line and "p=1" in line


def test_claim_a_on_items_gives_no_interval_when_nothing_differs():
    same = {0: 1.0, 1: 0.5, 2: 0.0}
    recall = {("two_needles", 1024, "full", 1.0): same, ("two_needles", 1024, "joint(snapkv)+look24", 0.375): same}
    [line] = study_report.claim_a_on_items(recall, ["two_needles"], [1024])
    assert "100.0%" in line and "no interval" in line and "95% interval" not in line


def test_best_combination_picks_among_rows_with_the_most_prompts():
    few = cell([1] * 20)  # perfect on 20 prompts
    many, weaker = cell([1] * 60 + [0] * 40), cell([1] * 50 + [0] * 50)
    rows = [("few", few), ("many", many), ("weaker", weaker)]
    assert study_report.best_combination(rows)[0] == "many"
    assert study_report.best_combination([]) == (None, None)


def test_rows_are_compared_under_the_same_observation_and_protocol():
    """A combination row is compared with its selector under the same lookahead and question protocol."""
    assert study_report.selector_of("joint(snapkv)") == "snapkv"
    assert study_report.selector_of("joint(snapkv)+look24") == "snapkv+look24"
    assert study_report.selector_of("joint(snapkv)+qfull") == "snapkv+qfull"
    assert study_report.selector_of("snapkv+groups(snapkv)+qfull") == "snapkv+qfull"
    assert study_report.is_token_method("streaming+qfull") and not study_report.is_token_method("joint(snapkv)+qfull")
