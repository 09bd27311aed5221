"""Run by tests/test_sharding.py in a subprocess with 8 fake CPU devices (XLA_FLAGS set by the caller).

Trains a tiny DecoderLM for 2 steps on one device and on a (data=2, fsdp=2, tensor=2) mesh, checks a
mesh whose tensor axis does not divide kv_heads, and round-trips sharded state through a checkpoint
into another layout. Prints one JSON line of results for the test to assert on.
"""

import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from ml_collections import ConfigDict  # noqa: E402

from subtoken_jax import checkpoint as ckpt_lib  # noqa: E402
from subtoken_jax import sharding as sh  # noqa: E402
from subtoken_jax.model import init_params  # noqa: E402
from subtoken_jax.model_config import ModelConfig  # noqa: E402

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)


def main():
    results = {"device_count": jax.device_count()}
    model, params = init_params(CFG, jax.random.key(0))
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, CFG.vocab_size, dtype=jnp.int32)
    tx = optax.adamw(1e-3, weight_decay=0.1)

    def loss_fn(p, batch):
        logits = model.apply({"params": p}, batch[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1))

    def train_step(p, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(p, batch)
        updates, opt_state = tx.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    # single device
    p1, o1 = params, tx.init(params)
    step1 = jax.jit(train_step)
    losses1 = []
    for _ in range(2):
        p1, o1, loss = step1(p1, o1, ids)
        losses1.append(float(loss))

    # (data=2, fsdp=2, tensor=2)
    mesh = sh.make_mesh(ConfigDict({"data": 2, "fsdp": 2, "tensor": -1}))
    results["mesh"] = dict(mesh.shape)
    rules = sh.logical_axis_rules(ConfigDict({"data": 2}))
    with sh.use_mesh(mesh, rules):
        p_sh = sh.param_shardings(model, (jax.random.key(0), ids), mesh, rules)
        o_sh = sh.opt_state_shardings(tx, params, p_sh, mesh)
        b_sh = sh.batch_sharding(mesh, rules)
        rep = sh.replicated(mesh)
        p2 = sh.shard_tree(params, p_sh)
        o2 = jax.jit(tx.init, out_shardings=o_sh)(p2)
        batch = sh.shard_tree(ids, b_sh)
        step2 = jax.jit(train_step, in_shardings=(p_sh, o_sh, b_sh), out_shardings=(p_sh, o_sh, rep),
                        donate_argnums=(0, 1))
        losses2 = []
        for _ in range(2):
            p2, o2, loss = step2(p2, o2, batch)
            losses2.append(float(loss))
    results["losses_single"], results["losses_sharded"] = losses1, losses2
    results["max_param_diff"] = max(float(jnp.max(jnp.abs(a - np.asarray(b))))
                                    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)))
    results["specs"] = sh.describe(p_sh)
    results["q_kernel_sharding"] = str(p2["layer_0"]["attn"]["q"]["kernel"].sharding.spec)
    results["q_shard_shape"] = list(p2["layer_0"]["attn"]["q"]["kernel"].addressable_shards[0].data.shape)
    results["mu_q_sharding"] = str(o2[0].mu["layer_0"]["attn"]["q"]["kernel"].sharding.spec)
    results["count_sharding"] = str(o2[0].count.sharding.spec)
    results["batch_shard_shape"] = list(batch.addressable_shards[0].data.shape)
    results["tree_shardings_match"] = sh.describe(sh.tree_shardings(model, params, mesh, rules)) == results["specs"]

    # tensor=4 does not divide kv_heads=2: those dims fall back to replication; the forward still matches
    mesh4 = sh.make_mesh(ConfigDict({"data": 1, "fsdp": 2, "tensor": 4}))
    with sh.use_mesh(mesh4):
        p_sh4 = sh.param_shardings(model, (jax.random.key(0), ids), mesh4)
        p4 = sh.shard_tree(params, p_sh4)
        logits4 = jax.jit(lambda p, x: model.apply({"params": p}, x))(p4, sh.shard_tree(ids, sh.batch_sharding(mesh4)))
    results["k_kernel_spec_tensor4"] = str(p_sh4["layer_0"]["attn"]["k"]["kernel"].spec)
    results["q_kernel_spec_tensor4"] = str(p_sh4["layer_0"]["attn"]["q"]["kernel"].spec)
    logits1 = model.apply({"params": params}, ids)
    results["max_logit_diff_tensor4"] = float(jnp.max(jnp.abs(logits1 - np.asarray(logits4))))

    # checkpoint sharded (2,2,2) state, restore into the (1,2,4) layout
    with tempfile.TemporaryDirectory() as folder:
        with ckpt_lib.Checkpointer(folder) as ckpt:
            ckpt.save(2, trainable=p2, opt_state=o2)
        o_sh4 = sh.opt_state_shardings(tx, params, p_sh4, mesh4)
        restored = ckpt_lib.Checkpointer(folder).restore(trainable=sh.abstract_tree(params, p_sh4),
                                                         opt_state=sh.abstract_tree(jax.eval_shape(tx.init, params),
                                                                                    o_sh4))
    results["restore_equal"] = all(bool(jnp.array_equal(np.asarray(a), np.asarray(b)))
                                   for a, b in zip(jax.tree.leaves((p2, o2)),
                                                   jax.tree.leaves((restored.trainable, restored.opt_state))))
    results["restored_q_sharding"] = str(restored.trainable["layer_0"]["attn"]["q"]["kernel"].sharding.spec)
    results["restored_mu_k_sharding"] = str(restored.opt_state[0].mu["layer_0"]["attn"]["k"]["kernel"].sharding.spec)
    results["restored_opt_type"] = type(restored.opt_state[0]).__name__
    print("RESULTS " + json.dumps(results))


if __name__ == "__main__":
    main()
