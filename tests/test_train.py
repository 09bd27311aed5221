"""The training system end to end on tiny shapes: learning, kill-and-resume, bad configs."""

import json
import os
import re
import signal
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny two-stage run: a few seconds of compute per stage on 2 cores.
TINY = [
    "--config.model.hidden_size=32", "--config.model.intermediate_size=64", "--config.model.num_layers=1",
    "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.value_groups=4",
    "--config.seq_len=32", "--config.batch_size=4", "--config.data.max_bytes=200000", "--config.data.eval_batches=2",
    "--config.log_every=1", "--config.pretrain.warmup_steps=5", "--config.adapt.warmup_steps=2", "--config.adapt.lora.rank=4", "--config.adapt.lora.num_subspaces=2",
    "--config.adapt.lora.active_subspaces=1", "--config.eval_budgets=(1.0,0.5)",
]


def _train(workdir, *overrides, prelude="", **popen):
    """train.py in a subprocess; `prelude` is Python run before it (to plant a deterministic crash)."""
    script = os.path.join(ROOT, "train.py")
    argv = ["--config", os.path.join(ROOT, "configs/default.py"), "--workdir", str(workdir), *TINY, *overrides]
    if prelude:
        runner = f"import runpy, sys\n{prelude}\nsys.argv = {[script, *argv]!r}\nrunpy.run_path({script!r}, run_name='__main__')"
        cmd = [sys.executable, "-c", runner]
    else:
        cmd = [sys.executable, script, *argv]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


# SIGKILL the process right after step 10's metrics are written: a hard crash between checkpoints (at 8 and 12),
# at the same step on every machine, however fast it trains.
KILL_AFTER_STEP_10 = """
import os, signal
from subtoken_jax import trainer
_write = trainer.MetricsWriter.write
def _write_then_die(self, step, metrics):
    _write(self, step, metrics)
    if step == 10:
        os.kill(os.getpid(), signal.SIGKILL)
trainer.MetricsWriter.write = _write_then_die
"""


def _metrics(path):
    """The last logged loss of each step (a resumed run re-logs the steps after its checkpoint)."""
    by_step = {}
    with open(path) as fh:
        for line in fh:
            record = json.loads(line)
            if "ce" in record:
                by_step[record["step"]] = record["ce"]
    return by_step


def test_two_stage_run_learns_and_reports_budgets(tmp_path):
    proc = _train(tmp_path, "--config.pretrain.steps=40", "--config.adapt.steps=10", "--config.checkpoint_every=20")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    losses = _metrics(tmp_path / "pretrain" / "metrics.jsonl")
    first, last = losses[1], losses[40]
    assert last < first - 1.0, (first, last)  # byte-level loss starts near log(259) = 5.56
    summary = json.load(open(tmp_path / "summary.json"))
    methods = {row["method"] for row in summary["budgets"]}
    assert {"keep-largest-norm groups", "random groups"} <= methods
    assert "| method |" in out and "routing beats" in out  # the one-line verdict under the table
    assert os.path.isdir(tmp_path / "adapt" / "checkpoints")


def test_summary_says_where_routing_wins():
    from subtoken_jax import trainer

    rows = [{"method": m, "budget": b, "perplexity": p, "value_budget": k} for m, b, p, k in [
        ("routed (adaptive) + routed LoRA", 1.0, 3.9, 1.0), ("keep-largest-norm groups", 1.0, 3.8, 1.0),
        ("routed (adaptive) + routed LoRA", 0.5, 4.0, 0.507), ("keep-largest-norm groups", 0.5, 4.2, 0.5),
        ("random groups", 1.0, 3.8, 1.0), ("random groups", 0.5, 7.9, 0.5)]]
    text = trainer.format_summary({"budgets": rows})
    assert "4.000 (kept 0.507)" in text and "| 4.200 |" in text
    assert text.splitlines()[-1] == ("routing beats every baseline at rho = 0.5; not at rho = 1 (at rho = 1 nothing "
                                     "is dropped: the gap there is what the shared adapter costs).")


def test_kill_and_resume_equals_uninterrupted(tmp_path):
    args = ["--config.stages=('pretrain',)", "--config.pretrain.steps=16", "--config.checkpoint_every=4"]
    straight = _train(tmp_path / "straight", *args)
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out

    victim = _train(tmp_path / "killed", *args, prelude=KILL_AFTER_STEP_10)
    victim.communicate(timeout=600)
    assert victim.returncode == -signal.SIGKILL
    metrics = tmp_path / "killed" / "pretrain" / "metrics.jsonl"
    assert max(_metrics(metrics)) == 10

    resumed = _train(tmp_path / "killed", *args)
    out, _ = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, out
    assert _metrics(metrics) == _metrics(tmp_path / "straight" / "pretrain" / "metrics.jsonl")


def _default_config(**overrides):
    """configs/default.py with TINY's and the given overrides (dotted paths), as train.py would build it."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("default_config", os.path.join(ROOT, "configs", "default.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    tiny = {arg[len("--config."):].split("=", 1)[0]: eval(arg.split("=", 1)[1]) for arg in TINY}  # noqa: S307
    for path, value in {**tiny, **overrides}.items():
        *parents, leaf = path.split(".")
        node = config
        for key in parents:
            node = node[key]
        node[leaf] = value
    return config


@pytest.mark.parametrize("override,message", [
    ({"adapt.budgets": (0.5, 1.5)}, "config.adapt.budgets=(0.5, 1.5): each value must be a number > 0 and <= 1"),
    ({"model.value_groups": 3}, "must divide head_dim=16"),
    ({"adapt.lora.active_subspaces": 3}, "active_subspaces=3"),
    ({"adapt.routing.mode": "fixed_k", "adapt.routing.k": 5}, "routing.k=5 must be in [1, G=4]"),
    ({"data.source": "webtext"}, "webtext"),
    ({"seq_len": 4096}, "exceeds model max_position_embeddings"),
    ({"model.checkpoint": "/nonexistent"}, "does not exist"),
    ({"stages": ("adapt",)}, "stage 'adapt' needs a base"),
])
def test_bad_config_fails_before_compute(tmp_path, override, message):
    """In-process through trainer.run (what train.py calls; its one-line exit is tested in test_reliability)."""
    from subtoken_jax import trainer
    from subtoken_jax.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        trainer.run(_default_config(**override), str(tmp_path / "run"))
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not os.path.exists(tmp_path / "run")


# Hold the run after step 1's metrics until the test creates the file GATE (so a second run can try the workdir).
PAUSE_AFTER_STEP_1 = """
import os, time
from subtoken_jax import trainer
_write = trainer.MetricsWriter.write
def _write_then_wait(self, step, metrics):
    _write(self, step, metrics)
    if step == 1:
        open(GATE + ".waiting", "w").close()
        while not os.path.exists(GATE):
            time.sleep(0.1)
trainer.MetricsWriter.write = _write_then_wait
"""


def _wait_for(path, proc, timeout=300):
    import time

    start = time.time()
    while not os.path.exists(path):
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() - start < timeout, f"{path} never appeared"
        time.sleep(0.2)


def test_warm_start_and_one_run_per_workdir(tmp_path):
    gate = str(tmp_path / "gate")
    args = ["--config.stages=('pretrain',)", "--config.pretrain.steps=30"]
    first = _train(tmp_path / "first", *args, prelude=f"GATE = {gate!r}\n{PAUSE_AFTER_STEP_1}")
    _wait_for(gate + ".waiting", first)  # the first run holds the workdir, paused after step 1
    second = _train(tmp_path / "first", *args)
    out, _ = second.communicate(timeout=300)
    assert second.returncode != 0
    error_lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert error_lines and f"is in use by another run (pid {first.pid})" in error_lines[-1], out
    open(gate, "w").close()
    out, _ = first.communicate(timeout=600)
    assert first.returncode == 0, out
    steps = [json.loads(line)["step"] for line in open(tmp_path / "first" / "pretrain" / "metrics.jsonl")
             if "ce" in json.loads(line)]
    assert steps == list(range(1, 31))  # intact: every step once, none from the refused run
    first_losses = _metrics(tmp_path / "first" / "pretrain" / "metrics.jsonl")

    warm = _train(tmp_path / "warm", "--config.stages=('pretrain',)", "--config.pretrain.steps=2",
                  f"--config.pretrain.init_from={tmp_path / 'first'}")
    out, _ = warm.communicate(timeout=600)
    assert warm.returncode == 0, out
    warm_losses = _metrics(tmp_path / "warm" / "pretrain" / "metrics.jsonl")
    # the warm start begins where the first run ended, far below a fresh model's first loss
    assert warm_losses[1] < first_losses[1] - 0.5, (first_losses, warm_losses)

    other = _train(tmp_path / "other", "--config.stages=('pretrain',)", "--config.model.hidden_size=64",
                   f"--config.pretrain.init_from={tmp_path / 'first'}")
    out, _ = other.communicate(timeout=600)
    assert other.returncode != 0
    error_lines = [line for line in out.splitlines() if line.startswith("error:")]
    assert error_lines and "holds a different model" in error_lines[-1], out


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    # warmup from 0 keeps step 1 finite (and checkpointed); the huge learning rate then diverges
    proc = _train(tmp_path, "--config.stages=('pretrain',)", "--config.pretrain.steps=12", "--config.checkpoint_every=1",
                  "--config.pretrain.learning_rate=1e4", "--config.grad_clip=1e6")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0
    error = [line for line in out.splitlines() if line.startswith("error:")]
    assert error and ("became nan" in error[-1].lower() or "non-finite" in error[-1] or "became inf" in error[-1]), out
    match = re.search(r"last good checkpoint \(step (\d+)\)", error[-1])
    assert match, error[-1]
    saved = [name for name in os.listdir(tmp_path / "pretrain" / "checkpoints") if name.isdigit()]
    assert match.group(1) in saved, "the checkpoint written before the loss diverged is gone"


def test_hf_adapt_config_runs_on_a_tiny_hf_checkpoint(tmp_path):
    from hf_fixtures import build_tiny_hf_model

    folder = str(tmp_path / "qwen2")
    build_tiny_hf_model("qwen2", folder)
    shakespeare = os.path.join(ROOT, "tests", "data", "tinyshakespeare_head.txt")
    cmd = [sys.executable, os.path.join(ROOT, "train.py"), "--config", os.path.join(ROOT, "configs/hf_adapt.py"),
           "--workdir", str(tmp_path / "run"), f"--config.model.checkpoint={folder}", f"--config.data.paths=('{shakespeare}',)",
           "--config.model.dtype=float32", "--config.model.param_dtype=float32", "--config.model.value_groups=4",
           "--config.seq_len=32", "--config.batch_size=2", "--config.adapt.steps=3", "--config.adapt.warmup_steps=1",
           "--config.adapt.lora.rank=4", "--config.data.eval_batches=1", "--config.eval_budgets=(0.5,)",
           "--config.mesh.fsdp=1", "--config.mesh.data=-1"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.load(open(tmp_path / "run" / "summary.json"))
    assert {row["budget"] for row in summary["budgets"]} == {0.5}
    assert "3" in os.listdir(tmp_path / "run" / "adapt" / "checkpoints")
