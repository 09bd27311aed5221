"""XLA settings for the test run: compile fast, compile once, and how tests still see every compilation.

Most of the suite's time on 2 cores is XLA compiling tiny programs, and many are compiled more than once: by
both xdist workers, by the eval / train CLIs the tests run in subprocesses, and again after each module drops
its programs (conftest). JAX's persistent cache lets the second compilation of a program load the first's.
The directory is made once per run (the controller's environment reaches the workers and every subprocess)
and removed at the end; a user's own JAX_COMPILATION_CACHE_DIR is left alone.
"""

import contextlib
import os
import shutil
import tempfile

_OWNED = "SUBTOKEN_JAX_TEST_CACHE_OWNED"


def share_compilation_cache() -> None:
    """Before JAX is imported: point this process and its children at one run-wide cache directory."""
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:
        return
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="subtoken-jax-tests-xla-")
    os.environ[_OWNED] = str(os.getpid())
    # tiny programs compile in well under JAX's default 1 s threshold; cache them too
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.05")


def prefer_fast_compilation() -> None:
    """Before JAX is imported: LLVM optimisation level 0 for the run's processes (and the subprocesses they start).
    The tests' programs are tiny, so compiling dominates: measured on 2 cores, tests/test_train.py 79 s -> 59 s,
    while the SmolLM2 tests that run a 135M-parameter model took no longer (82 s against 88 s). Numerics are
    unchanged (no fast-math either way). A user's own optimisation level in XLA_FLAGS is kept."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_backend_optimization_level" not in flags:
        os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()


def remove_compilation_cache() -> None:
    """At the end of the run, in the process that made the directory."""
    if os.environ.get(_OWNED) == str(os.getpid()):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


def is_compilation(event: str) -> bool:
    """A jax.monitoring duration event that marks a new executable. JAX records backend_compile_duration around
    the whole compile-or-load step, so a program retraced and loaded from the persistent cache counts too
    (checked: a second jit of the same program, served from the cache, records it after cache_retrieval_time_sec)."""
    return event.endswith("backend_compile_duration")


@contextlib.contextmanager
def compilations():
    """A list that collects the XLA compilations (is_compilation events) made inside the with block."""
    import jax.monitoring

    events = []
    listener = lambda event, secs, **_: events.append(event) if is_compilation(event) else None  # noqa: E731
    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
