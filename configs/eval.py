"""Evaluation of KV-cache compression: tasks x methods x budgets (see subtoken_jax/evaluation/).

    python eval.py --config configs/eval.py --workdir runs/default          # the model train.py trained there
    python eval.py --config configs/eval.py --workdir runs/qwen_eval \
        --config.model.checkpoint=/path/to/Qwen2.5-0.5B --config.tasks='("needle","mmlu")' \
        --config.mmlu.files='("/data/mmlu/test/*.csv",)'

Every prompt is context + question. The context is prefilled and captured (capture_prefill_state), the
method builds token-keep / value-group masks over it, and the question and a greedy answer then run
over the context packed under those masks, so only kept keys and value groups are read (question and
answer tokens uncompressed; generation="masked": a dense cache under the masks instead).

A budget b is the fraction of the context's KV bytes kept: keys + values (half each) + index metadata.
token_budgets gives budgets as counts instead (the bytes of N whole tokens per prompt; reported as "N tok").
  full                      no compression (reported at b = 1)
  snapkv h2o streaming key_norm random expected_attention
                            the token selector alone, keeping b of the tokens (+ int32 indices)
  subtoken                  every key, and rho = 2b - 1 of the value groups chosen by subtoken.scorer
                            (only b > 1/2 fits); scorer "predictor" = the trained ValueGroupPredictor in
                            predictor.workdir (train.py --config configs/predictor.py)
  combined                  combined.selector keeps tau of the tokens, then rho of their value groups, with
                            tau (1 + rho) / 2 = b: rho = combined.value_fraction and tau = 2b / (1 + rho)
                            (tau capped at 1, then rho = 2b - 1); or, with combined.token_fractions, the
                            largest listed tau with rho = 2b/tau - 1 in (0, 1]
  joint                     tokens and value groups from the one budget b: each (token, KV head) keeps its key
                            and its k best groups (scored by joint.scorer) or nothing, k chosen per token by
                            the squared read-out error it saves per byte (selectors.allocate_joint)
  routed                    the adapted model of WORKDIR/adapt, its router at value budget rho = 2b - 1
                            (fixed_k: rounded down to k/G; adaptive: rho met exactly over each context, see
                            routed.exact_budget)
  routed_tokens             routed at rho = routed.value_fraction, then routed.token_selector (query-free) keeps
                            tau = 2b / (1 + rho) of the tokens, scored on the routed model's cached keys; at
                            b >= (1 + rho) / 2 it is routed
  norm_groups random_groups every key, and per token and KV head the floor(rho G) value groups of largest norm /
                            random ones, on the base model (query-independent baselines, no training)
  norm_span                 every key, and rho of each KV head's (token, group) pairs of largest norm over the
                            context (a variable number per token: what an untrained adaptive router keeps)
Counts are rounded down, so the realised bytes stay within b plus the index metadata.

Scoring: perplexity = exp(mean NLL) of each chunk's continuation after its compressed first
prefix_fraction (query-aware selectors observe the prefix's last `window` tokens); needle = the needle's
number is contained in the first generated line; variable_tracking = every expected variable name is a
word of the first generated line; mmlu = the letter whose " A".." D" continuation is most likely.

Results go to WORKDIR/eval/: results.json / .csv (records: task, method, budget, kv_budget,
key_fraction, value_fraction, index_fraction, tau, rho, metric, value, num_examples), results.md,
examples.jsonl (every answer; for perplexity every sequence's NLL), quality_<task>.png, needle_grid.png,
value_groups.png.
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0

    # The model: empty checkpoint = the workdir's training run (pretrain stage base, adapt stage = routed).
    c.model = ConfigDict()
    c.model.checkpoint = ""  # a local Hugging Face folder to evaluate instead
    c.model.dtype = "float32"  # for model.checkpoint only (a workdir's model keeps its training dtypes)
    c.model.param_dtype = "float32"
    c.model.value_groups = 8  # G for model.checkpoint; must divide its head_dim
    c.add_bos = config_dict.placeholder(bool)  # None: BOS when a Hugging Face base's tokenizer.json adds one
    # needle / variable tracking as one user turn of the model's chat template (instruct models);
    # None: when the pretrained base's tokenizer carries a template
    c.chat_template = config_dict.placeholder(bool)

    c.tasks = ("perplexity", "needle", "variable_tracking")  # and "mmlu" (needs mmlu.files)
    c.methods = ("full", "snapkv", "h2o", "streaming", "key_norm", "random", "expected_attention", "subtoken",
                 "combined", "joint", "routed")  # and routed_tokens, norm_groups, random_groups, norm_span
    c.budgets = (1.0, 0.75, 0.5, 0.25)  # fractions of the context's KV bytes kept, in (0, 1]
    # budgets as counts instead: each N keeps the KV bytes of N whole tokens per prompt, whatever its length
    # (token methods keep N tokens, joint N tokens' bytes, combined 2N / (1 + rho) tokens at rho of their groups);
    # methods that keep every key (subtoken, routed, the group baselines) take fractions only
    c.token_budgets = ()
    c.batch_size = 4  # prompts per batch
    c.pad_multiple = 32  # contexts are left-padded to a multiple of this (fewer shapes to compile)
    c.extra_new_tokens = 4  # answer tokens per item beyond the reference answer (tasks.new_tokens)
    c.allocation_scope = "global"  # value-group budget shared over: head | layer | global
    # needle / variable tracking answers: "packed" = generated from the packed cache (only kept keys and value
    # groups stored; subtoken_jax.generate_from_state); "masked" = a dense cache under the masks (reference)
    c.generation = "packed"
    # what a dropped value group of a kept token reads as in the packed cache: "zero" (the method as built) or
    # "mean" (the context's mean value of that layer and KV head; generation tasks only)
    c.value_fill = "zero"
    # how the question reaches the answer (generation tasks, packed): "compressed" = the question is read over the
    # compressed context (its keys, values and the first answer token from the packed cache); "full" = its prefill
    # over the full context, before compression, is kept uncompressed (kvpress's question-aware protocol)
    c.question_over = "compressed"
    # query-aware methods observe the question and, with lookahead L > 0, the first L tokens of an answer drafted
    # greedily over the full cache (then discarded; the answer is generated from the compressed cache). Tasks with
    # a question only; costs L full-cache decode steps per prompt
    c.lookahead = 0
    # generation tasks: also score, per prompt and plan, the NLL of the full cache's own greedy answer
    # teacher-forced over the plan's masked cache (dropped groups read as zero): a paired, continuous measure of
    # what a compression changes (examples' answer_nll). Costs one full-cache answer per batch and one forward
    # of question + answer per plan
    c.answer_nll = False
    # value groups in a better basis: the base model's values rotated (exactly, folded into v_proj / o_proj) to
    # their principal axes fitted on a calibration text file (keep it disjoint from the evaluation texts)
    c.value_basis = ConfigDict()
    c.value_basis.calibration = ""  # "" = the model's own basis
    c.value_basis.tokens = 2048

    c.selectors = ConfigDict()  # token selector settings
    c.selectors.snapkv_kernel_size = 5
    c.selectors.h2o_recent = 0
    c.selectors.streaming_sinks = 4
    c.selectors.expected_attention_sinks = 0
    c.selectors.n_future = 16  # expected attention (selector and value-group scorer): positions averaged
    # expected attention's query statistics from the observation "window" (question) or the whole "prefill"
    # (context + question, from the sinks on, as kvpress's press takes them)
    c.selectors.expected_attention_observe = "window"

    c.subtoken = ConfigDict()
    # expected | attention (question) | snapkv (pooled) | kvzip | kvzip_shares | predictor
    c.subtoken.scorer = "expected"

    c.combined = ConfigDict()
    c.combined.selector = "snapkv"  # token selector keeping tau of the tokens
    c.combined.scorer = "attention"  # value-group scorer among the survivors (as subtoken.scorer)
    c.combined.value_fraction = 0.5  # rho; tau = 2b / (1 + rho), capped at 1 (then rho = 2b - 1)
    c.combined.token_fractions = ()  # if given: tau = the largest of these with rho = 2b/tau - 1 in (0, 1]

    c.joint = ConfigDict()
    c.joint.scorer = "snapkv"  # group scores (as subtoken.scorer) from which both tokens and groups are chosen
    # an evicted token priced as every group lost ("whole") or as its attention moving to the rest ("centred")
    c.joint.eviction = "whole"

    c.routed = ConfigDict()  # the adapted model of WORKDIR/adapt (method routed)
    # adaptive routers: keep exactly rho of each compressed context's (token, group) pairs per sequence and KV head
    # (the context is known when it is compressed) instead of meeting it on average by the causal running threshold
    # of training; exact_rule: calibrated (the causal thresholds shifted by one offset onto the budget) or topb (raw
    # scores ranked over the context, an ablation)
    c.routed.exact_budget = True
    c.routed.exact_rule = "calibrated"
    # routed_tokens (both axes, query-independent): the router keeps value_fraction (rho) of the groups and
    # token_selector (key_norm, streaming or random) keeps tau = 2b / (1 + rho) of the tokens; budgets b >= (1 + rho)/2
    # keep every token and rho = 2b - 1 (as routed). rho = 0.5 is the combined method's default, not tuned here
    c.routed.value_fraction = 0.5
    c.routed.token_selector = "key_norm"

    c.predictor = ConfigDict()  # the learned value-group scorer (scorer = "predictor"; not for perplexity)
    c.predictor.workdir = ""  # folder written by train.py --config configs/predictor.py (config.json + params)

    c.perplexity = ConfigDict()
    c.perplexity.paths = ()  # text files or globs; empty: the embedded corpus validation split
    c.perplexity.max_bytes = 400_000  # of the embedded validation split read
    c.perplexity.seq_len = 128
    c.perplexity.num_sequences = 16
    c.perplexity.prefix_fraction = 0.5  # the compressed context; the rest is scored
    c.perplexity.window = 16  # in-context observation window of the query-aware selectors

    c.needle = ConfigDict()
    c.needle.lengths = (256, 512)  # tokens of context + question + answer (~90 is the bare needle + question)
    c.needle.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    c.needle.samples = 2  # per (length, depth) cell

    c.multi_needle = ConfigDict()  # tasks multi_key, multi_value, two_needles (evaluation.tasks.MULTI_NEEDLE)
    c.multi_needle.lengths = (512,)
    c.multi_needle.samples = 8  # per length
    # needle-task haystacks: a text file of prose (split into sentences; a run of consecutive ones per prompt),
    # or "" for the package's generated filler sentences (what the embedded default uses)
    c.haystack = ""

    c.variable_tracking = ConfigDict()
    c.variable_tracking.lengths = (256, 512)
    c.variable_tracking.samples = 8  # per length
    c.variable_tracking.num_chains = 2
    c.variable_tracking.chain_length = 3

    c.mmlu = ConfigDict()
    c.mmlu.files = ()  # MMLU-format CSV files or globs: question, A, B, C, D, answer letter
    c.mmlu.num_shots = 0  # the first rows of each file become few-shot examples (not scored)
    c.mmlu.max_examples = 0  # per file; 0 = all

    # devices, as in train.py: prompts split over data x fsdp, params by the logical rules (FSDP / tensor), the
    # packed cache by batch and KV head; batch_size must be a multiple of data * fsdp. One device: no mesh at all
    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    # multi-host (a TPU pod slice, several GPU hosts): the same command on every host; process 0 writes WORKDIR/eval
    c.distributed = ConfigDict()
    c.distributed.enabled = False
    c.distributed.coordinator_address = ""  # "host:port" of process 0; "" = auto-detect (TPU, SLURM)
    c.distributed.num_processes = -1
    c.distributed.process_id = -1

    c.diagnostic = ConfigDict()  # value_groups.png: where kept value groups fall, across and within tokens
    c.diagnostic.enabled = True
    c.diagnostic.value_budget = 0.5  # rho of the subtoken (and routed) masks shown
    c.diagnostic.layer = -1
    c.diagnostic.head = 0
    return c
