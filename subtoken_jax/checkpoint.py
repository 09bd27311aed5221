"""Training checkpoints: trainable params, optimizer state, data iterator, config and metadata.

A thin layer over orbax's CheckpointManager (args API). Each step folder holds the items

    trainable/      params that train (e.g. LoRA + routers only; the frozen base is not saved)
    opt_state/      the optax state (restored into its namedtuples via an abstract target)
    step/           {"step": N}
    data_iterator/  the grain iterator state, one file per process (optional)
    config/         the run config as JSON (optional)
    metadata/       JSON: metric, base-model fingerprint (for LoRA-only checkpoints), library version

Retention: the last `max_to_keep` steps AND the `keep_best` best by `metric` (lower is better) are
kept. Orbax's legacy options cannot say that (`max_to_keep` + `best_fn` keeps the N best and may
drop the newest), so this uses orbax preservation policies: AnyPreservationPolicy([LatestN, BestN]).

Saving is atomic (orbax writes a temporary folder and renames it when complete) and asynchronous:
call `wait_until_finished()` or `close()` (also on context-manager exit) before the process ends.

Integrity: orbax checksums only the shard *indices* of its zarr3 arrays (crc32c), not the array
data, so same-size corruption of a data file (bit rot, a partial overwrite) restores silently as
wrong (often NaN) values. So once a save is on disk, the sha256 of every file of the step folder
is written to `<step>/checksums.json`, and a restore verifies them first: a mismatch makes the step
corrupt (below). Steps saved before this existed, or cut off between finalisation and the checksum
write, have no checksums and restore unverified.

Corrupt steps: restoring a step that fails to read, or fails its checksums, raises CheckpointError.
`restore()` with no step (the latest) falls back to the newest step that restores, with a warning, and moves the broken
newer steps aside to `corrupt.<step>.<time>` folders (never deleted), so resuming from the older
step can save those step numbers again and retention never counts a broken step as a "latest" one.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import time
from typing import Any, Dict, List, Mapping, Optional

import grain
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util

from subtoken_jax.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ITEMS = ("trainable", "opt_state", "step", "data_iterator", "config", "metadata")
CORRUPT_PREFIX = "corrupt."
CHECKSUMS = "checksums.json"


# ----------------------------------------------------------------------------- file checksums


def _sha256(path: epath.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _step_files(folder: epath.Path, prefix: str = "") -> Dict[str, epath.Path]:
    """{relative path: path} of every file under folder (epath has no recursive glob on cloud paths)."""
    files = {}
    for path in folder.iterdir():
        relative = prefix + path.name
        if path.is_dir():
            files.update(_step_files(path, relative + "/"))
        elif not relative.startswith(CHECKSUMS):  # the record itself and its .tmp
            files[relative] = path
    return files


def write_checksums(folder: epath.Path) -> None:
    """Records sha256 and size of every file of a finished step folder in folder/checksums.json."""
    record = {name: {"sha256": _sha256(path), "size": path.stat().length}
              for name, path in sorted(_step_files(folder).items())}
    tmp = folder / (CHECKSUMS + ".tmp")
    tmp.write_text(json.dumps({"algorithm": "sha256", "files": record}, indent=1))
    tmp.rename(folder / CHECKSUMS)  # atomic: a half-written record is never read as the record


def verify_checksums(folder: epath.Path) -> Optional[str]:
    """None when every recorded file is intact (or nothing was recorded); else what differs, in words."""
    record_path = folder / CHECKSUMS
    if not record_path.exists():
        return None
    try:
        recorded = json.loads(record_path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as e:
        return f"its {CHECKSUMS} is unreadable ({_one_line(e)})"
    present = _step_files(folder)
    for name, entry in recorded.items():
        if name not in present:
            return f"{name} is missing"
        if _sha256(present[name]) != entry["sha256"]:
            return f"{name} changed since it was saved (sha256 mismatch)"
    return None


# ----------------------------------------------------------------------------- base-model fingerprints


def _flat_leaves(params) -> Dict[str, Any]:
    if isinstance(params, Mapping):
        flat = traverse_util.flatten_dict(params, sep="/") if params else {}
        return {str(k): v for k, v in flat.items()}
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}


@jax.jit
def _leaf_stats(x):
    x = x.astype(jnp.float32).reshape(-1)
    weights = jnp.cos(jnp.arange(x.shape[0], dtype=jnp.float32) * 0.7)  # catches permuted / transposed weights
    return jnp.stack([jnp.mean(x), jnp.sqrt(jnp.mean(x * x)), jnp.mean(x * weights)])


def fingerprint(params, source: str = "", num_value_leaves: int = 8) -> Dict[str, Any]:
    """Identifies a (base) param tree: hashes of its paths+shapes and dtypes, and stats of a few leaves.

    The stats (mean, rms, a position-weighted mean, in float32) of up to `num_value_leaves` leaves,
    spread over the sorted paths, tell apart two bases with the same architecture. `source` is a
    human-readable name (a path or "pretrain stage") used in error messages.
    """
    flat = dict(sorted(_flat_leaves(params).items()))
    shapes = [[path, list(np.shape(leaf))] for path, leaf in flat.items()]
    dtypes = [[path, str(jnp.dtype(leaf.dtype))] for path, leaf in flat.items()]
    paths = list(flat)
    count = min(num_value_leaves, len(paths))
    picks = sorted({paths[round(i * (len(paths) - 1) / max(count - 1, 1))] for i in range(count)}) if count else []
    values = {}
    for path in picks:
        leaf = flat[path]
        if np.size(leaf) == 0:
            continue
        values[path] = [float(v) for v in np.asarray(jax.device_get(_leaf_stats(leaf)))]
    return {
        "source": str(source),
        "num_params": int(sum(int(np.size(leaf)) for leaf in flat.values())),
        "shapes_sha256": hashlib.sha256(json.dumps(shapes).encode()).hexdigest(),
        "dtypes_sha256": hashlib.sha256(json.dumps(dtypes).encode()).hexdigest(),
        "values": values,
    }


def fingerprint_mismatch(recorded: Mapping[str, Any], current: Mapping[str, Any], rtol: float = 1e-3) -> Optional[str]:
    """None if the fingerprints describe the same base (up to float noise), else what differs."""
    if recorded.get("shapes_sha256") != current.get("shapes_sha256"):
        return (f"param shapes differ ({recorded.get('num_params')} vs {current.get('num_params')} params, "
                f"shape hash {str(recorded.get('shapes_sha256'))[:12]} vs {str(current.get('shapes_sha256'))[:12]})")
    dtypes_differ = recorded.get("dtypes_sha256") != current.get("dtypes_sha256")
    if dtypes_differ:
        log.warning("the base params have other dtypes than the checkpoint's base; comparing values loosely")
        rtol = max(rtol, 2e-2)  # bfloat16 keeps ~3 significant digits
    theirs, ours = recorded.get("values", {}), current.get("values", {})
    for path in sorted(set(theirs) & set(ours)):
        (m1, r1, w1), (m2, r2, w2) = theirs[path], ours[path]
        scale = max(abs(r1), abs(r2), 1e-12)
        for name, a, b in (("mean", m1, m2), ("rms", r1, r2), ("weighted mean", w1, w2)):
            if not math.isclose(a, b, rel_tol=rtol, abs_tol=rtol * scale):
                return f"values of {path} differ ({name} {a:.6g} vs {b:.6g})"
    return None


def check_base_fingerprint(recorded: Optional[Mapping[str, Any]], current: Optional[Mapping[str, Any]],
                           where: str = "checkpoint") -> None:
    """Raises CheckpointError if a LoRA-only checkpoint was trained on another base than `current`."""
    if current is None:
        return
    if recorded is None:
        log.warning("%s records no base-model fingerprint; cannot check that it fits the loaded base (%s)",
                    where, current.get("source"))
        return
    why = fingerprint_mismatch(recorded, current)
    if why:
        raise CheckpointError(f"{where} was trained on base {recorded.get('source')!r}, but you loaded base "
                              f"{current.get('source')!r}: {why}")


# ----------------------------------------------------------------------------- helpers


def _jsonable(value: Any) -> Any:
    """ConfigDicts, tuples, numpy scalars and arrays -> plain JSON values (others -> str)."""
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, str, type(None))):
        return value
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    if isinstance(value, (np.ndarray, jax.Array)) and np.ndim(value) == 0:
        return _jsonable(np.asarray(value).item())
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value).tolist()
    return str(value)


def _abstract(tree):
    """ShapeDtypeStructs (keeping shardings) for restore targets; abstract leaves pass through."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        return ocp.utils.to_shape_dtype_struct(x)

    return jax.tree.map(leaf, tree)


class _JsonStateIterator:
    """Lets grain's checkpoint handler save any iterator whose get_state() returns a JSON-able dict."""

    def __init__(self, iterator):
        self.iterator = iterator

    def get_state(self) -> bytes:
        return json.dumps(_jsonable(self.iterator.get_state())).encode()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(json.loads(state.decode()))

    def start_prefetch(self) -> None:
        start = getattr(self.iterator, "start_prefetch", None)
        if start is not None:
            start()


def _grain_item(iterator):
    if isinstance(iterator, grain.DatasetIterator):
        return iterator
    if not (hasattr(iterator, "get_state") and hasattr(iterator, "set_state")):
        raise CheckpointError(f"data_iterator of type {type(iterator).__name__} has no get_state/set_state, so its "
                              "position cannot be checkpointed; pass a grain iterator or None")
    if isinstance(iterator.get_state(), bytes):  # grain.DataLoader iterators
        return iterator if hasattr(iterator, "start_prefetch") else _BytesStateIterator(iterator)
    return _JsonStateIterator(iterator)


class _BytesStateIterator(_JsonStateIterator):
    def get_state(self) -> bytes:
        return self.iterator.get_state()

    def set_state(self, state: bytes) -> None:
        self.iterator.set_state(state)


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}{'...' if len(text) > 300 else ''}"


@dataclasses.dataclass
class Restored:
    """What `Checkpointer.restore` returns."""

    step: int
    trainable: Any
    opt_state: Any = None
    data_iterator: Any = None  # the iterator passed in, moved to the saved position (None if not restored)
    config: Optional[Dict[str, Any]] = None
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)


# ----------------------------------------------------------------------------- the checkpointer


def _item_handlers() -> Dict[str, Any]:
    # A handler for every item (orbax rejects items without one once any is given); registering them
    # up front lets a fresh manager read item metadata (shapes) before restoring.
    return {"trainable": ocp.StandardCheckpointHandler(), "opt_state": ocp.StandardCheckpointHandler(),
            "step": ocp.JsonCheckpointHandler(), "config": ocp.JsonCheckpointHandler(),
            "metadata": ocp.JsonCheckpointHandler(), "data_iterator": grain.checkpoint.CheckpointHandler()}


class Checkpointer:
    """Saves and restores training state in `directory/<step>/` with orbax.

        ckpt = Checkpointer(dir, max_to_keep=2, keep_best=1)
        ckpt.save(step, trainable=t, opt_state=o, data_iterator=it, config=config, metric=eval_loss,
                  base_fingerprint=fingerprint(frozen, source=base_path))
        r = ckpt.restore(trainable=t, opt_state=o, data_iterator=it, base_fingerprint=...)
        ckpt.close()

    max_to_keep: the newest steps always kept (None keeps every step).
    keep_best: the best steps by `metric` (lower is better) also kept; 0 disables. Steps saved
      without a metric are only kept as one of the newest.
    create: make `directory` if it does not exist (else a missing directory is a CheckpointError).
    async_save: save in a background thread (orbax's default); `save` returns once the arrays are
      copied to host, so training can go on.
    """

    def __init__(self, directory: str, *, max_to_keep: Optional[int] = 2, keep_best: int = 1, create: bool = True,
                 async_save: bool = True):
        if max_to_keep is not None and max_to_keep < 1:
            raise CheckpointError(f"max_to_keep must be >= 1 or None, got {max_to_keep}")
        if keep_best < 0:
            raise CheckpointError(f"keep_best must be >= 0, got {keep_best}")
        directory = os.fspath(directory)
        # a local path or a cloud URL (gs://...), which epath handles like orbax does
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._path = epath.Path(self.directory)
        if not create and not self._path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        policies: List[Any] = [ocp.checkpoint_managers.LatestN(n=max_to_keep)]
        if keep_best and max_to_keep is not None:
            policies.append(ocp.checkpoint_managers.BestN(get_metric_fn=lambda m: m["metric"], reverse=True,
                                                          n=keep_best, keep_checkpoints_without_metrics=False))
        options = ocp.CheckpointManagerOptions(
            create=create,
            best_fn=lambda m: m["metric"],  # only for best_step(); retention is the policy below
            best_mode="min",
            preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,  # leftovers of interrupted saves (never complete steps)
        )
        self._unrecorded: List[int] = []  # saved steps whose checksums are not written yet
        try:
            self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_item_handlers())
        except Exception as e:  # noqa: BLE001 - permissions, bad paths
            raise CheckpointError(f"cannot open checkpoint directory {self.directory}: {_one_line(e)}") from e

    # --------------------------------------------------------------- queries

    def all_steps(self) -> List[int]:
        return sorted(self._manager.all_steps())

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def best_step(self) -> Optional[int]:
        """The step with the lowest metric (the latest if no step has one); None if there are none."""
        best = self._manager.best_step()
        return self.latest_step() if best is None else best

    def step_dir(self, step: int) -> epath.Path:
        return self._path / str(step)

    def items(self, step: int) -> List[str]:
        """The items saved at `step` (sub-folders of its step folder)."""
        folder = self.step_dir(step)
        return sorted(n for n in ITEMS if (folder / n).is_dir())

    def read_metadata(self, step: Optional[int] = None) -> Dict[str, Any]:
        """The metadata JSON of `step` (default: latest) without touching the arrays."""
        step = self._resolve_step(step)
        try:
            return dict(self._manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore())).metadata)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"cannot read metadata of step {step} in {self.directory}: {_one_line(e)}") from e

    # --------------------------------------------------------------- save

    def save(self, step: int, *, trainable, opt_state=None, data_iterator=None, config=None,
             metric: Optional[float] = None, base_fingerprint: Optional[Mapping[str, Any]] = None,
             metadata: Optional[Mapping[str, Any]] = None) -> bool:
        """Starts an (atomic, async) save of step `step`; returns whether it saved.

        metric: lower is better (e.g. eval loss); used to keep the best step. A NaN/inf metric is
          recorded in metadata but not used for ranking.
        base_fingerprint: `fingerprint(frozen_base)` for checkpoints that hold only adapters.
        """
        step = int(step)
        if step in self._manager.all_steps():
            raise CheckpointError(f"step {step} already exists in {self.directory}; restore from it or pick "
                                  "another step (existing steps are never overwritten)")
        meta = {"format_version": FORMAT_VERSION, "step": step, "time": time.time(),
                "metric": None if metric is None else float(metric),
                "base_fingerprint": None if base_fingerprint is None else _jsonable(base_fingerprint),
                "items": [], **_jsonable(dict(metadata or {}))}
        args = {"trainable": ocp.args.StandardSave(trainable), "step": ocp.args.JsonSave({"step": step})}
        if opt_state is not None:
            args["opt_state"] = ocp.args.StandardSave(opt_state)
        if data_iterator is not None:
            args["data_iterator"] = grain.checkpoint.CheckpointSave(_grain_item(data_iterator))
        if config is not None:
            args["config"] = ocp.args.JsonSave(_jsonable(config))
        meta["items"] = sorted(list(args) + ["metadata"])
        args["metadata"] = ocp.args.JsonSave(meta)
        metrics = None
        if metric is not None and math.isfinite(float(metric)):
            metrics = {"metric": float(metric)}
        self.wait_until_finished()  # orbax would wait for the previous save anyway; then its checksums
        try:
            saved = self._manager.save(step, args=ocp.args.Composite(**args), metrics=metrics)
        except Exception as e:  # noqa: BLE001
            raise CheckpointError(f"saving step {step} to {self.directory} failed: {_one_line(e)}") from e
        if saved:
            self._unrecorded.append(step)
        return saved

    def wait_until_finished(self) -> None:
        """Blocks until the saves in flight are on disk, then records their checksums."""
        self._manager.wait_until_finished()
        pending, self._unrecorded = self._unrecorded, []
        if jax.process_index() != 0:
            return
        for step in pending:
            folder = self.step_dir(step)
            if folder.is_dir():  # (retention may already have removed it)
                write_checksums(folder)

    def close(self) -> None:
        self.wait_until_finished()
        self._manager.close()

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --------------------------------------------------------------- restore

    def _resolve_step(self, step: Optional[int]) -> int:
        self.wait_until_finished()  # a save still in flight is not on disk yet
        self._manager.reload()
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise CheckpointError(f"step {step} is not in {self.directory} (steps there: {steps})")
        return int(step)

    def restore(self, step: Optional[int] = None, *, trainable, opt_state=None, data_iterator=None,
                base_fingerprint: Optional[Mapping[str, Any]] = None, fallback: bool = True) -> Restored:
        """Restores `step`, or the latest step that is readable when step is None.

        trainable / opt_state: targets (arrays or ShapeDtypeStructs, with shardings) that give the
          structure, dtypes and layout to restore into; opt_state=None skips the optimizer state.
        data_iterator: restored in place to the saved position (skipped, with a warning, if the
          step has none).
        base_fingerprint: if given, the step's recorded base must match (else CheckpointError).
        fallback: with step=None, try older steps when the latest fails to read; broken newer steps
          are moved aside to `corrupt.<step>.<time>` (not deleted) once an older one restores.
        """
        if not self._path.is_dir():
            raise CheckpointError(f"checkpoint directory {self.directory} does not exist")
        self.wait_until_finished()
        self._manager.reload()
        if step is not None or not fallback:
            return self._restore_step(self._resolve_step(step), trainable, opt_state, data_iterator, base_fingerprint)
        steps = self.all_steps()
        if not steps:
            raise CheckpointError(f"no checkpoints in {self.directory}")
        failures = []
        for candidate in reversed(steps):
            try:
                restored = self._restore_step(candidate, trainable, opt_state, data_iterator, base_fingerprint)
            except (_MismatchError, NonFiniteCheckpointError):
                raise  # the files are intact; the targets / base do not fit, or training had diverged
            except CheckpointError as e:
                failures.append((candidate, e))
                log.warning("checkpoint step %d is unreadable, trying an older step: %s", candidate, e)
                continue
            if failures:
                self._quarantine([s for s, _ in failures])
                log.warning("restored step %d; newer step(s) %s were unreadable and moved aside in %s",
                            candidate, [s for s, _ in failures], self.directory)
            return restored
        raise CheckpointError(f"no step in {self.directory} could be restored; latest error: {failures[0][1]}")

    def _restore_step(self, step, trainable, opt_state, data_iterator, base_fingerprint) -> Restored:
        where = f"step {step} in {self.directory}"
        present = self.items(step)
        needed = ["trainable", "step", "metadata"] + (["opt_state"] if opt_state is not None else [])
        missing = [n for n in needed if n not in present]
        if missing:
            raise CheckpointError(f"{where} is incomplete: it lacks {missing} (has {present})")
        damage = verify_checksums(self.step_dir(step))
        if damage:
            raise CheckpointError(f"{where} is corrupt: {damage}")
        metadata = self.read_metadata(step)
        try:
            check_base_fingerprint(metadata.get("base_fingerprint"), base_fingerprint, where)
        except CheckpointError as e:
            raise _MismatchError(str(e)) from None
        self._check_shapes(step, trainable, where)
        args = {"trainable": ocp.args.StandardRestore(_abstract(trainable)), "step": ocp.args.JsonRestore()}
        if opt_state is not None:
            args["opt_state"] = ocp.args.StandardRestore(_abstract(opt_state))
        if "config" in present:
            args["config"] = ocp.args.JsonRestore()
        if data_iterator is not None:
            if "data_iterator" in present:
                args["data_iterator"] = grain.checkpoint.CheckpointRestore(_grain_item(data_iterator))
            else:
                log.warning("%s has no data iterator state; the data starts from the beginning", where)
        try:
            result = self._manager.restore(step, args=ocp.args.Composite(**args))
        except Exception as e:  # noqa: BLE001 - orbax / tensorstore raise many types for bad files
            if _looks_like_mismatch(e):
                raise _MismatchError(f"{where} does not match the restore target: {_one_line(e)}") from e
            raise CheckpointError(f"{where} is corrupt or unreadable: {_one_line(e)}") from e
        if not bool(all_finite(result.trainable)):
            raise NonFiniteCheckpointError(
                f"{where} holds non-finite parameters (NaN or inf) though its files are intact: the run that saved "
                f"it had diverged. Move that step folder aside to resume from an older step, or start a new workdir")
        saved_step = int(result.step["step"]) if "step" in result and result.step else step
        return Restored(step=saved_step, trainable=result.trainable,
                        opt_state=result.opt_state if opt_state is not None else None,
                        data_iterator=data_iterator if "data_iterator" in args else None,
                        config=dict(result.config) if "config" in args else None, metadata=metadata)

    def _check_shapes(self, step: int, trainable, where: str) -> None:
        """A clear error when the saved trainable params do not fit the target (other LoRA rank, targets, ...)."""
        try:
            saved = self._manager.item_metadata(step)["trainable"]
            saved = traverse_util.flatten_dict(getattr(saved, "tree", saved), sep="/")
        except Exception as e:  # noqa: BLE001 - unreadable metadata: let the restore itself decide
            log.debug("cannot read the param metadata of %s: %s", where, e)
            return
        if not isinstance(trainable, Mapping):
            return
        wanted = traverse_util.flatten_dict(trainable, sep="/") if trainable else {}
        missing, extra = sorted(set(wanted) - set(saved)), sorted(set(saved) - set(wanted))
        if missing or extra:
            raise _MismatchError(f"{where} does not fit the model: params missing from the checkpoint {missing[:4]}"
                                 f"{'...' if len(missing) > 4 else ''}, params only in the checkpoint {extra[:4]}"
                                 f"{'...' if len(extra) > 4 else ''} (different LoRA targets / routing?)")
        for path in sorted(wanted):
            on_disk, ours = tuple(getattr(saved[path], "shape", ()) or ()), tuple(np.shape(wanted[path]))
            if on_disk != ours:
                raise _MismatchError(f"{where} does not fit the model: {path} has shape {on_disk} in the checkpoint "
                                     f"but {ours} in the model (different LoRA rank or model size?)")

    def _quarantine(self, steps: List[int]) -> None:
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                source = self.step_dir(step)
                if source.is_dir():
                    target = self._path / f"{CORRUPT_PREFIX}{step}.{stamp}"
                    source.rename(target)
                    log.warning("moved unreadable checkpoint %s to %s", source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("subtoken_jax.checkpoint.quarantine")
        self._manager.reload()


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether every floating leaf of a pytree is finite (integer leaves, e.g. optax counts, are skipped)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return jnp.all(jnp.asarray(leaves)) if leaves else jnp.asarray(True)


class NonFiniteCheckpointError(CheckpointError):
    """The step's files are intact but its parameters are not finite (saved by a diverged run)."""


class _MismatchError(CheckpointError):
    """The step is readable but does not fit the targets or the base (not a corruption)."""


def _looks_like_mismatch(error: BaseException) -> bool:
    if isinstance(error, (FileNotFoundError, OSError)):
        return False
    text = str(error).lower()
    return any(h in text for h in ("tree structure", "does not match", "mismatch", "missing keys", "unexpected keys",
                                   "not compatible with the stored shape"))
