"""Meshes, logical-axis rules and shardings; the 8-device checks run in a subprocess (tests/sharded_check.py)."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P
from ml_collections import ConfigDict

from subtoken_jax import ConfigError, ModelConfig, init_params
from subtoken_jax import sharding as sh

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2)
HERE = os.path.dirname(os.path.abspath(__file__))


# ----------------------------------------------------------------------------- single process (1 device)


@pytest.mark.parametrize("sizes, devices, expected", [
    ({"data": -1}, 8, (8, 1, 1)),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 8, (2, 2, 2)),
    ({"data": 1, "fsdp": -1, "tensor": 4}, 8, (1, 2, 4)),
    ({}, 1, (1, 1, 1)),
])
def test_mesh_shape_resolves_minus_one(sizes, devices, expected):
    assert sh.mesh_shape(ConfigDict(sizes), devices) == expected


@pytest.mark.parametrize("sizes, match", [
    ({"data": 2, "fsdp": 2, "tensor": 1}, "does not match the 8 available devices"),
    ({"data": -1, "fsdp": -1}, "at most one"),
    ({"data": -1, "tensor": 3}, "do not divide"),
    ({"data": 0}, "positive int or -1"),
    ({"data": "2"}, "positive int or -1"),
])
def test_mesh_shape_errors(sizes, match):
    with pytest.raises(ConfigError, match=match):
        sh.mesh_shape(ConfigDict(sizes), 8)


def test_make_mesh_uses_auto_axes_and_checks_device_count():
    mesh = sh.make_mesh(ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))
    assert mesh.axis_names == sh.MESH_AXES
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ConfigError, match="does not match"):
        sh.make_mesh(ConfigDict({"data": jax.device_count() + 1}))


def test_rules_defaults_and_overrides():
    assert sh.logical_axis_rules(ConfigDict({"data": 1})) == sh.DEFAULT_RULES
    assert sh.logical_to_mesh_spec(("batch", "length", "embed")) == P(("data", "fsdp"), None, None)
    assert sh.logical_to_mesh_spec(("embed", "mlp")) == P("fsdp", "tensor")
    rules = dict(sh.logical_axis_rules(ConfigDict({"rules": {"embed": None, "batch": ["data"], "extra": "tensor"}})))
    assert rules["embed"] is None and rules["batch"] == "data" and rules["extra"] == "tensor"
    assert rules["mlp"] == "tensor"
    assert dict(sh.logical_axis_rules(overrides=[("vocab", None)]))["vocab"] is None
    with pytest.raises(ConfigError, match="unknown mesh axis"):
        sh.logical_axis_rules(overrides={"embed": "model"})


def test_fit_spec_replicates_dims_the_mesh_does_not_divide():
    mesh = jax.sharding.AbstractMesh((2, 2, 4), sh.MESH_AXES)
    assert sh.fit_spec(P("fsdp", "tensor", None), (32, 2, 8), mesh) == P("fsdp")  # kv_heads=2 on tensor=4
    assert sh.fit_spec(P(("data", "fsdp"), None), (2, 16), mesh) == P("data")  # keeps the dividing prefix
    assert sh.fit_spec(P(("data", "fsdp")), (3,), mesh) == P()
    assert sh.fit_spec(P("tensor"), (8, 4), mesh) == P("tensor")


def test_shardings_on_one_device_and_train_step():
    model, params = init_params(CFG, jax.random.key(0))
    mesh = sh.make_mesh(None)
    ids = jnp.zeros((2, 8), jnp.int32)
    p_sh = sh.param_shardings(model, (jax.random.key(0), ids), mesh)
    assert jax.tree.structure(p_sh) == jax.tree.structure(params)
    assert p_sh["layer_0"]["attn"]["q"]["kernel"].spec == P("fsdp", "tensor")
    assert sh.describe(sh.tree_shardings(model, params, mesh)) == sh.describe(p_sh)
    tx = optax.adam(1e-3)
    o_sh = sh.opt_state_shardings(tx, params, p_sh, mesh)
    assert o_sh[0].mu["layer_0"]["mlp"]["up"]["kernel"].spec == P("fsdp", "tensor")
    assert o_sh[0].count.spec == P()
    assert sh.batch_sharding(mesh).spec == P(("data", "fsdp"))
    sh.check_batch_size(3, mesh)
    with sh.use_mesh(mesh):
        p = sh.shard_tree(params, p_sh)
        opt = jax.jit(tx.init, out_shardings=o_sh)(p)
        logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(p, sh.put_batch(ids, mesh))
        assert logits.shape == (2, 8, CFG.vocab_size)
        assert opt[0].mu["embed"]["embedding"].sharding == p_sh["embed"]["embedding"]
    assert not params["final_norm"]["scale"].is_deleted()


def test_tree_shardings_of_a_subtree_and_unknown_paths():
    model, params = init_params(CFG, jax.random.key(0))
    mesh = sh.make_mesh(None)
    sub = {"layer_0": {"mlp": params["layer_0"]["mlp"]}, "not_a_param": np.zeros((4,), np.float32)}
    shardings = sh.tree_shardings(model, sub, mesh)
    assert shardings["layer_0"]["mlp"]["down"]["kernel"].spec == P("tensor", "fsdp")
    assert shardings["not_a_param"].spec == P()
    assert sh.tree_shardings(model, {}, mesh) == {}


def test_check_batch_size_message():
    mesh = jax.sharding.AbstractMesh((2, 2, 1), sh.MESH_AXES)
    with pytest.raises(ConfigError, match="multiple of the 4 batch shards"):
        sh.check_batch_size(6, mesh)


def test_maybe_initialize_distributed(monkeypatch):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    monkeypatch.setattr(jax.distributed, "is_initialized", lambda: False)
    assert sh.maybe_initialize_distributed(ConfigDict({"seed": 0})) is False
    assert sh.maybe_initialize_distributed(ConfigDict({"distributed": {"enabled": False}})) is False
    assert not calls
    config = ConfigDict({"distributed": {"enabled": True, "coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                                         "process_id": 1}})
    assert sh.maybe_initialize_distributed(config) is True
    assert calls == [{"coordinator_address": "10.0.0.1:1234", "num_processes": 2, "process_id": 1}]
    assert sh.maybe_initialize_distributed(ConfigDict({"distributed": {"enabled": True}})) is True
    assert calls[-1] == {}  # auto-detection
    bad = ConfigDict({"distributed": {"enabled": True, "num_processes": 2, "process_id": 2}})
    with pytest.raises(ConfigError, match="process_id"):
        sh.maybe_initialize_distributed(bad)


# ----------------------------------------------------------------------------- 8 fake devices (subprocess)


@pytest.fixture(scope="module")
def sharded_results():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, os.path.join(HERE, "sharded_check.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULTS ")]
    assert proc.returncode == 0 and lines, f"sharded_check.py failed:\n{proc.stderr[-4000:]}"
    return json.loads(lines[-1][len("RESULTS "):])


def test_sharded_train_step_matches_single_device(sharded_results):
    r = sharded_results
    assert r["device_count"] == 8
    assert r["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2}
    np.testing.assert_allclose(r["losses_sharded"], r["losses_single"], atol=1e-5, rtol=0)
    assert r["losses_single"][1] < r["losses_single"][0]
    assert r["max_param_diff"] < 1e-5


def test_sharded_layouts(sharded_results):
    r = sharded_results
    assert r["q_kernel_sharding"] == "P('fsdp', 'tensor')"
    assert r["q_shard_shape"] == [16, 2, 8]  # [embed 32 / fsdp 2, heads 4 / tensor 2, head_dim 8]
    assert r["mu_q_sharding"] == r["q_kernel_sharding"]  # optimizer state follows its param
    assert r["count_sharding"] == "P()"
    assert r["batch_shard_shape"] == [2, 16]  # batch 8 over data*fsdp = 4
    assert r["tree_shardings_match"]
    assert r["specs"]["embed/embedding"] == "P('tensor', 'fsdp')"


def test_indivisible_dims_fall_back_to_replication(sharded_results):
    r = sharded_results
    assert r["k_kernel_spec_tensor4"] == "P('fsdp',)"  # kv_heads=2 is not split over tensor=4
    assert r["q_kernel_spec_tensor4"] == "P('fsdp', 'tensor')"  # heads=4 is
    assert r["max_logit_diff_tensor4"] < 1e-5


def test_sharded_checkpoint_restores_into_another_layout(sharded_results):
    r = sharded_results
    assert r["restore_equal"]
    assert r["restored_q_sharding"] == "P('fsdp', 'tensor')"
    assert r["restored_mu_k_sharding"] == "P('fsdp',)"
    assert r["restored_opt_type"] == "ScaleByAdamState"


# ------------------------------------------- eval, compressed generation and predictor training on a mesh (subprocess)


@pytest.fixture(scope="module")
def eval_runs(tmp_path_factory):
    """tests/sharded_eval_check.py on one device and on 8 fake devices (data 2, fsdp 2, tensor 2), run side by side."""
    folder = str(tmp_path_factory.mktemp("sharded_eval"))
    script = os.path.join(HERE, "sharded_eval_check.py")
    flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f)  # conftest's kept
    single_env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    mesh_env = dict(single_env, XLA_FLAGS=(flags + " --xla_force_host_platform_device_count=8").strip())
    # the single run writes the shared HF model first; the mesh run then reads the same files
    single = subprocess.run([sys.executable, script, "single", folder], env=single_env, capture_output=True, text=True,
                            timeout=400)
    assert single.returncode == 0, f"sharded_eval_check.py single failed:\n{single.stderr[-4000:]}"
    mesh = subprocess.run([sys.executable, script, "mesh", folder], env=mesh_env, capture_output=True, text=True,
                          timeout=400)
    assert mesh.returncode == 0, f"sharded_eval_check.py mesh failed:\n{mesh.stderr[-4000:]}"
    return json.loads(single.stdout.splitlines()[-1]), json.loads(mesh.stdout.splitlines()[-1])


def test_sharded_eval_matches_one_device(eval_runs):
    single, mesh = eval_runs
    assert single["device_count"] == 1 and mesh["device_count"] == 8
    assert len(mesh["records"]) == len(single["records"]) >= 10
    for one, many in zip(single["records"], mesh["records"]):
        assert {k: v for k, v in one.items() if k != "value"} == {k: v for k, v in many.items() if k != "value"}
        if one["metric"] == "perplexity":  # float sums in another order: log-perplexity within 1e-5
            assert abs(np.log(many["value"]) - np.log(one["value"])) < 1e-5, (one, many)
        else:  # exact match
            assert many["value"] == one["value"], (one, many)
    assert mesh["answers"] == single["answers"] and len(single["answers"]) >= 8  # every generated answer


def test_sharded_compressed_generation_gives_the_same_tokens(eval_runs):
    single, mesh = eval_runs
    layouts = {f"{layout}/{scope}" for layout in ("global", "fixed_k") for scope in ("head", "global")}
    assert set(single["tokens"]) == layouts | {"full"}
    assert mesh["tokens"] == single["tokens"]


def test_packed_cache_is_sharded_by_batch_and_kv_head(eval_runs):
    _, mesh = eval_runs
    batch, both = "P(('data', 'fsdp'),)", "P(('data', 'fsdp'), 'tensor')"
    global_layout = mesh["cache_shardings"]["global/global"]
    for leaf in ("keys.keys", "values.values", "values.tokens", "values.groups"):
        assert global_layout[f".layers[0].{leaf}"] == both, leaf
    assert global_layout[".tail_keys[0]"] == "P(('data', 'fsdp'), None, 'tensor')"
    assert global_layout[".prefix_end"] == batch
    fixed_k = mesh["cache_shardings"]["fixed_k/head"]  # on CPU stored group-major: entries [B, Hkv, C, gd]
    assert fixed_k[".layers[1].values.values"] == both
    assert fixed_k[".layers[1].keys.positions"] == both  # head-major compact keys [B, Hkv, Tk]


def test_decode_step_gathers_no_cache_array(eval_runs):
    """No all-gather in the compiled decode step has a packed-cache leaf's global shape, nor a batch row's keys or
    tail over all KV heads ([1, S, Hkv * D]): devices read only their own (batch, KV head) entries."""
    _, mesh = eval_runs
    for gathers, shapes in ((mesh["gathers"], mesh["cache_shapes"]), (mesh["fixed_k_gathers"], mesh["fixed_k_shapes"])):
        assert gathers, "expected the FSDP weight gathers in the HLO (is the regex still right?)"
        assert not set(gathers) & set(shapes), (gathers, shapes)
        slots = {shape.split(",")[1] for shape in shapes if len(shape.split(",")) == 4}  # [B, S, Hkv, D] keys / tail
        rows = [g for g in gathers if g.split(",")[0] == "1" and g.split(",")[1] in slots and g.endswith(",16")]
        assert not rows, rows  # one batch row's keys or tail gathered over its 2 KV heads x head_dim 8


def test_sharded_predictor_step_matches_one_device(eval_runs):
    single, mesh = eval_runs
    (loss_1, norm_1, params_1), (loss_8, norm_8, params_8) = single["predictor"], mesh["predictor"]
    assert abs(loss_8 - loss_1) < 1e-5 and abs(norm_8 - norm_1) < 1e-5 and norm_1 > 0
    assert max(abs(a - b) for x, y in zip(params_1, params_8) for a, b in zip(x, y)) < 1e-5


def test_eval_configs_that_do_not_fit_the_mesh_fail_before_compute(eval_runs):
    _, mesh = eval_runs
    line, wrote = mesh["bad_inputs"]["batch_size=3"]
    assert line == "batch_size=3 must be a multiple of the 8 batch shards of mesh {'data': 8, 'fsdp': 1, 'tensor': 1}"
    assert not wrote
    line, wrote = mesh["bad_inputs"]["mesh.data=3"]
    assert line.startswith("mesh data*fsdp*tensor = 3*1*1 = 3 does not match the 8 available devices") and not wrote
