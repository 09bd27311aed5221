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
