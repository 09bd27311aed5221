"""Train a subtoken-jax model.

    python train.py --config configs/default.py --workdir runs/default [--config.adapt.steps=100 ...]
"""

import sys

from absl import app, flags, logging
from subtoken_jax import cli

_CONFIG = cli.define_config("config", "configs/default.py", "Training configuration file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for checkpoints, metrics and results.", required=True)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)  # orbax logs every file it writes at INFO
    from subtoken_jax import trainer  # after flag parsing: keeps --help fast

    config = cli.config_value(_CONFIG)
    try:
        if config.get("task") == "predictor":  # the query-aware value-group predictor (configs/predictor.py)
            from subtoken_jax import predictor_training

            result = predictor_training.run(config, _WORKDIR.value)
            print(" ".join(f"{k}={float(v):.4f}" for k, v in result.items()))
            print(f"results: {_WORKDIR.value}/predictor_eval.json")
            return
        summary = trainer.run(config, _WORKDIR.value)
    except (*cli.USER_ERRORS, trainer.NonFiniteLossError) as error:
        sys.exit(f"error: {error}")
    print(trainer.format_summary(summary))
    print(f"results: {_WORKDIR.value}/summary.json")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
