"""Learned value-group relevance predictor (subtoken_jax/selectors/predictor.py) on synthetic associative recall.

The base model is frozen; only the small predictor trains, against expected-attention targets (the
question + answer queries' realised attention on each context token times each value group's norm).

    python train.py --config configs/predictor.py --workdir runs/predictor
    python train.py --config configs/predictor.py --workdir runs/retrieval/predictor \
        --config.model.workdir=runs/retrieval --config.data.source=tasks --config.train.scope=global

The workdir gets predictor_params.msgpack and config.json, which eval.py loads as the value-group scorer
"predictor" (--config.predictor.workdir=...), and predictor_eval.json (held-out loss and top-B recall).
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.task = "predictor"  # train.py dispatches on this: train the query-aware predictor, not the LM
    c.seed = 0  # seeds the fresh base model, the predictor's init and the training prompts (held-out: seed + 10000)

    # The frozen base model: a local Hugging Face folder, or (checkpoint = "") a fresh random tiny decoder
    # built from the remaining fields (any subtoken_jax.ModelConfig field may be added here).
    c.model = ConfigDict()
    c.model.checkpoint = ""  # local HF folder (config.json, *.safetensors); "" = fresh random decoder below
    c.model.workdir = ""  # or a train.py workdir: its base model (pretrain stage) and tokenizer; overrides the rest
    c.model.dtype = "float32"  # compute dtype of the base model
    c.model.vocab_size = 64  # token ids of the synthetic prompts are drawn from this vocabulary
    c.model.hidden_size = 32  # fresh decoder: embedding width
    c.model.intermediate_size = 64  # fresh decoder: MLP width
    c.model.num_layers = 2  # fresh decoder: layers (the predictor has one embedding per layer)
    c.model.num_heads = 4  # fresh decoder: query heads
    c.model.num_kv_heads = 2  # fresh decoder: KV heads (the predictor scores per KV head)
    c.model.value_groups = 4  # G: value groups per KV head (must divide head_dim; also used with a checkpoint)

    # The predictor module.
    c.predictor = ConfigDict()
    c.predictor.hidden_size = 32  # h: width of its single hidden layer (cost per pair is O(h))
    c.predictor.layer_embed_size = 8  # size of the learned per-layer embedding
    c.predictor.bands = 4  # RoPE frequency bands the attention logit is split into (must divide head_dim / 2)
    c.predictor.spread_rank = 2  # principal directions of the question's queries fed as k^T Sigma k terms (0 = off)
    c.predictor.exact_attention = False  # prior: the question's exact attention (O(S * W)), not its mean query's
    c.predictor.neighbours = 0  # w: also see the prior of the w tokens before / after each token (0 = off)

    # Training (optax AdamW, warmup + cosine decay).
    c.train = ConfigDict()
    c.train.steps = 200  # optimizer steps (one fresh batch of prompts each)
    c.train.batch_size = 16  # prompts per step
    c.train.learning_rate = 3e-3  # peak learning rate
    c.train.warmup_steps = 20  # linear warmup from 0
    c.train.weight_decay = 0.0  # AdamW weight decay
    c.train.grad_clip = 1.0  # global gradient-norm clip
    c.train.scope = "head"  # ranking unit of the listwise loss: head | layer | global (match the allocation scope)
    c.train.distinct_batches = 0  # > 0: build this many batches once and cycle them (0: a fresh batch per step)
    c.train.log_every = 10  # progress-bar loss refresh interval (steps)

    # Training prompts. random_ids: associative recall over random token ids (any vocabulary): context
    # k1 v1 k2 v2 ..., question [SEP, k], answer [v]. tasks: the text tasks of subtoken_jax.data (needle,
    # variable tracking, associative recall) through the base's tokenizer (needs model.workdir or checkpoint).
    c.data = ConfigDict()
    c.data.source = "random_ids"  # random_ids | tasks
    c.data.context_length = 32  # random_ids: S context tokens (even: key, value pairs)
    c.data.num_queries = 1  # random_ids: keys asked per question (answer length)
    c.data.tasks = ("needle", "variable_tracking", "associative_recall")  # tasks: drawn uniformly per prompt
    c.data.lengths = (256, 512)  # tasks: tokens of context + question + answer, one length per batch, in turn
    c.data.chat = False  # tasks: ask through the tokenizer's chat template (an instruct model)
    c.data.answers = "reference"  # tasks: reference | model (targets from the base model's own greedy answers)
    c.data.answer_tokens = 32  # answers = model: most tokens generated per answer (cut at the first line)

    # Held-out evaluation.
    c.eval = ConfigDict()
    c.eval.value_budget = 0.25  # fraction of (token, head, group) pairs kept when measuring top-B recall
    c.eval.scope = "head"  # allocation scope of the evaluated selection: head | layer | global
    c.eval.batches = 4  # held-out batches (of train.batch_size prompts)

    # devices, as in train.py: prompts split over data x fsdp (train.batch_size a multiple of data * fsdp), the
    # base model's params by the logical rules, the predictor's replicated; one device: no mesh at all
    c.mesh = ConfigDict()
    c.mesh.data = -1
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    return c
