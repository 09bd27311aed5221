"""The answer-fidelity report's paired statistics (bench/answer_fidelity.py), against sums and sign tests by hand."""

import importlib.util
import math
import os
import sys

import pytest

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_spec = importlib.util.spec_from_file_location("answer_fidelity", os.path.join(_ROOT, "bench", "answer_fidelity.py"))
answer_fidelity = importlib.util.module_from_spec(_spec)
sys.path.insert(0, _ROOT)  # it imports bench.study_report
_spec.loader.exec_module(answer_fidelity)


def cell(nlls):
    """{prompt: (answer NLL, answer tokens)}, the fields of `load`'s rows these statistics read; None leaves a
    prompt out."""
    return {i: (x, 4) for i, x in enumerate(nlls) if x is not None}


def two_sided_binomial(k, n):
    tail = sum(math.comb(n, i) for i in range(min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def test_paired_difference_uses_only_shared_prompts():
    a = cell([1.0, 2.0, 0.5, None])
    b = cell([1.5, 1.0, None, 9.0])
    mean, se, lower, higher, n = answer_fidelity.paired(a, b)
    # prompts 0 and 1 only: differences -0.5 and +1.0
    assert n == 2 and (lower, higher) == (1, 1)
    assert mean == pytest.approx(0.25)
    assert se == pytest.approx(math.sqrt((0.75 ** 2 + 0.75 ** 2) / 1 / 2))


def test_pooled_sign_test_counts_each_prompt_once_over_budgets():
    # prompt 0 is lower at both budgets (one prompt, not two); prompt 1 lower by 0.2 then higher by 0.5 (higher
    # in sum); prompts 2-5 lower at one budget and equal at the other
    a = [cell([1.0, 1.0, 1.0, 1.0, 1.0, 1.0]), cell([1.0, 1.5, 2.0, 2.0, 2.0, 2.0])]
    b = [cell([2.0, 1.2, 2.0, 2.0, 2.0, 2.0]), cell([2.0, 1.0, 2.0, 2.0, 2.0, 2.0])]
    lower, higher, p, mean = answer_fidelity.pooled(a, b)
    assert (lower, higher) == (5, 1)
    assert p == pytest.approx(two_sided_binomial(1, 6))
    assert mean == pytest.approx((-2.0 + 0.3 - 1.0 * 4) / 6)


def test_agreement_counts_exact_match_flips_on_prompts_the_full_cache_gets_right():
    full = {0: (1.0, 4, True), 1: (1.0, 4, True), 2: (1.0, 4, False), 3: (1.0, 4, True)}
    a = [{0: (1.0, 4, True), 1: (3.0, 4, True), 2: (1.0, 4, True), 3: (1.0, 4, True)}]
    b = [{0: (2.0, 4, False), 1: (2.0, 4, False), 2: (2.0, 4, False), 3: (2.0, 4, True)}]
    # prompt 0: a right and lower (agree); 1: a right but higher (disagree); 2: the full cache is wrong (not
    # counted); 3: both right (no flip)
    assert answer_fidelity.agreement(a, b, full) == (1, 1)
    assert answer_fidelity.agreement(b, a, full) == (1, 1)


def test_verdict_needs_every_budget_lower_and_significance():
    assert answer_fidelity.verdict([-0.1, -0.2], 0.01) == "held"
    assert answer_fidelity.verdict([-0.1, -0.2], 0.2) == "leans its way, not significant"
    assert answer_fidelity.verdict([-0.1, 0.0], 0.01) == "not held"


def test_pairs_compare_each_combination_with_its_selector_and_each_variant_with_the_allocation_as_built():
    methods = {"full", "snapkv", "snapkv+look24", "kvzip", "joint(snapkv)", "joint(snapkv)+look24",
               "joint(snapkv)@centred", "joint(snapkv)@centred+look24", "joint(snapkv)@rms_centred+look24",
               "joint(kvzip)@global"}
    assert set(answer_fidelity.pairs_of(methods)) == {
        ("joint(snapkv)", "snapkv"), ("joint(snapkv)+look24", "snapkv+look24"),
        ("joint(snapkv)@centred", "snapkv"), ("joint(snapkv)@centred+look24", "snapkv+look24"),
        ("joint(snapkv)@rms_centred+look24", "snapkv+look24"), ("joint(kvzip)@global", "kvzip"),
        ("joint(snapkv)@centred", "joint(snapkv)"), ("joint(snapkv)@centred+look24", "joint(snapkv)+look24"),
        ("joint(snapkv)@rms_centred+look24", "joint(snapkv)+look24"),
        ("joint(snapkv)@rms_centred+look24", "joint(snapkv)@centred+look24")}
