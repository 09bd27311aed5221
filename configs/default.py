"""Embedded default: trains end to end from scratch on this machine in about 10 minutes on 2 CPU cores.

Stage 1 (pretrain) trains a small byte-level decoder on text every Python install has (the
standard library's sources) mixed with synthetic retrieval tasks. Stage 2 (adapt) freezes it and
trains routed subspace LoRA with value-group routers under a budget sampled per batch, then
reports perplexity at each budget against keep-largest-norm and random groups on the same base.

    python train.py --config configs/default.py --workdir runs/default
"""

from ml_collections import ConfigDict, config_dict


def get_config() -> ConfigDict:
    c = ConfigDict()
    c.seed = 0
    c.stages = ("pretrain", "adapt")  # run in order; each writes workdir/<stage>/
    c.tokenizer = "byte"  # "byte" or a Hugging Face folder holding tokenizer.json

    # The decoder (fields of subtoken_jax.ModelConfig). For an HF base, set model.checkpoint instead.
    c.model = ConfigDict()
    c.model.checkpoint = ""  # local Hugging Face folder; when set, the base comes from it (no pretrain)
    c.model.vocab_size = 259  # ByteTokenizer: 256 bytes + EOS, BOS, PAD
    c.model.hidden_size = 128
    c.model.intermediate_size = 384
    c.model.num_layers = 4
    c.model.num_heads = 4
    c.model.num_kv_heads = 2
    c.model.value_groups = 8  # G: head_dim 32 -> 8 groups of 4 channels
    c.model.max_position_embeddings = 1024
    c.model.tie_word_embeddings = True
    c.model.dtype = "float32"  # compute dtype (bfloat16 on GPU/TPU)
    c.model.param_dtype = "float32"

    # Data: see subtoken_jax/data.py for the sources.
    c.data = ConfigDict()
    c.data.source = "mixture"  # embedded | text_files | tfds | synthetic | mixture
    c.data.mixture = ("embedded", "synthetic")
    c.data.mixture_weights = (0.8, 0.2)
    c.data.paths = ()  # for text_files: files or globs
    c.data.tfds_name = ""  # for tfds: a dataset prepared as array_record
    c.data.tfds_data_dir = ""
    c.data.synthetic_tasks = ("needle", "variable_tracking", "associative_recall")
    c.data.max_bytes = 4_000_000  # cap on the embedded corpus
    c.data.eval_batches = 8
    c.seq_len = 128
    c.batch_size = 16

    # Stage 1: everything trains.
    c.pretrain = ConfigDict()
    c.pretrain.steps = 1200
    c.pretrain.learning_rate = 3e-3
    c.pretrain.warmup_steps = 100
    c.pretrain.weight_decay = 0.1
    c.pretrain.init_from = ""  # a train.py workdir whose pretrained base starts this run (warm start)

    # Stage 2: the base is frozen; LoRA and routers train.
    c.adapt = ConfigDict()
    c.adapt.steps = 600
    c.adapt.learning_rate = 2e-3
    c.adapt.warmup_steps = 50
    c.adapt.weight_decay = 0.0
    c.adapt.lora = ConfigDict()
    c.adapt.lora.rank = 16
    c.adapt.lora.alpha = 32.0
    c.adapt.lora.dropout = 0.0
    c.adapt.lora.targets = ("q", "k", "v", "o", "up", "down")
    c.adapt.lora.num_subspaces = 4  # routed subspace LoRA: 4 subspaces of rank 4 ...
    c.adapt.lora.active_subspaces = 2  # ... 2 active per token
    c.adapt.routing = ConfigDict()
    c.adapt.routing.mode = "adaptive"  # adaptive (best at every budget in bench/routing_perplexity.py) | fixed_k
    c.adapt.routing.temperature = 0.5
    c.adapt.routing.norm_prior = True
    c.adapt.routing.scorer = "router"  # router (learned, + norm prior) | norm (keep-largest-norm) | random
    c.adapt.routing.k = config_dict.placeholder(int)  # fixed_k: train and serve exactly k of G groups
    c.adapt.budgets = (0.25, 0.375, 0.5, 0.75, 1.0)  # rho sampled per batch from these
    c.adapt.budget_loss_weight = 1.0
    c.adapt.balance_loss_weight = 0.01

    c.eval_budgets = (1.0, 0.75, 0.5, 0.375, 0.25)
    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1: all remaining devices
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.checkpoint_every = 200
    c.keep_checkpoints = 2
    c.log_every = 20
    c.grad_clip = 1.0
    return c
