"""Run by tests/test_sharding.py in subprocesses: eval, compressed generation and the predictor's train step on
one device (`single`) and on a (data=2, fsdp=2, tensor=2) mesh of 8 fake CPU devices (`mesh`, XLA_FLAGS set by
the caller). Prints one JSON line of results for the test to compare.

    python tests/sharded_eval_check.py single|mesh WORKDIR
"""

import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from subtoken_jax import sharding as sh  # noqa: E402
from subtoken_jax.compression import Compression  # noqa: E402
from subtoken_jax.generate import generate  # noqa: E402
from subtoken_jax.model import init_params  # noqa: E402
from subtoken_jax.model_config import ModelConfig  # noqa: E402

# kv_heads 2 on tensor 2: the packed cache splits over batch (data x fsdp = 4) and KV heads (tensor = 2)
CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                  value_groups=4, max_position_embeddings=128)
MESH = {"data": 2, "fsdp": 2, "tensor": 2}


def eval_records(workdir: str, hf_folder: str):
    """eval.py's records on a tiny HF model: perplexity (NLL) and needle (exact match, packed generation)."""
    from configs.eval import get_config
    from subtoken_jax.evaluation import runner

    c = get_config()
    c.model.checkpoint = hf_folder
    c.model.value_groups = 4
    c.tasks = ("perplexity", "needle")
    c.methods = ("full", "subtoken", "joint")  # subtoken: the global top-B over heads and layers; joint: SnapKV tokens
    c.budgets = (1.0, 0.75)  # 0.75 exercises every method (subtoken fits only b > 1/2)
    c.batch_size = 4
    c.perplexity.update(dict(seq_len=48, num_sequences=4, max_bytes=20000, window=4))
    c.needle.update(dict(lengths=(80,), depths=(0.0, 0.5, 1.0, 0.25), samples=1))
    c.diagnostic.enabled = False
    c.mesh.update(MESH)
    summary = runner.run(c, workdir)
    with open(summary["paths"]["results.json"]) as fh:
        results = json.load(fh)
    answers = [json.loads(line)["answer"] for line in open(summary["paths"]["examples.jsonl"])
               if "answer" in json.loads(line)]
    return results["records"] if isinstance(results, dict) else results, answers


def bad_inputs(workdir: str, hf_folder: str):
    """{case: (error line, whether WORKDIR/eval was created)} of eval configs that do not fit the 8 devices."""
    from configs.eval import get_config
    from subtoken_jax.errors import ConfigError
    from subtoken_jax.evaluation import runner

    out = {}
    for name, overrides in {"batch_size=3": {"batch_size": 3}, "mesh.data=3": {"mesh.data": 3}}.items():
        c = get_config()
        c.model.checkpoint, c.model.value_groups, c.tasks = hf_folder, 4, ("needle",)
        for key, value in overrides.items():
            section, _, field = key.rpartition(".")
            (c[section] if section else c)[field] = value
        try:
            runner.run(c, workdir)
            out[name] = ("no error", os.path.exists(os.path.join(workdir, "eval")))
        except ConfigError as error:
            out[name] = (str(error), os.path.exists(os.path.join(workdir, "eval")))
    return out


def generations(mesh):
    """Compressed (both layouts, every scope) and full-cache greedy tokens; on `mesh` if given."""
    model, params = init_params(CFG, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (4, 24), 0, CFG.vocab_size, dtype=jnp.int32)
    question = jax.random.randint(jax.random.key(2), (4, 4), 0, CFG.vocab_size, dtype=jnp.int32)
    out, caches = {}, {}
    scopes = ("head", "global")  # per KV head (local to a device) and one top-B over heads and layers (collective)
    cases = {f"global/{scope}": (Compression(token_fraction=0.5, value_fraction=0.5, scope=scope), "global")
             for scope in scopes}
    for scope in scopes:  # fixed-K takes [B, T] token masks: every key, groups pruned
        groups_only = Compression(token_fraction=1.0, value_fraction=0.5, scope=scope)
        cases[f"fixed_k/{scope}"] = (lambda state, recipe=groups_only: (None, recipe(state)[1]), "fixed_k")
    for name, (compression, layout) in cases.items():
        tokens, cache = generate(model, params, ids, max_new_tokens=4, compression=compression,
                                 question_ids=question, layout=layout, mesh=mesh, return_cache=True)
        out[name] = np.asarray(tokens).tolist()
        caches[name] = cache
    out["full"] = np.asarray(generate(model, params, ids, max_new_tokens=4, mesh=mesh)).tolist()
    return out, caches, (model, params)


def cache_shardings(cache):
    """{leaf path: partition spec} of a packed cache."""
    flat = jax.tree_util.tree_flatten_with_path(cache)[0]
    return {jax.tree_util.keystr(path): str(leaf.sharding.spec) for path, leaf in flat
            if isinstance(leaf.sharding, jax.sharding.NamedSharding)}


def decode_gathers(mesh, cache, model, params):
    """Shapes of the all-gathers in the compiled decode step, and the global shapes of the cache's leaves."""
    import importlib

    cg = importlib.import_module("subtoken_jax.compressed_generate")  # the package exports a function of that name

    with sh.use_mesh(mesh):
        params = sh.place_params(model, params)
        token, position, done = sh.place_batch_leading((jnp.zeros((4,), jnp.int32), cache.prefix_end,
                                                        jnp.zeros((4,), bool)))
        hlo = cg._decode.lower(model, params, cache, token, position, done, jax.random.key(0), 2, 0.0, None,
                               None).compile().as_text()
    gathers = [m.group(1) for m in re.finditer(r"= [a-z0-9]+\[([0-9,]*)\][^=]*? all-gather\(", hlo)]
    leaves = sorted({",".join(map(str, leaf.shape)) for leaf in jax.tree.leaves(cache) if leaf.ndim >= 2})
    return gathers, leaves


def predictor_step(mesh_config):
    """Loss, gradient norm and params after one predictor train step (configs/predictor.py, tiny base), under mesh_config."""
    from configs.predictor import get_config
    from subtoken_jax import predictor_training as pt
    from subtoken_jax.selectors.predictor import init_predictor, make_predictor

    c = get_config()
    c.train.batch_size = 4
    model, params = init_params(CFG, jax.random.key(0))
    batch = next(pt.associative_recall_prompts(CFG.vocab_size, 4, 16, seed=3))
    with sh.config_mesh(ConfigDict({"mesh": mesh_config}), 4):
        params = sh.place_params(model, params)
        state, targets = pt.predictor_example(model, params, batch)
        predictor = make_predictor(c, CFG)
        p = sh.replicate(init_predictor(predictor, state, 0))
        optimizer = pt.make_predictor_optimizer(c.train)
        opt_state = sh.replicate(optimizer.init(p))
        step = pt.make_predictor_train_step(optimizer, scope="head")
        p, opt_state, metrics = step(predictor, p, opt_state, state, targets)
    return (float(metrics["loss"]), float(metrics["grad_norm"]),
            [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(p)])


def main():
    mode, workdir = sys.argv[1], sys.argv[2]
    from test_eval import _byte_tokenizer  # the byte-level tokenizer the eval tests use

    from subtoken_jax import save_pretrained

    hf_folder = os.path.join(workdir, "hf")
    if not os.path.isdir(hf_folder):  # the same random model for both modes (seeded)
        tokenizer = _byte_tokenizer()
        cfg = ModelConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_layers=1,
                          num_heads=4, num_kv_heads=2, value_groups=4, max_position_embeddings=256)
        save_pretrained(hf_folder, cfg, init_params(cfg, jax.random.key(1))[1], tokenizer=tokenizer)
    records, answers = eval_records(os.path.join(workdir, mode), hf_folder)
    result = {"device_count": jax.device_count(), "records": records, "answers": answers}
    mesh = sh.make_mesh(ConfigDict(MESH)) if mode == "mesh" else None
    result["tokens"], caches, (model, params) = generations(mesh)
    result["predictor"] = predictor_step(MESH if mode == "mesh" else None)
    if mesh is not None:
        result["bad_inputs"] = bad_inputs(os.path.join(workdir, "bad"), hf_folder)
        result["cache_shardings"] = {name: cache_shardings(cache) for name, cache in caches.items()}
        result["gathers"], result["cache_shapes"] = decode_gathers(mesh, caches["global/global"], model, params)
        result["fixed_k_gathers"], result["fixed_k_shapes"] = decode_gathers(mesh, caches["fixed_k/head"], model,
                                                                             params)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
