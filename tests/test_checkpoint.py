"""Checkpointer: round trips, last-N + best retention, corrupt / missing steps, base-model fingerprints."""

import functools
import glob
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from ml_collections import ConfigDict

from subtoken_jax import CheckpointError, LoRAConfig, ModelConfig, init_params
from subtoken_jax import checkpoint as ckpt_lib
from subtoken_jax.lora import is_adapter_path, split_params

CFG = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2,
                  lora=LoRAConfig(rank=4, targets=("q", "v")))
# A failed read of a corrupt step leaves orbax/tensorstore async leftovers ("Event loop is closed", a
# never-awaited metadata coroutine) that surface later, at garbage collection; they are harmless.
pytestmark = [pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning"),
              pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")]

TX = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))


@jax.jit
def _one_step(trainable):
    trainable = jax.tree.map(lambda x: x + 0.01, trainable)  # lora_b is zero at init; make it non-trivial
    opt_state = TX.init(trainable)
    updates, opt_state = TX.update(jax.tree.map(jnp.ones_like, trainable), opt_state, trainable)
    return optax.apply_updates(trainable, updates), opt_state


@functools.lru_cache(maxsize=None)
def _state(seed=0, cfg=CFG):
    """(trainable after one adamw step, frozen base, opt_state); cached, so never donate these."""
    params = jax.jit(lambda key: init_params(cfg, key)[1])(jax.random.key(seed))
    trainable, frozen = split_params(params, is_adapter_path)
    trainable, opt_state = _one_step(trainable)
    return trainable, frozen, opt_state


def _iterator():
    return iter(grain.MapDataset.range(64).batch(4).to_iter_dataset())


def _assert_trees_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _corrupt(folder, step, how="garbage"):
    """garbage: data files replaced by a short text; same_size: random bytes written inside the largest
    data file, its size kept (bit rot); garbage_unrecorded: garbage, and the step's checksums removed (a
    step saved before checksums existed: orbax alone must notice)."""
    files = glob.glob(os.path.join(folder, str(step), "trainable", "**", "d", "*"), recursive=True)
    assert files
    if how == "same_size":
        path = max(files, key=os.path.getsize)
        size = os.path.getsize(path)
        span = min(4096, size // 2)
        with open(path, "r+b") as fh:
            fh.seek(size // 4)
            fh.write(np.random.default_rng(0).bytes(span))
        assert os.path.getsize(path) == size
        return
    for path in files:
        with open(path, "wb") as fh:
            fh.write(b"not a tensorstore chunk")
    if how == "garbage_unrecorded":
        os.remove(os.path.join(folder, str(step), ckpt_lib.CHECKSUMS))


# ----------------------------------------------------------------------------- round trip


def test_round_trip_restores_everything(tmp_path):
    trainable, frozen, opt_state = _state()
    it = _iterator()
    next(it)
    config = ConfigDict({"seed": 0, "stages": ("pretrain", "adapt"), "adapt": {"budgets": (0.5, 1.0)}})
    fp = ckpt_lib.fingerprint(frozen, source="base.safetensors")
    with ckpt_lib.Checkpointer(tmp_path / "ck") as ckpt:
        assert ckpt.save(3, trainable=trainable, opt_state=opt_state, data_iterator=it, config=config, metric=1.5,
                         base_fingerprint=fp, metadata={"note": "hello"})
        expected_next = next(it)
        next(it)
    ckpt = ckpt_lib.Checkpointer(tmp_path / "ck", create=False)
    assert ckpt.all_steps() == [3] and ckpt.latest_step() == 3
    it2 = _iterator()
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, (trainable, opt_state))
    restored = ckpt.restore(trainable=abstract[0], opt_state=abstract[1], data_iterator=it2, base_fingerprint=fp)
    assert restored.step == 3
    _assert_trees_equal(restored.trainable, trainable)
    _assert_trees_equal(restored.opt_state, opt_state)
    assert type(restored.opt_state[1][0]).__name__ == "ScaleByAdamState"  # namedtuples come back
    np.testing.assert_array_equal(next(restored.data_iterator), expected_next)
    assert restored.config == {"seed": 0, "stages": ["pretrain", "adapt"], "adapt": {"budgets": [0.5, 1.0]}}
    meta = restored.metadata
    assert meta["metric"] == 1.5 and meta["note"] == "hello" and meta["step"] == 3
    assert meta["base_fingerprint"]["source"] == "base.safetensors"
    assert set(meta["items"]) == {"trainable", "opt_state", "step", "data_iterator", "config", "metadata"}
    assert ckpt.read_metadata()["metric"] == 1.5
    ckpt.close()


def test_restore_without_optional_items(tmp_path):
    trainable, _, _ = _state()
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, trainable=trainable)
        restored = ckpt.restore(trainable=trainable, data_iterator=_iterator())  # no iterator saved: warned, skipped
    _assert_trees_equal(restored.trainable, trainable)
    assert restored.opt_state is None and restored.config is None and restored.data_iterator is None


def test_existing_step_is_never_overwritten(tmp_path):
    trainable, _, _ = _state()
    with ckpt_lib.Checkpointer(tmp_path) as ckpt:
        ckpt.save(1, trainable=trainable)
        ckpt.wait_until_finished()
        with pytest.raises(CheckpointError, match="step 1 already exists"):
            ckpt.save(1, trainable=trainable)


# ----------------------------------------------------------------------------- retention


def _save_metrics(folder, metrics, **kwargs):
    trainable = {"w": np.zeros((2,), np.float32)}
    with ckpt_lib.Checkpointer(folder, **kwargs) as ckpt:
        for step, metric in enumerate(metrics, start=1):
            ckpt.save(step, trainable=trainable, metric=metric)
        ckpt.wait_until_finished()
        return ckpt.all_steps(), ckpt.best_step()


def test_keeps_last_n_and_the_best(tmp_path):
    steps, best = _save_metrics(tmp_path, [5.0, 1.0, 4.0, 3.0, 9.0], max_to_keep=2, keep_best=1)
    assert steps == [2, 4, 5] and best == 2
    steps, _ = _save_metrics(tmp_path / "no_best", [5.0, 1.0, 4.0, 3.0, 9.0], max_to_keep=2, keep_best=0)
    assert steps == [4, 5]
    steps, best = _save_metrics(tmp_path / "no_metric", [None] * 4, max_to_keep=2)
    assert steps == [3, 4] and best == 4  # without metrics, only the newest are kept


def test_orbax_legacy_options_alone_drop_the_newest(tmp_path):
    """Why Checkpointer uses preservation policies: max_to_keep + best_fn keeps the N best, not the last N."""
    options = ocp.CheckpointManagerOptions(max_to_keep=2, best_fn=lambda m: m["metric"], best_mode="min")
    with ocp.CheckpointManager(tmp_path, options=options) as mngr:
        for step, metric in enumerate([5.0, 1.0, 4.0, 3.0, 9.0], start=1):
            mngr.save(step, args=ocp.args.Composite(x=ocp.args.JsonSave({"s": step})), metrics={"metric": metric})
        mngr.wait_until_finished()
        assert mngr.all_steps() == [2, 4]  # the newest step (5) is gone


# ----------------------------------------------------------------------------- missing and corrupt


def test_missing_directory_and_empty_directory(tmp_path):
    trainable, _, _ = _state()
    with pytest.raises(CheckpointError, match="does not exist"):
        ckpt_lib.Checkpointer(tmp_path / "nope", create=False)
    with ckpt_lib.Checkpointer(tmp_path / "empty") as ckpt:
        with pytest.raises(CheckpointError, match="no checkpoints in"):
            ckpt.restore(trainable=trainable)
        with pytest.raises(CheckpointError, match="no checkpoints in"):
            ckpt.read_metadata()
        ckpt.save(1, trainable=trainable)
        ckpt.wait_until_finished()
        with pytest.raises(CheckpointError, match=r"step 7 is not in .*\[1\]"):
            ckpt.restore(7, trainable=trainable)


@pytest.mark.parametrize("how", ["same_size", "garbage", "garbage_unrecorded"])
def test_corrupt_latest_step_falls_back_and_keeps_older_steps(tmp_path, caplog, how):
    trainable, _, opt_state = _state()
    folder = str(tmp_path)
    with ckpt_lib.Checkpointer(folder, max_to_keep=2) as ckpt:
        ckpt.save(1, trainable=trainable, opt_state=opt_state)
        ckpt.save(2, trainable=jax.tree.map(lambda x: x + 1, trainable), opt_state=opt_state)
    assert all(os.path.isfile(os.path.join(folder, str(s), ckpt_lib.CHECKSUMS)) for s in (1, 2))
    _corrupt(folder, 2, how)
    before = sorted(os.listdir(folder))

    ckpt = ckpt_lib.Checkpointer(folder, max_to_keep=2)
    with pytest.raises(CheckpointError) as info:
        ckpt.restore(2, trainable=trainable, opt_state=opt_state)
    message = str(info.value)
    expected = "corrupt or unreadable" if how == "garbage_unrecorded" else "sha256 mismatch"
    assert "step 2" in message and expected in message and "\n" not in message
    assert sorted(os.listdir(folder)) == before  # an explicit restore changes nothing on disk
    assert ckpt.all_steps() == [1, 2]

    _assert_trees_equal(ckpt.restore(1, trainable=trainable, opt_state=opt_state).trainable, trainable)

    with caplog.at_level(logging.WARNING, logger="subtoken_jax.checkpoint"):
        restored = ckpt.restore(trainable=trainable, opt_state=opt_state)  # latest: falls back to step 1
    assert restored.step == 1
    _assert_trees_equal(restored.trainable, trainable)
    assert any("unreadable" in r.getMessage() for r in caplog.records)
    assert ckpt.all_steps() == [1]
    moved = [name for name in os.listdir(folder) if name.startswith(ckpt_lib.CORRUPT_PREFIX + "2.")]
    assert len(moved) == 1  # moved aside, not deleted

    # training resumes from step 1 and saves step 2 again; the broken copy is never touched
    for step in (2, 3, 4):
        ckpt.save(step, trainable=trainable, opt_state=opt_state)
    ckpt.wait_until_finished()
    assert ckpt.all_steps() == [3, 4]
    assert moved[0] in os.listdir(folder)
    ckpt.close()


def test_every_step_corrupt(tmp_path):
    trainable, _, _ = _state()
    folder = str(tmp_path)
    with ckpt_lib.Checkpointer(folder) as ckpt:
        ckpt.save(1, trainable=trainable)
        ckpt.save(2, trainable=trainable)
    _corrupt(folder, 1)
    _corrupt(folder, 2)
    with ckpt_lib.Checkpointer(folder) as ckpt:
        with pytest.raises(CheckpointError, match=r"no step in .* could be restored; latest error: step 2 .* corrupt"):
            ckpt.restore(trainable=trainable)
        with pytest.raises(CheckpointError, match="step 2 .* corrupt"):
            ckpt.restore(trainable=trainable, fallback=False)
        assert ckpt.all_steps() == [1, 2]  # nothing restored, so nothing is moved aside


def test_incomplete_step_is_reported_and_skipped(tmp_path):
    trainable, _, opt_state = _state()
    folder = str(tmp_path)
    with ckpt_lib.Checkpointer(folder) as ckpt:
        ckpt.save(1, trainable=trainable, opt_state=opt_state)
        ckpt.save(2, trainable=trainable)  # no optimizer state
    os.makedirs(os.path.join(folder, "3.orbax-checkpoint-tmp-1234", "trainable"))  # an interrupted save
    ckpt = ckpt_lib.Checkpointer(folder)
    assert ckpt.all_steps() == [1, 2]
    with pytest.raises(CheckpointError, match=r"step 2 .* is incomplete: it lacks \['opt_state'\]"):
        ckpt.restore(2, trainable=trainable, opt_state=opt_state)
    assert ckpt.restore(trainable=trainable, opt_state=opt_state).step == 1
    with pytest.raises(CheckpointError, match="does not fit the model"):  # not a corruption: no fallback
        ckpt.restore(trainable={"other": np.zeros(3, np.float32)})
    assert ckpt.all_steps() == [1]
    ckpt.close()


def test_target_mismatch_is_not_treated_as_corruption(tmp_path):
    trainable, _, _ = _state()
    folder = str(tmp_path)
    with ckpt_lib.Checkpointer(folder) as ckpt:
        ckpt.save(1, trainable=trainable)
        ckpt.save(2, trainable=trainable)
    bigger, _, _ = _state(cfg=CFG.replace(lora=LoRAConfig(rank=8, targets=("q", "v"))))
    other_targets, _, _ = _state(cfg=CFG.replace(lora=LoRAConfig(rank=4, targets=("q", "k", "v"))))
    ckpt = ckpt_lib.Checkpointer(folder)
    with pytest.raises(CheckpointError, match=r"step 2 .* does not fit the model: .*lora_a has shape \(32, 4\)"):
        ckpt.restore(trainable=bigger)
    with pytest.raises(CheckpointError, match="params missing from the checkpoint"):
        ckpt.restore(trainable=other_targets)
    assert ckpt.all_steps() == [1, 2]  # nothing moved aside
    ckpt.close()


# ----------------------------------------------------------------------------- base-model fingerprints


def test_fingerprint_identifies_the_base():
    _, frozen, _ = _state(seed=0)
    _, other, _ = _state(seed=1)
    fp = ckpt_lib.fingerprint(frozen, source="a")
    assert fp["num_params"] == sum(x.size for x in jax.tree.leaves(frozen))
    assert ckpt_lib.fingerprint_mismatch(fp, ckpt_lib.fingerprint(frozen, source="b")) is None
    bf16 = jax.tree.map(lambda x: x.astype(jnp.bfloat16), frozen)
    assert ckpt_lib.fingerprint_mismatch(fp, ckpt_lib.fingerprint(bf16)) is None  # same weights, other dtype
    assert "values of" in ckpt_lib.fingerprint_mismatch(fp, ckpt_lib.fingerprint(other))
    smaller = ckpt_lib.fingerprint(_state(cfg=CFG.replace(intermediate_size=32))[1])
    assert "param shapes differ" in ckpt_lib.fingerprint_mismatch(fp, smaller)
    swapped = dict(frozen, embed={"embedding": frozen["embed"]["embedding"][::-1]})
    assert ckpt_lib.fingerprint_mismatch(fp, ckpt_lib.fingerprint(swapped)) is not None


def test_lora_checkpoint_refuses_another_base(tmp_path):
    trainable, frozen, opt_state = _state(seed=0)
    _, other, _ = _state(seed=1)
    folder = str(tmp_path)
    with ckpt_lib.Checkpointer(folder) as ckpt:
        ckpt.save(1, trainable=trainable, opt_state=opt_state,
                  base_fingerprint=ckpt_lib.fingerprint(frozen, source="/models/base-A"))
        ckpt.save(2, trainable=trainable, opt_state=opt_state,
                  base_fingerprint=ckpt_lib.fingerprint(frozen, source="/models/base-A"))
    ckpt = ckpt_lib.Checkpointer(folder)
    with pytest.raises(CheckpointError, match="trained on base '/models/base-A', but you loaded base '/models/base-B'"):
        ckpt.restore(trainable=trainable, opt_state=opt_state,
                     base_fingerprint=ckpt_lib.fingerprint(other, source="/models/base-B"))
    assert ckpt.all_steps() == [1, 2]  # a mismatch is not corruption: no fallback, nothing moved
    ok = ckpt.restore(trainable=trainable, opt_state=opt_state,
                      base_fingerprint=ckpt_lib.fingerprint(frozen, source="/elsewhere/base-A"))
    assert ok.step == 2
    ckpt.close()


def test_non_finite_params_stop_the_restore_without_setting_steps_aside(tmp_path):
    trainable, _, _ = _state()
    folder = str(tmp_path)
    with ckpt_lib.Checkpointer(folder, max_to_keep=3) as ckpt:
        ckpt.save(1, trainable=trainable)
        ckpt.save(2, trainable=jax.tree.map(lambda x: x * jnp.nan, trainable))  # intact files, diverged values
    before = sorted(os.listdir(folder))
    with ckpt_lib.Checkpointer(folder, max_to_keep=3) as ckpt:
        with pytest.raises(ckpt_lib.NonFiniteCheckpointError) as info:
            ckpt.restore(trainable=trainable)
    message = str(info.value)
    assert "step 2" in message and "non-finite parameters" in message and "\n" not in message
    assert sorted(os.listdir(folder)) == before  # nothing moved: the files are not corrupt
