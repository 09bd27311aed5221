"""Routed LoRA + value-group routing on a Hugging Face base (Llama, Qwen2/Qwen2.5, Mistral).

Runs unchanged on a GPU or a TPU slice; point it at local files:

    python train.py --config configs/hf_adapt.py --workdir runs/qwen \
        --config.model.checkpoint=/path/to/Qwen2.5-0.5B --config.data.paths='("/data/*.txt",)'

For a TFDS dataset prepared as array_record: --config.data.source=tfds --config.data.tfds_name=NAME
--config.data.tfds_data_dir=DIR.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.stages = ("adapt",)  # the base comes from model.checkpoint, frozen
    c.model.checkpoint = ""  # required: a local HF folder (config.json, *.safetensors, tokenizer.json)
    c.model.value_groups = 8  # G; must divide the checkpoint's head_dim (64 for Qwen2.5-0.5B, 128 for Llama-3-8B)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "bfloat16"
    c.data.source = "text_files"
    c.data.paths = ()  # required for text_files: files or globs of plain text
    c.seq_len = 2048
    c.batch_size = 8
    c.adapt.steps = 2000
    c.adapt.learning_rate = 2e-4
    c.adapt.warmup_steps = 100
    c.adapt.lora.rank = 32
    c.adapt.lora.alpha = 64.0
    c.adapt.lora.num_subspaces = 4
    c.adapt.lora.active_subspaces = 2
    c.mesh.data = 1
    c.mesh.fsdp = -1  # shard params and optimizer state over all devices (FSDP)
    c.mesh.tensor = 1
    c.checkpoint_every = 500
    c.log_every = 10
    return c
