"""What train.py and eval.py share: the --config flag with one-line errors, and the error exit.

ml_collections parses `--config.a.b=V` overrides while the flag is being *defined* (at import of the
script), so a misspelled field or a missing config file raises there, as a long traceback, before
absl's own "FATAL Flags parsing error" handling can run. `define_config` turns those into one line.
"""

from __future__ import annotations

import re
import sys
from typing import Sequence

from ml_collections import config_flags

from subtoken_jax.errors import CheckpointError, ConfigError, InputError

USER_ERRORS = (ConfigError, CheckpointError, InputError)


def _overrides(name: str, argv: Sequence[str]) -> list[str]:
    prefix = f"--{name}."
    return [arg[len(prefix):].split("=", 1)[0] for arg in argv if arg.startswith(prefix)]


def override_error(name: str, error: BaseException, argv: Sequence[str]) -> str:
    """One line for an exception raised while ml_collections applied `--name...` overrides or loaded the file."""
    text = str(error.args[0]) if error.args else str(error)
    if isinstance(error, (KeyError, AttributeError)):  # their message is the repr of a KeyError's
        text = text.strip("'\"").replace("\\'", "'").replace("\\n", "\n")
    if isinstance(error, OSError) or "Failed loading config file" in text:
        missing = re.search(r"No such file or directory: '([^']+)'", text)
        if missing:
            return f"--{name}={missing.group(1)}: no such config file"
        if "earlier failure" in text:
            return f"--{name}: the config file failed to load (see --{name}=PATH)"
        detail = [line.strip() for line in text.splitlines() if line.strip()][-1]
        return f"--{name}: the config file failed to load: {detail}"
    key = text.splitlines()[0].strip("'\"") if text else ""
    hint = re.search(r'Did you mean "([^"]+)"', text)
    suggestion = f"; did you mean {hint.group(1)!r}?" if hint else ""
    for path in _overrides(name, argv):
        if key and key in path.split("."):
            return f"--{name}.{path}: no such config field{suggestion}"
    return f"--{name}: {text.splitlines()[0] if text else type(error).__name__}{suggestion}"


def define_config(name: str, default: str, help_string: str):
    """config_flags.DEFINE_config_file, exiting with one line on an unknown field or a missing file."""
    try:
        return config_flags.DEFINE_config_file(name, default, help_string)
    except (AttributeError, KeyError, OSError, ValueError, TypeError) as error:
        sys.exit(f"error: {override_error(name, error, sys.argv)}")


def parse_flags(argv: Sequence[str], config_flag: str = "config"):
    """absl's flag parsing (pass as app.run's flags_parser), with one line for bad flags or config overrides."""
    from absl import flags

    try:
        return flags.FLAGS(argv)
    except flags.Error as error:  # a value that does not parse, a missing required flag
        sys.exit(f"error: {error}")
    except (AttributeError, KeyError, OSError, TypeError) as error:  # ml_collections, with --config given
        sys.exit(f"error: {override_error(config_flag, error, argv)}")


def config_value(holder, name: str = "config"):
    """The parsed config of a define_config flag; one line when its file failed to load.

    ml_collections defers a load failure of a file given on the command line: the flag's value is
    an object that raises on first use.
    """
    config = holder.value
    try:
        config.get("seed")
    except (OSError, AttributeError, KeyError) as error:
        while "earlier failure" in str(error) and (error.__cause__ or error.__context__):
            error = error.__cause__ or error.__context__
        sys.exit(f"error: {override_error(name, error, sys.argv)}")
    return config
