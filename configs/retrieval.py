"""A small byte-level model that solves the synthetic retrieval tasks with a full cache: the base of
bench/query_aware.py (query-aware KV compression on needle in a haystack and variable tracking).

Pretraining only (no adapt stage): a 4-layer decoder of the embedded default's shape (d=128, 4 heads /
2 KV heads of head_dim 32, G=8 value groups of 4 channels, MLP 512) on 256-token sequences, each
packing several synthetic examples of 64-256 tokens (needle, variable tracking, associative recall,
copy; loss on the whole example, retrieval answers weighted up), mixed with some text (the standard
library's sources). Eval prompts of up to 256 tokens fit the trained window. Three phases, each a
warm start from the previous one's parameters (fresh optimizer), about 5 + 18 + 24 minutes on 2 CPU
cores:

    python train.py --config configs/retrieval.py:warmup --workdir runs/query_aware/warmup
    python train.py --config configs/retrieval.py --workdir runs/query_aware/main \
        --config.pretrain.init_from=runs/query_aware/warmup
    python train.py --config configs/retrieval.py:anneal --workdir runs/query_aware \
        --config.pretrain.init_from=runs/query_aware/main

bench/query_aware.py runs the three and then evaluates; by hand:

    python eval.py --config configs/eval.py --workdir runs/query_aware --config.tasks='("needle","variable_tracking")' \
        --config.needle.lengths='(128,256)' --config.variable_tracking.lengths='(128,256)'
"""
from configs.default import get_config as default_config


def get_config(variant: str = ""):
    """variant "warmup" = phase 1 (short sequences, mostly copying); "" = phase 2 (the full mixture);
    "anneal" = phase 3 (the same mixture, more steps at half the learning rate)."""
    c = default_config()
    c.stages = ("pretrain",)

    c.model.intermediate_size = 512
    c.model.max_position_embeddings = 1024

    c.data.mixture = ("embedded", "synthetic")
    c.data.mixture_weights = (0.15, 0.85)
    # copy (dense copying practice for the induction heads retrieval builds on) and variable tracking
    # (multi-hop, the hardest) get twice the share of the others
    c.data.synthetic_tasks = ("needle", "variable_tracking", "variable_tracking", "associative_recall", "copy", "copy")
    c.data.synthetic_min_tokens = 64  # each sequence packs examples of 64..seq_len tokens
    c.data.answer_only_loss = False  # the whole example is scored (filler, statements: copying practice) ...
    c.data.answer_weight = 8.0  # ... and each answer token (and its EOS) weighs this many tokens
    c.data.eval_batches = 4
    c.seq_len = 256
    c.batch_size = 16

    c.pretrain.steps = 3000
    c.pretrain.learning_rate = 3e-3
    c.pretrain.warmup_steps = 100
    c.pretrain.weight_decay = 0.1

    c.eval_budgets = (1.0,)
    c.checkpoint_every = 250
    c.log_every = 10
    if variant == "warmup":
        # Induction heads (look back for the current token, copy what followed) form after a plateau whose
        # length grows with the sequence: ~450 steps on 128-token copies, not within 500 on 256-token ones
        # nor within 1000 steps of the full mixture. So a first phase trains them on short sequences.
        c.seq_len = 128
        c.data.mixture_weights = (0.1, 0.9)
        c.data.synthetic_tasks = ("copy", "copy", "needle", "associative_recall")
        c.data.synthetic_min_tokens = 48
        c.pretrain.steps = 800
        c.pretrain.warmup_steps = 50
    elif variant == "anneal":
        # Phase 2 leaves near-misses (a digit swapped in a 7-digit needle): more steps at a lower rate
        c.pretrain.steps = 4000
        c.pretrain.learning_rate = 1.5e-3
    elif variant:
        raise ValueError(f"unknown variant {variant!r} of configs/retrieval.py; use '', 'warmup' or 'anneal'")
    return c
