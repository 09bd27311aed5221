"""A train.py workdir: one run at a time, its record never overwritten by a run that then refuses, and the
models it holds (its base and adapters), found and restored the same way by train, eval and the predictor.

    with WorkdirLock(workdir):          # a second run on the same folder fails at once, naming the holder
        check_same_run(config, workdir)  # before anything is written
        write_config(config, workdir)

The lock is `fcntl.flock` on WORKDIR/.lock: the kernel releases it when the holder exits, however it
exits (SIGKILL included), so a stale lock file from a killed run never blocks the next one. flock is
advisory and per host; on a multi-host job only process 0 takes it (it is the one that writes).
"""

from __future__ import annotations

import fcntl
import json
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
from flax import linen as nn
from ml_collections import ConfigDict

from subtoken_jax import checkpoint as ckpt_lib
from subtoken_jax.errors import CheckpointError, ConfigError
from subtoken_jax.hf_import import add_fresh_lora
from subtoken_jax.json_files import read_json_object
from subtoken_jax.lora import combine_params, is_adapter_path, split_params
from subtoken_jax.model import DecoderLM
from subtoken_jax.model_config import LoRAConfig, ModelConfig, RoutingConfig
from subtoken_jax.pretrained import load_pretrained, load_tokenizer, pretrained_config
from subtoken_jax.tokenization import ByteTokenizer

LOCK_NAME = ".lock"
_MODEL_KEYS = ("checkpoint",)  # config.model fields that are not ModelConfig fields

# Sections of a train.py config that fix what the workdir's checkpoints hold: a resumed run must agree
# on them. (Steps, learning rates, logging and budgets may change between a run and its resumption.)
_STATE_FIELDS = ("model", "tokenizer", "adapt.lora", "adapt.routing", "seq_len")


class WorkdirLock:
    """An exclusive lock on a folder for one run; `InUseError` (a ConfigError) when another run holds it."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.path = os.path.join(workdir, LOCK_NAME)
        self._fd: Optional[int] = None

    def __enter__(self) -> "WorkdirLock":
        os.makedirs(self.workdir, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise InUseError(f"workdir {self.workdir} is in use by another run (pid {holder}); wait for it to finish "
                             f"or give another --workdir") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class InUseError(ConfigError):
    """Another run holds the workdir's lock."""


def _section(tree: Dict[str, Any], path: str):
    for key in path.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _normalise(value):
    """JSON-round-tripped form, so a recorded config and a live ConfigDict compare equal."""
    return json.loads(json.dumps(value, default=list))


def differences(recorded: Dict[str, Any], current: Dict[str, Any], fields=_STATE_FIELDS) -> list:
    """['model.num_layers: 4 there, 2 now', ...] for the state-defining fields that differ."""
    found = []
    for path in fields:
        old, new = _normalise(_section(recorded, path)), _normalise(_section(current, path))
        if old == new:
            continue
        if isinstance(old, dict) and isinstance(new, dict):
            for key in sorted(set(old) | set(new)):
                if old.get(key) != new.get(key):
                    found.append(f"{path}.{key}: {old.get(key)!r} there, {new.get(key)!r} now")
        else:
            found.append(f"{path}: {old!r} there, {new!r} now")
    return found


def check_same_run(config: ConfigDict, workdir: str, has_checkpoints: bool) -> None:
    """ConfigError when `workdir` holds checkpoints of a run whose model / adapter / data shape differ.

    Checked before anything is written, so the workdir's config.json still describes its checkpoints.
    """
    path = os.path.join(workdir, "config.json")
    if not has_checkpoints or not os.path.isfile(path):
        return
    recorded = read_json_object(path, "it should be train.py's record of the run whose checkpoints are there")
    found = differences(recorded, config.to_dict())
    if found:
        shown = "; ".join(found[:3]) + ("; ..." if len(found) > 3 else "")
        raise ConfigError(f"workdir {workdir} holds checkpoints of a different run ({shown}); resume it with its "
                          f"own settings or give another --workdir (nothing was written)")


def write_config(config: ConfigDict, workdir: str) -> None:
    """WORKDIR/config.json, written atomically (a killed run never leaves half a record)."""
    path = os.path.join(workdir, "config.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as fh:
        json.dump(config.to_dict(), fh, indent=2, default=list)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- a workdir's models


def base_model_config(config: ConfigDict) -> ModelConfig:
    if config.model.checkpoint:
        return pretrained_config(config.model.checkpoint, dtype=config.model.dtype,
                                 param_dtype=config.model.param_dtype, value_groups=config.model.value_groups)
    fields = {k: v for k, v in config.model.to_dict().items() if k not in _MODEL_KEYS}
    return ModelConfig.from_dict(fields)


def adapted_model_config(config: ConfigDict, base: ModelConfig) -> ModelConfig:
    lora = dict(config.adapt.lora.to_dict())
    lora["targets"] = tuple(lora["targets"])
    return base.replace(lora=LoRAConfig(**lora), routing=RoutingConfig(**config.adapt.routing.to_dict()))


def make_tokenizer(config: ConfigDict):
    source = config.model.checkpoint or (config.tokenizer if config.tokenizer != "byte" else "")
    return load_tokenizer(source) if source else ByteTokenizer()


def read_workdir_config(workdir: str) -> Optional[ConfigDict]:
    """The training config a train.py workdir recorded (DIR/config.json), or None when it has none."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return None
    record = read_json_object(path, "train.py writes it: is this a training workdir?")
    missing = [key for key in ("model", "stages", "data", "seq_len") if key not in record]
    if missing or not isinstance(record["model"], dict):
        raise CheckpointError(f"{path} is not a train.py record (it lacks {missing or ['a model section']}); "
                              f"is {workdir} a training workdir?")
    return ConfigDict(record)


def has_checkpoint_steps(folder: str) -> bool:
    """Whether a checkpoint folder holds at least one saved step."""
    return os.path.isdir(folder) and any(name.isdigit() for name in os.listdir(folder))


def pretrain_checkpoints(workdir: str) -> str:
    """DIR/pretrain/checkpoints of a train.py workdir; a CheckpointError when it holds no checkpoint."""
    folder = os.path.join(workdir, "pretrain", "checkpoints")
    if not has_checkpoint_steps(folder):
        raise CheckpointError(f"{folder} holds no checkpoint: run the pretrain stage of train.py first")
    return folder


def restore_base_params(model: DecoderLM, folder: str):
    """(params, step) of the latest checkpoint of a pretrain stage (its `checkpoints` folder), on one device."""
    abstract = jax.eval_shape(
        lambda: nn.meta.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), abstract)
    manager = ckpt_lib.Checkpointer(folder, create=False)
    try:
        restored = manager.restore(trainable=target)
    finally:
        manager.close()
    return restored.trainable, restored.step


def load_base(checkpoint: str, base_cfg: ModelConfig, pretrain_dir: str = ""):
    """(params, step) of a base model: checkpoint (an HF folder, a .gguf file or a registered name; step
    None), else the latest checkpoint of a pretrain stage in pretrain_dir."""
    if checkpoint:
        _, params, _ = load_pretrained(checkpoint, base_cfg.dtype, param_dtype=base_cfg.param_dtype,
                                       value_groups=base_cfg.value_groups, with_tokenizer=False)
        return params, None
    return restore_base_params(DecoderLM(base_cfg), pretrain_dir)


def fresh_adapter(adapted_cfg: ModelConfig, base_params, train_cfg: ConfigDict):
    """(trainable adapters, frozen base, the base's fingerprint) of the adapt stage, as training creates them
    and restoring must recreate them (same seed, same fingerprint source)."""
    params = add_fresh_lora(adapted_cfg, base_params, train_cfg.get("seed", 0))
    trainable, frozen = split_params(params, is_adapter_path)
    return trainable, frozen, ckpt_lib.fingerprint(frozen, source=train_cfg.model.checkpoint or "pretrain stage")


def restore_adapter(adapted_cfg: ModelConfig, base_params, train_cfg: ConfigDict, adapt_dir: str):
    """Parameters of the adapted model a workdir trained: its base with the adapters of adapt_dir's latest
    step (the base's fingerprint must match the one they were trained on)."""
    trainable, frozen, fingerprint = fresh_adapter(adapted_cfg, base_params, train_cfg)
    manager = ckpt_lib.Checkpointer(adapt_dir, create=False)
    try:
        restored = manager.restore(trainable=trainable, base_fingerprint=fingerprint)
    finally:
        manager.close()
    return combine_params(restored.trainable, frozen)


def load_workdir_base(workdir: str):
    """(DecoderLM, params, tokenizer, training config, step) of the base a train.py workdir trained.

    The base is the pretrain stage's latest checkpoint (DIR/pretrain/checkpoints), or the Hugging Face
    folder the workdir adapted (its model.checkpoint; step None).
    """
    config = read_workdir_config(workdir)
    if config is None:
        raise CheckpointError(f"{workdir} has no config.json (train.py writes it); is it a training workdir?")
    base_cfg = base_model_config(config)
    params, step = load_base(config.model.checkpoint, base_cfg, "" if config.model.checkpoint else pretrain_checkpoints(workdir))
    return DecoderLM(base_cfg), params, make_tokenizer(config), config, step
