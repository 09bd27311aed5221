"""One run per workdir, and a workdir's record never overwritten by a run that then refuses.

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

from ml_collections import ConfigDict

from subtoken_jax.errors import CheckpointError, ConfigError

LOCK_NAME = ".lock"

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


def read_json_object(path: str, what: str = "") -> Dict[str, Any]:
    """A JSON file that must hold an object; one-line CheckpointError for bad JSON or another type."""
    try:
        with open(path) as fh:
            value = json.load(fh)
    except ValueError as e:  # json.JSONDecodeError, UnicodeDecodeError
        raise CheckpointError(f"{path} is not valid JSON ({e}){'; ' + what if what else ''}") from None
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} holds a JSON {type(value).__name__}, not an object"
                              f"{'; ' + what if what else ''}")
    return value


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
