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


def _tiny_llama():
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      attn_implementation="eager")
    return transformers.LlamaForCausalLM(config).eval()


def _compressed_caches(model, ids, keeps):
    """One cache per kept-slot list: the prompt's prefill with only those slots kept in every layer (what a press
    leaves), and the greedy first token after the prompt."""
    import torch
    from transformers import DynamicCache

    full = DynamicCache(config=model.config)
    with torch.inference_mode():
        first = int(model(input_ids=torch.tensor([ids]), past_key_values=full, use_cache=True).logits[0, -1].argmax())
    caches = []
    for keep in keeps:
        cache = DynamicCache(config=model.config)
        for i, layer in enumerate(full.layers):
            cache.update(layer.keys[:, :, keep].clone(), layer.values[:, :, keep].clone(), i)
        caches.append(cache)
    return caches, first


def test_batched_decode_gives_each_cache_its_own_greedy_answer():
    """Caches of different lengths decoded as one padded batch give the ids each gives decoded alone."""
    model = _tiny_llama()
    ids = list(range(3, 23))
    keeps = [list(range(20)), list(range(0, 20, 2)), [0, 1, 2, 17, 18, 19]]
    caches, first = _compressed_caches(model, ids, keeps)
    alone = [kvpress_study._decode(model, c, first, len(ids), 8, eos=-1) for c in caches]
    caches, _ = _compressed_caches(model, ids, keeps)
    together = kvpress_study._decode_together(model, caches, first, len(ids), 8, eos=-1)
    assert together == alone
    assert len({tuple(a) for a in alone}) > 1  # the caches really answer differently: a mixed-up row would show


def test_batched_decode_stops_each_row_at_its_own_end_of_sequence():
    model = _tiny_llama()
    ids = list(range(3, 23))
    caches, first = _compressed_caches(model, ids, [list(range(20)), list(range(0, 20, 2))])
    alone = [kvpress_study._decode(model, c, first, len(ids), 8, eos=-1) for c in caches]
    eos = alone[1][3]  # the second row's fourth token ends it there
    caches, _ = _compressed_caches(model, ids, [list(range(20)), list(range(0, 20, 2))])
    together = kvpress_study._decode_together(model, caches, first, len(ids), 8, eos=eos)
    assert together[1] == alone[1][:alone[1].index(eos)]
    assert together[0] == (alone[0][:alone[0].index(eos)] if eos in alone[0] else alone[0])


def test_masked_key_indices_of_stacked_rows_point_at_each_rows_own_copy():
    import torch

    row0 = (torch.tensor([0, 0]), torch.tensor([1, 0]), torch.tensor([5, 7]))
    row1 = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    batch, heads, slots = kvpress_study._masks_as_rows([row0, row1])
    assert batch.tolist() == [0, 0, 1] and heads.tolist() == [1, 0, 1] and slots.tolist() == [5, 7, 2]


def test_masked_keys_are_set_per_layer_and_cleared_even_when_decoding_raises():
    from types import SimpleNamespace

    layers = [SimpleNamespace(self_attn=SimpleNamespace(layer_idx=i, masked_key_indices=None)) for i in range(3)]
    model = SimpleNamespace(model=SimpleNamespace(layers=layers))
    with kvpress_study._masked_keys(model, lambda i: ("mask", i)):
        assert [layer.self_attn.masked_key_indices for layer in layers] == [("mask", 0), ("mask", 1), ("mask", 2)]
    assert all(layer.self_attn.masked_key_indices is None for layer in layers)
    try:
        with kvpress_study._masked_keys(model, lambda i: ("mask", i)):
            raise RuntimeError("decoding failed")
    except RuntimeError:
        pass
    assert all(layer.self_attn.masked_key_indices is None for layer in layers)  # the next prompt decodes unmasked


def _fake_presses(monkeypatch, wrong=()):
    """The checks' generators replaced by a rule: answer ids (budget * 100, len(press name)), kept = 7; keys in
    `wrong` come out different, as a changed implementation's would."""
    def answer(name, budget):
        ids = [int(budget * 100), len(name)]
        return (ids + [1], 7) if (name, budget) in wrong else (ids, 7)

    budget_of = [None]  # one prefill per budget (`generate`) is not told the budget: the test sets it
    monkeypatch.setattr(kvpress_study, "load", lambda attn: attn)
    monkeypatch.setattr(kvpress_study, "make_press", lambda name, ratio, q: name)
    monkeypatch.setattr(kvpress_study, "generate_every_press",
                        lambda model, prompt, wanted: {(n, b): answer(n, b) for n, b in wanted})
    monkeypatch.setattr(kvpress_study, "generate_every_budget",
                        lambda model, name, prompt, budgets: {b: answer(name, b) for b in budgets})
    monkeypatch.setattr(kvpress_study, "generate", lambda model, press, *args: (
        answer("full", 1.0) if press is None else answer(press, budget_of[0])))
    return answer, budget_of


def _stored_rows(tmp_path, prompt_ids, keys):
    import json

    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps({"id": i, "press": n, "budget": b, "generated_ids": [int(b * 100), len(n)],
                                        "kept_tokens": 7}) + "\n" for i in prompt_ids for n, b in keys))
    return str(path)


def test_check_batched_counts_answers_equal_to_the_stored_rows_and_fails_on_one_that_differs(monkeypatch, tmp_path,
                                                                                              capsys):
    import argparse

    import pytest

    keys = [("snapkv", 0.5), ("snapkv", 0.25), ("kvzip", 0.5)]
    prompts = [{"id": "a"}, {"id": "b"}, {"id": "c"}]
    args = argparse.Namespace(results=_stored_rows(tmp_path, ["a", "b"], keys), check_batched=3)
    _fake_presses(monkeypatch)
    kvpress_study.check_batched(args, prompts, ["snapkv", "kvzip"], [0.5, 0.25])
    out = capsys.readouterr().out
    # both ways, 3 stored answers of each of a and b; c has no stored rows and is not run
    assert "batched decode: 6 answers identical to the stored rows, 0 differ" in out
    assert "one cache at a time: 6 answers identical to the stored rows, 0 differ" in out
    _fake_presses(monkeypatch, wrong={("kvzip", 0.5)})
    with pytest.raises(SystemExit):
        kvpress_study.check_batched(args, prompts, ["snapkv", "kvzip"], [0.5, 0.25])
    assert "4 answers identical to the stored rows, 2 differ: [('a', 'kvzip', 0.5), ('b', 'kvzip', 0.5)]" \
        in capsys.readouterr().out


def test_check_shared_needs_every_way_to_give_the_stored_answer(monkeypatch, tmp_path, capsys):
    import argparse

    import pytest

    keys = [("snapkv", 0.5), ("tova", 0.5)]
    prompt = {"id": "a", "context": [1, 2, 3], "question": [4], "max_new_tokens": 2, "eos_id": 0}
    args = argparse.Namespace(results=_stored_rows(tmp_path, ["a"], keys), check_shared=1)
    _, budget_of = _fake_presses(monkeypatch)
    budget_of[0] = 0.5
    kvpress_study.check_shared(args, [prompt], ["snapkv", "tova"], [0.5, 0.25])
    out = capsys.readouterr().out
    assert "shared prefill: 2 answers identical to one prefill per budget (run now) and the stored rows, 0 differ" \
        in out
    assert "one prefill for every press: 2 answers identical to the stored rows, 0 differ" in out
    # one prefill per budget disagrees (its answers take another budget's ids): the shared prefill's check fails
    budget_of[0] = 0.25
    with pytest.raises(SystemExit):
        kvpress_study.check_shared(args, [prompt], ["snapkv", "tova"], [0.5, 0.25])
    assert "0 answers identical to one prefill per budget (run now) and the stored rows, 2 differ" \
        in capsys.readouterr().out


def test_check_attention_runs_the_full_cache_and_the_scoring_presses_under_both_attentions(monkeypatch, tmp_path,
                                                                                           capsys):
    import argparse

    import pytest

    keys = [("full", 1.0), ("snapkv", 0.5), ("tova", 0.25)]
    prompt = {"id": "a", "context": [1, 2, 3], "question": [4], "max_new_tokens": 2, "eos_id": 0}
    args = argparse.Namespace(results=_stored_rows(tmp_path, ["a"], keys), check_attention=1)
    loaded = []
    _fake_presses(monkeypatch)
    monkeypatch.setattr(kvpress_study, "load", lambda attn: loaded.append(attn) or attn)
    kvpress_study.check_attention(args, [prompt], ["snapkv", "tova"], [0.5, 0.25])
    out = capsys.readouterr().out
    assert sorted(loaded) == ["eager", "sdpa"]
    assert "sdpa: 3 answers identical to the stored rows, 0 differ" in out
    assert "eager: 3 answers identical to the stored rows, 0 differ" in out
    _fake_presses(monkeypatch, wrong={("full", 1.0)})
    with pytest.raises(SystemExit):
        kvpress_study.check_attention(args, [prompt], ["snapkv", "tova"], [0.5, 0.25])
    assert "2 answers identical to the stored rows, 1 differ: [('a', 'full', 1.0)]" in capsys.readouterr().out
