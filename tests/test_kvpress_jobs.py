"""The kvpress side's job plan (bench/kvpress_study.py: what each prefill answers, and resuming)."""

import importlib.util
import os

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "kvpress_study.py")
_spec = importlib.util.spec_from_file_location("kvpress_study", _PATH)
kvpress_study = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kvpress_study)  # stdlib only at import: torch and kvpress load inside the functions


def test_one_prefill_answers_every_shared_press_and_budget_of_a_prompt():
    prompts = [{"id": "a"}, {"id": "b"}]
    presses, budgets = ["snapkv", "tova", "kvzip", "adakv_snapkv"], [0.5, 0.25]
    done = {("a", "full", 1.0), ("a", "snapkv", 0.5), ("b", "kvzip", 0.5), ("b", "kvzip", 0.25)}
    jobs = [(p["id"], pairs) for p, pairs in kvpress_study.plan_jobs(prompts, presses, budgets, done)]
    assert jobs == [("b", [("full", 1.0)]),
                    ("a", [("snapkv", 0.25), ("tova", 0.5), ("tova", 0.25)]),  # done pairs left out
                    ("b", [("snapkv", 0.5), ("snapkv", 0.25), ("tova", 0.5), ("tova", 0.25)]),
                    ("a", [("kvzip", 0.5), ("kvzip", 0.25)]),  # b's kvzip all done: no job
                    ("a", [("adakv_snapkv", 0.5), ("adakv_snapkv", 0.25)]),
                    ("b", [("adakv_snapkv", 0.5), ("adakv_snapkv", 0.25)])]
    # every (prompt, press, budget) not done is in exactly one job
    wanted = {(p["id"], n, b) for p in prompts for n in presses for b in budgets} | {("a", "full", 1.0),
                                                                                   ("b", "full", 1.0)}
    planned = [(i, n, b) for i, pairs in jobs for n, b in pairs]
    assert sorted(planned) == sorted(wanted - done)


def test_a_press_outside_the_shared_kinds_runs_one_budget_per_prefill(monkeypatch):
    monkeypatch.setattr(kvpress_study, "SHARED_PREFILL", ())
    jobs = kvpress_study.plan_jobs([{"id": "a"}], ["snapkv"], [0.5, 0.25], set())
    assert [pairs for _, pairs in jobs] == [[("full", 1.0)], [("snapkv", 0.5)], [("snapkv", 0.25)]]
