"""Reading the JSON records of checkpoints, workdirs and model folders, with one-line errors."""

from __future__ import annotations

import json
from typing import Any, Dict

from subtoken_jax.errors import CheckpointError


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
