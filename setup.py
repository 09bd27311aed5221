"""subtoken-jax: sub-token (value-group) routing for LoRA adaptation and KV-cache compression, in JAX/Flax."""

from setuptools import find_packages, setup

# The JAX stack is pinned to versions measured to install and work together (see ../shared/JAX_NOTES.md).
INSTALL_REQUIRES = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "ml_collections==1.1.0",
    "grain==0.2.18",
    "tensorflow-datasets==4.9.10",
    "array_record==0.8.6",
    "importlib_resources>=6",  # tfds needs it for package-style builders but does not declare it
    "numpy>=2.0,<3",
    "absl-py>=2.1",
    "tokenizers>=0.20",
    "safetensors>=0.4.5",
    "gguf==0.19.0",  # ggml-org's GGUF reader and dequantiser (llama.cpp files)
    "jinja2>=3.1",  # chat templates, rendered as transformers does
    "tqdm>=4.66",
    "matplotlib>=3.8",
]

EXTRAS_REQUIRE = {
    # torch and transformers are only the independent reference in tests and benchmarks; transformers'
    # GGUF loader (the reference for ours) needs accelerate. pytest-xdist runs two test files at a time:
    # compilation, which dominates small tests, is single-threaded.
    "test": ["pytest>=8", "pytest-xdist>=3.5", "hypothesis>=6.100", "torch==2.13.0", "transformers>=5.0,<6",
             "accelerate>=1.0"],
}

setup(
    name="subtoken-jax",
    version="0.1.0",
    description="Sub-token value-group routing in LoRA and query-aware KV compression for JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["subtoken_jax", "subtoken_jax.*"]),
    # trained predictors that ship with the package (loaded by name: selectors.predictor.load_predictor)
    package_data={"subtoken_jax": ["predictors/*/*.json", "predictors/*/*.msgpack", "predictors/*/*.md"]},
    python_requires=">=3.10",
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
