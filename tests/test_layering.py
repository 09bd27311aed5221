"""The library stays below the application: no library module imports the training, data or evaluation
layers, at the top of the file or inside a function (read from the source, so nothing is imported)."""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "subtoken_jax"
# the application: pipelines, training loops, evaluation, workdirs and command-line glue
APPLICATION = ("subtoken_jax.trainer", "subtoken_jax.predictor_training", "subtoken_jax.data",
               "subtoken_jax.synthetic_tasks", "subtoken_jax.evaluation", "subtoken_jax.workdir", "subtoken_jax.cli",
               "subtoken_jax.objectives", "subtoken_jax.checkpoint", "subtoken_jax.config_checks")
LIBRARY = ("selectors", "kernels", "packed_cache", "attention", "model", "layer_caches", "kv_cache", "layers", "lora",
           "value_groups", "value_basis", "compressed_generate", "generate", "sampling", "model_config", "input_checks",
           "hf_import", "hf_export", "gguf_import", "gguf_tokenizer", "pretrained", "tokenization", "json_files",
           "errors", "sharding", "compression", "shape_buckets", "chunked_prefill", "quest", "quest_pages", "permutations")


def imported_modules(path: pathlib.Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)  # from subtoken_jax import data


def library_files():
    for name in LIBRARY:
        folder = PACKAGE / name
        yield from (sorted(folder.rglob("*.py")) if folder.is_dir() else [PACKAGE / f"{name}.py"])


def test_library_modules_do_not_import_the_application():
    files = list(library_files())
    assert len(files) > 25 and all(f.exists() for f in files)
    violations = [f"{f.relative_to(PACKAGE.parent)} imports {m}" for f in files for m in imported_modules(f)
                  if any(m == app or m.startswith(app + ".") for app in APPLICATION)]
    assert not violations, violations


def test_every_module_is_placed_in_a_layer():
    """A new module must be put on one side, so the rule above keeps covering the whole package."""
    placed = {PACKAGE / f"{name}.py" for name in LIBRARY} | {PACKAGE / f"{m.split('.')[1]}.py" for m in APPLICATION}
    folders = {PACKAGE / name for name in LIBRARY} | {PACKAGE / m.split(".")[1] for m in APPLICATION}
    unplaced = [p.name for p in PACKAGE.glob("*.py") if p.name != "__init__.py" and p not in placed]
    unplaced += [p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists() and p not in folders]
    assert not unplaced, f"put these in LIBRARY or APPLICATION: {unplaced}"
