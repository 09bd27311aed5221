"""Exception types whose messages say what to fix; all are ValueErrors so callers can catch broadly."""


class ConfigError(ValueError):
    """A configuration value is out of range or inconsistent."""


class CheckpointError(ValueError):
    """A checkpoint or model folder is missing, incomplete or does not match the model."""


class InputError(ValueError):
    """A runtime input (ids, masks, budgets, sequence lengths) does not fit the model."""
