"""Evaluate KV-cache compression methods over tasks and KV-bytes budgets.

    python eval.py --config configs/eval.py --workdir runs/default [--config.budgets='(1.0,0.5)' ...]
    python eval.py --config configs/eval.py --workdir OUT --config.model.checkpoint=/path/to/hf_folder
    python eval.py --config configs/eval.py --workdir OUT --checkpoint PATH   # PATH: a training workdir, HF folder,
                                                                             # .gguf file or registered model name
    python eval.py --config configs/smollm2.py --workdir runs/smollm2       # SmolLM2-135M-Instruct, the main job

Writes WORKDIR/eval/: results.json, results.csv, results.md, examples.jsonl and PNG plots.
"""

import os
import sys

from absl import app, flags, logging
from subtoken_jax import cli
from subtoken_jax.errors import InputError

_CONFIG = cli.define_config("config", "configs/eval.py", "Evaluation configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir to evaluate (results go to WORKDIR/eval).",
                               required=True)
_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Evaluate this instead of --workdir's model: a training "
                                  "workdir (train.py's), a Hugging Face folder, a .gguf file or a registered model "
                                  "name (smollm2-135m-instruct); results still go to WORKDIR/eval.")


def resolve_checkpoint(config, path: str):
    """--checkpoint PATH -> the training workdir to read the model from (None: a pretrained model, set in config)."""
    from subtoken_jax.pretrained import REGISTRY, is_gguf, is_registered_name
    from subtoken_jax.workdir import read_json_object

    if is_registered_name(path) or os.path.isfile(path) and is_gguf(path):
        config.model.checkpoint = path  # a registered name or a GGUF file
        return None
    config_path = os.path.join(path, "config.json")
    if not os.path.isfile(config_path):
        raise InputError(f"--checkpoint {path!r}: no config.json there; give a train.py workdir, a Hugging Face "
                         f"folder, a .gguf file or one of {', '.join(sorted(REGISTRY))}")
    meta = read_json_object(config_path, "give a train.py workdir or a Hugging Face folder")
    if "model_type" in meta:  # a Hugging Face folder
        config.model.checkpoint = path
        return None
    return path


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it reads at INFO
    from subtoken_jax.evaluation import runner  # after flag parsing: keeps --help fast

    try:
        config = cli.config_value(_CONFIG)
        source_dir = resolve_checkpoint(config, _CHECKPOINT.value) if _CHECKPOINT.value else None
        summary = runner.run(config, _WORKDIR.value, source_dir)
    except cli.USER_ERRORS as error:
        sys.exit(f"error: {error}")
    print(summary["markdown"])
    print(f"results: {summary['paths']['results.json']}")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
