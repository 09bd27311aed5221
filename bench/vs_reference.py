"""Ours against the references, side by side on the same weights: transformers' forward and kvpress's press.

A tiny-but-not-trivial Qwen2 (random weights, built locally with transformers from a config and saved
with save_pretrained into bench/.cache; nothing is downloaded) is loaded by both sides:

  (a) forward pass: subtoken_jax.load_pretrained + a jitted DecoderLM.apply against transformers'
      torch CPU forward (inference_mode, use_cache=False, default "sdpa" attention) at a few
      (batch, seq) shapes: max |logit difference| and median time ours / transformers;
  (b) expected-attention compression: our ExpectedAttention selector against kvpress's
      ExpectedAttentionPress on the same context, with our settings matched to the press
      (n_future = n_future_positions, the query statistics over every context query after the sinks,
      epsilon, covariance and value norms on): per-layer Spearman correlation of the token scores per
      (batch row, KV head), overlap of the kept token sets at compression ratios 0.25 / 0.5 / 0.75,
      and the time of the compression step (and of prefill + compression).

kvpress 0.5.5 pins transformers<5.3, so it usually lives in its own venv (see bench/requirements.txt):
the kvpress side then runs in a worker process of that venv's Python, driven over a pipe so that the
timed repeats still interleave with ours. Both sides use the same number of CPU threads (all usable
cores: XLA's CPU pool size), and torch runs with OMP_WAIT_POLICY=PASSIVE: on a shared, oversubscribed
CPU its spinning OpenMP threads are otherwise several times slower (1.1 s instead of 0.1 s at 1x64).

    python bench/vs_reference.py [--out bench/results/vs_reference.json] [--quick]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The reference model: Qwen2 shapes of a small real checkpoint's family (head_dim 64, GQA 4:1, q/k/v
# biases, tied embeddings), 4 layers. initializer_range 0.05 (HF default 0.02) and random biases / norm
# scales make attention clearly non-uniform, so score rankings are not decided by rounding noise.
MODEL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=True, initializer_range=0.05,
             rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1)
RATIOS = (0.25, 0.5, 0.75)


def quiet_transformers():
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def log(*args):
    print(*args, file=sys.stderr, flush=True)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2])


def cpu_threads():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


# ============================================================================ the kvpress worker
# Runs in the Python that has kvpress (maybe another venv): imports torch / transformers / kvpress only.
# Protocol: one JSON request per line on stdin, one JSON reply per line on the original stdout.


class KVPressWorker:
    def __init__(self, folder, threads):
        import torch
        import transformers

        torch.set_num_threads(threads)
        quiet_transformers()
        self.torch = torch
        self.model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.layers = self.model.model.layers
        for layer in self.layers:  # what the press's context manager does before hooking the layers
            layer.self_attn.rotary_emb = self.model.model.rotary_emb
        self.captured = None

    def versions(self):
        import importlib.metadata as md

        import kvpress  # noqa: F401  (fails here, with its own message, if kvpress cannot import)
        return {"torch": md.version("torch"), "transformers": md.version("transformers"),
                "kvpress": md.version("kvpress"),
                "kvpress_requires": [r for r in (md.requires("kvpress") or []) if "extra" not in r],
                "python": sys.executable, "torch_threads": self.torch.get_num_threads(),
                "attn_implementation": self.model.config._attn_implementation}

    def press(self, settings, ratio=0.5):
        from kvpress import ExpectedAttentionPress

        return ExpectedAttentionPress(compression_ratio=ratio, n_future_positions=settings["n_future"],
                                      n_sink=settings["n_sink"], use_covariance=settings["use_covariance"],
                                      use_vnorm=settings["use_vnorm"], epsilon=settings["epsilon"])

    def prefill(self, ids):
        """Prefill without compression; captures each attention layer's input and its cached keys / values."""
        from transformers import DynamicCache

        from kvpress.utils import extract_keys_and_values

        torch = self.torch
        hidden = {}
        hooks = [layer.self_attn.register_forward_pre_hook(
            lambda module, args, kwargs, i=i: hidden.__setitem__(i, kwargs["hidden_states"]), with_kwargs=True)
            for i, layer in enumerate(self.layers)]
        try:
            with torch.inference_mode():
                cache = DynamicCache(config=self.model.config)
                logits = self.model(input_ids=ids, past_key_values=cache, use_cache=True).logits
        finally:
            for hook in hooks:
                hook.remove()
        kv = [extract_keys_and_values(cache, i) for i in range(len(self.layers))]
        self.captured = [(hidden[i], k, v) for i, (k, v) in enumerate(kv)]
        return logits

    def compress_all(self, press):
        """kvpress's compression step on every layer: score, top-k, gather (what the press's hook runs)."""
        with self.torch.inference_mode():
            return [press.compress(layer.self_attn, h, k, v, None, {})
                    for layer, (h, k, v) in zip(self.layers, self.captured)]

    def handle(self, req):
        import numpy as np
        import torch

        op = req["op"]
        if op == "setup":
            self.ids = torch.tensor(np.load(req["ids_path"]), dtype=torch.long)
            logits = self.prefill(self.ids)
            np.save(req["logits_path"], logits.float().numpy())
            return {"versions": self.versions()}
        if op == "scores":
            from kvpress.utils import compute_n_kept

            press = self.press(req["settings"])
            out = {}
            with torch.inference_mode():
                for i, (layer, (h, k, v)) in enumerate(zip(self.layers, self.captured)):
                    scores = press.score(layer.self_attn, h, k, v, None, {})  # [B, Hkv, S]
                    out[f"scores_{i}"] = scores.float().numpy()
                    for r in req["ratios"]:  # ScorerPress.compress keeps scores.topk(compute_n_kept(S, r))
                        n_kept = compute_n_kept(k.shape[2], r)
                        out[f"kept_{i}_{r}"] = scores.topk(n_kept, dim=-1).indices.numpy()
            np.savez(req["out_path"], **out)
            return {"ok": True}
        if op == "time":
            press = self.press(req["settings"], req["ratio"])
            start = time.perf_counter()
            if req["what"] == "compress":
                self.compress_all(press)
            elif req["what"] == "prefill_compress":
                from transformers import DynamicCache

                with torch.inference_mode(), press(self.model):
                    self.model(input_ids=self.ids, past_key_values=DynamicCache(config=self.model.config),
                               use_cache=True)
            else:
                raise ValueError(req["what"])
            return {"seconds": time.perf_counter() - start}
        raise ValueError(f"unknown op {op!r}")


def worker_main(folder, threads):
    reply_to = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout = sys.stderr  # library chatter must not corrupt the reply stream
    try:
        worker = KVPressWorker(folder, threads)
    except Exception as exc:  # noqa: BLE001  report why, the driver goes on without kvpress
        reply_to.write(json.dumps({"error": f"{type(exc).__name__}: {exc}"}) + "\n")
        reply_to.flush()
        return
    reply_to.write(json.dumps({"ready": True}) + "\n")
    reply_to.flush()
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            break
        try:
            reply = worker.handle(req)
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        reply_to.write(json.dumps(reply) + "\n")
        reply_to.flush()


class WorkerClient:
    def __init__(self, python, folder, threads):
        self.proc = subprocess.Popen([python, os.path.abspath(__file__), "--kvpress-worker", "--model-dir", folder,
                                      "--threads", str(threads)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        first = self._read()
        if "error" in first:
            self.close()
            raise RuntimeError(first["error"])

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"kvpress worker exited (rc {self.proc.poll()}); see its stderr above")
        return json.loads(line)

    def __call__(self, **req):
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        reply = self._read()
        if "error" in reply:
            raise RuntimeError(f"kvpress worker: {reply['error']}")
        return reply

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)


def find_kvpress_python(requested):
    """(python, None) for an interpreter that imports kvpress, or (None, why not)."""
    candidates = [requested] if requested else [sys.executable, os.path.join(ROOT, ".venv-bench", "bin", "python")]
    reasons = []
    for python in candidates:
        if not os.path.exists(python):
            reasons.append(f"{python}: not found")
            continue
        probe = subprocess.run([python, "-c", "import kvpress"], capture_output=True, text=True, cwd=ROOT)
        if probe.returncode == 0:
            return python, None
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        reasons.append(f"{python}: import kvpress failed: {last}")
    return None, "; ".join(reasons)


# ============================================================================ the shared model


def build_model(cache_dir, seed=0):
    """Saves the random Qwen2 once per config (bench/.cache/qwen2-<hash>) and returns the folder."""
    spec = json.dumps({"model": MODEL, "seed": seed}, sort_keys=True)
    folder = os.path.join(cache_dir, "qwen2-" + hashlib.sha1(spec.encode()).hexdigest()[:10])
    if os.path.exists(os.path.join(folder, "model.safetensors")):
        return folder
    import torch
    import transformers

    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**MODEL)).eval()
    with torch.no_grad():  # random biases and norm scales, as a trained model has
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn_like(p) * 0.5)
            elif "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir)
    model.save_pretrained(tmp, safe_serialization=True)
    os.replace(tmp, folder)
    return folder


def random_ids(batch, seq, seed):
    import numpy as np

    return np.random.default_rng(seed).integers(2, MODEL["vocab_size"], size=(batch, seq), dtype=np.int64)


# ============================================================================ (a) forward pass


def bench_forward(folder, shapes, warmup, repeats):
    import jax
    import numpy as np
    import torch
    import transformers

    import subtoken_jax

    model, params, _ = subtoken_jax.load_pretrained(folder, with_tokenizer=False)
    forward = jax.jit(lambda p, ids: model.apply({"params": p}, ids))
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    rows = []
    for batch, seq in shapes:
        ids = random_ids(batch, seq, seed=batch * 100_003 + seq)
        ids_jax, ids_torch = jax.numpy.asarray(ids, jax.numpy.int32), torch.tensor(ids)

        def ours():
            return jax.block_until_ready(forward(params, ids_jax))

        def theirs():
            with torch.inference_mode():
                return reference(input_ids=ids_torch, use_cache=False).logits

        times = {"ours": [], "transformers": []}
        for _ in range(warmup):
            ours(), theirs()
        for r in range(repeats):  # interleaved, alternating which goes first
            for name in (("ours", "transformers") if r % 2 == 0 else ("transformers", "ours")):
                fn = ours if name == "ours" else theirs
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
        a, b = np.asarray(ours()), theirs().numpy()
        row = {"batch": batch, "seq": seq, "max_abs_logit_diff": float(np.max(np.abs(a - b))),
               "max_abs_logit": float(np.max(np.abs(b))), "ours_ms": 1e3 * median(times["ours"]),
               "transformers_ms": 1e3 * median(times["transformers"]), "repeats": repeats}
        row["ratio_ours_over_transformers"] = row["ours_ms"] / row["transformers_ms"]
        rows.append(row)
        log(f"forward {batch}x{seq}: ours {row['ours_ms']:.1f} ms, transformers {row['transformers_ms']:.1f} ms, "
            f"max |dlogit| {row['max_abs_logit_diff']:.2e}")
    return rows


# ============================================================================ (b) expected attention


def compare_scores(ours_scores, ours_masks, theirs, n_layers, n_sink, ratios, ours_sinks_excluded=None):
    """Per layer: Spearman of scores over the non-sink tokens per (row, KV head); kept-set overlaps.

    ours_sinks_excluded: our scores with the sinks left out of the softmax as kvpress does (a diagnostic).
    """
    import numpy as np
    from scipy.stats import spearmanr

    layers = []
    for i in range(n_layers):
        mine = np.transpose(np.asarray(ours_scores[i]), (0, 2, 1))  # [B, Hkv, S]
        ref = theirs[f"scores_{i}"]
        rhos = [spearmanr(mine[b, h, n_sink:], ref[b, h, n_sink:]).statistic
                for b in range(mine.shape[0]) for h in range(mine.shape[1])]
        rel = np.max(np.abs(mine[..., n_sink:] - ref[..., n_sink:])) / np.max(np.abs(ref[..., n_sink:]))
        layer = {"layer": i, "spearman_mean": float(np.mean(rhos)), "spearman_min": float(np.min(rhos)),
                 "max_rel_score_diff": float(rel), "overlap": {}}
        if ours_sinks_excluded is not None:
            alt = np.transpose(np.asarray(ours_sinks_excluded[i]), (0, 2, 1))[..., n_sink:]
            layer["max_rel_score_diff_sinks_excluded"] = float(np.max(np.abs(alt - ref[..., n_sink:]))
                                                               / np.max(np.abs(ref[..., n_sink:])))
        for r in ratios:
            keep = np.transpose(np.asarray(ours_masks[r][i]), (0, 2, 1)) > 0  # [B, Hkv, S]
            kept = theirs[f"kept_{i}_{r}"]  # [B, Hkv, n_kept]
            overlaps = [np.sum(keep[b, h][kept[b, h]]) / kept.shape[-1]  # |ours & kvpress| / |kvpress|
                        for b in range(kept.shape[0]) for h in range(kept.shape[1])]
            sizes = sorted({int(keep[b, h].sum()) for b in range(kept.shape[0]) for h in range(kept.shape[1])})
            layer["overlap"][str(r)] = {"mean": float(np.mean(overlaps)), "min": float(np.min(overlaps)),
                                        "ours_kept": sizes, "kvpress_kept": int(kept.shape[-1])}
        layers.append(layer)
    return layers


def bench_press(folder, python, threads, batch, seq, settings_list, warmup, repeats, scratch):
    import jax
    import numpy as np

    import subtoken_jax
    from subtoken_jax.selectors import ExpectedAttention, capture_prefill_state

    model, params, _ = subtoken_jax.load_pretrained(folder, with_tokenizer=False)
    ids = random_ids(batch, seq, seed=7)
    np.save(os.path.join(scratch, "ids.npy"), ids)
    worker = WorkerClient(python, folder, threads)
    try:
        setup = worker(op="setup", ids_path=os.path.join(scratch, "ids.npy"),
                       logits_path=os.path.join(scratch, "logits.npy"))
        ours_logits = np.asarray(model.apply({"params": params}, jax.numpy.asarray(ids, jax.numpy.int32)))
        result = {"batch": batch, "seq": seq, "worker": setup["versions"],
                  "worker_max_abs_logit_diff": float(np.max(np.abs(ours_logits - np.load(
                      os.path.join(scratch, "logits.npy"))))), "settings": []}
        for settings in settings_list:
            n_sink = settings["n_sink"]
            selector = ExpectedAttention(n_future=settings["n_future"], use_covariance=settings["use_covariance"],
                                         use_vnorm=settings["use_vnorm"], epsilon=settings["epsilon"], n_sink=n_sink)
            # kvpress estimates the query statistics from every context query after the sinks
            window = seq - n_sink
            state = capture_prefill_state(model, params, ids, window=window)
            scores = [selector.scores(state, i) for i in range(state.num_layers)]
            masks = {r: selector.masks(state, 1.0 - r) for r in RATIOS}
            path = os.path.join(scratch, f"kvpress_sink{n_sink}.npz")
            worker(op="scores", settings=settings, ratios=list(RATIOS), out_path=path)
            theirs = dict(np.load(path))
            excluded = None
            if n_sink:  # our definition normalises over every context key; kvpress's over the non-sink ones
                sinks_out = state.replace(positions=jax.numpy.where(jax.numpy.arange(seq) < n_sink, -1,
                                                                    state.positions))
                excluded = [selector.scores(sinks_out, i) for i in range(state.num_layers)]
            layers = compare_scores(scores, masks, theirs, state.num_layers, n_sink, RATIOS, excluded)

            ratio = 0.5
            masks_jit = jax.jit(lambda st: selector.masks(st, 1.0 - ratio))

            def ours_compress():
                return jax.block_until_ready(selector.masks(state, 1.0 - ratio))

            def ours_compress_jit():
                return jax.block_until_ready(masks_jit(state))

            def ours_prefill_compress():
                st = capture_prefill_state(model, params, ids, window=window)
                return jax.block_until_ready(selector.masks(st, 1.0 - ratio))

            def clock(fn):
                start = time.perf_counter()
                fn()
                return time.perf_counter() - start

            def kvpress(what):  # the worker times itself, so the pipe round trip is left out
                return lambda: worker(op="time", what=what, settings=settings, ratio=ratio)["seconds"]

            timed = {
                "compress: ours (selector.masks)": lambda: clock(ours_compress),
                "compress: ours (one jit)": lambda: clock(ours_compress_jit),
                "compress: kvpress (press.compress per layer)": kvpress("compress"),
                "prefill + compress: ours (capture_prefill_state + masks)": lambda: clock(ours_prefill_compress),
                "prefill + compress: kvpress (with press(model): model(...))": kvpress("prefill_compress"),
            }
            errors = {}
            for _ in range(max(warmup, 1)):
                for name, fn in list(timed.items()):
                    try:
                        fn()
                    except RuntimeError as exc:  # e.g. the press's hook on a transformers it does not support
                        errors[name] = str(exc)
                        del timed[name]
                        log(f"{name}: {exc}")
            times = {name: [] for name in timed}
            names = list(timed)
            for r in range(repeats):
                for name in (names if r % 2 == 0 else names[::-1]):
                    times[name].append(timed[name]())
            result["settings"].append({"settings": settings, "window": window, "layers": layers,
                                       "timing_ratio": ratio,
                                       "times_ms": {k: 1e3 * median(v) for k, v in times.items()},
                                       "timing_errors": errors})
            log(f"press n_sink={n_sink}: spearman mean "
                f"{np.mean([l['spearman_mean'] for l in layers]):.4f}, overlap@0.5 "
                f"{np.mean([l['overlap']['0.5']['mean'] for l in layers]):.4f}; "
                + ", ".join(f"{k} {1e3 * median(v):.1f} ms" for k, v in times.items()))
        return result
    finally:
        worker.close()


# ============================================================================ report


def machine_info(threads):
    import importlib.metadata as md

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    import jax

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "cpu_count": os.cpu_count(), "cpu_affinity": cpu_threads(),
            "threads": threads, "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax_backend": jax.default_backend(),
            "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "load_average_1_5_15": list(os.getloadavg()),
            "versions": {name: version(name) for name in ("jax", "jaxlib", "flax", "torch", "transformers",
                                                         "kvpress", "numpy", "scipy")}}


def markdown(result):
    m = result["machine"]
    lines = [f"Machine: {m['platform']}, {m['cpu_affinity']} usable cores, {m['threads']} threads each side, "
             f"OMP_WAIT_POLICY={m['omp_wait_policy']}, load average {m['load_average_1_5_15'][0]:.1f} at start / "
             f"{m['load_average_at_end'][0]:.1f} at end; jax {result['machine']['versions']['jax']}, torch "
             f"{result['machine']['versions']['torch']}, transformers {result['machine']['versions']['transformers']}",
             "", "(a) forward pass, float32 logits, median of interleaved repeats", "",
             "| batch x seq | ours (jit) ms | transformers ms | ours / transformers | max abs logit diff |",
             "|---|---|---|---|---|"]
    for r in result.get("forward", []):
        lines.append(f"| {r['batch']}x{r['seq']} | {r['ours_ms']:.1f} | {r['transformers_ms']:.1f} | "
                     f"{r['ratio_ours_over_transformers']:.2f} | {r['max_abs_logit_diff']:.1e} "
                     f"(max abs logit {r['max_abs_logit']:.1f}) |")
    press = result.get("press")
    lines.append("")
    if not press or "unavailable" in press:
        lines.append(f"(b) kvpress comparison not run: {press['unavailable'] if press else 'skipped'}")
        return "\n".join(lines)
    w = press["worker"]
    lines += [f"(b) ExpectedAttention vs kvpress {w['kvpress']} ExpectedAttentionPress (torch {w['torch']}, "
              f"transformers {w['transformers']}, {w['torch_threads']} threads), batch {press['batch']} x "
              f"{press['seq']} context tokens; the kvpress venv's logits differ from ours by at most "
              f"{press['worker_max_abs_logit_diff']:.1e}", ""]
    for s in press["settings"]:
        cfg = s["settings"]
        lines += [f"n_sink={cfg['n_sink']}, n_future={cfg['n_future']}, covariance={cfg['use_covariance']}, "
                  f"vnorm={cfg['use_vnorm']}, epsilon={cfg['epsilon']}; ours: window={s['window']} queries", "",
                  "| layer | Spearman mean / min | max rel score diff (sinks out of our softmax) | " + " | ".join(
                      f"kept overlap @ ratio {r} mean / min" for r in RATIOS) + " |",
                  "|---|---|---|" + "---|" * len(RATIOS)]
        for layer in s["layers"]:
            lines.append(f"| {layer['layer']} | {layer['spearman_mean']:.5f} / {layer['spearman_min']:.5f} | "
                         f"{layer['max_rel_score_diff']:.1e}"
                         + (f" ({layer['max_rel_score_diff_sinks_excluded']:.1e})"
                            if "max_rel_score_diff_sinks_excluded" in layer else "") + " | " + " | ".join(
                             f"{layer['overlap'][str(r)]['mean']:.4f} / {layer['overlap'][str(r)]['min']:.4f}"
                             for r in RATIOS) + " |")
        lines += ["", f"| step (all layers, ratio {s['timing_ratio']}) | median ms |", "|---|---|"]
        lines += [f"| {name} | {ms:.1f} |" for name, ms in s["times_ms"].items()]
        lines += [f"| {name} | failed: {why} |" for name, why in s.get("timing_errors", {}).items()]
        lines.append("")
    return "\n".join(lines)


def parse_shapes(text):
    return [tuple(int(x) for x in item.split("x")) for item in text.split(",") if item]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="bench/results/vs_reference.json")
    parser.add_argument("--model-dir", default=None, help="an existing HF folder (default: build bench/.cache/...)")
    parser.add_argument("--cache-dir", default=os.path.join(ROOT, "bench", ".cache"))
    parser.add_argument("--shapes", default="1x128,4x128,1x512,4x512,1x1024", help="forward (batch x seq) shapes")
    parser.add_argument("--press-batch", type=int, default=1)
    parser.add_argument("--press-seq", type=int, default=1024)
    parser.add_argument("--n-future", type=int, default=512, help="kvpress's default n_future_positions")
    parser.add_argument("--n-sinks", default="0,4", help="n_sink settings to compare (kvpress default 4)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for both (default: all usable)")
    parser.add_argument("--omp-wait-policy", default="PASSIVE",
                        help="OMP_WAIT_POLICY for torch (PASSIVE: on a shared, oversubscribed CPU torch's spinning "
                             "OpenMP threads are otherwise several times slower); '' leaves it unset")
    parser.add_argument("--kvpress-python", default=None,
                        help="a Python with kvpress (default: this one, else .venv-bench/bin/python)")
    parser.add_argument("--skip-forward", action="store_true")
    parser.add_argument("--skip-press", action="store_true")
    parser.add_argument("--quick", action="store_true", help="small shapes, 3 repeats: checks the script runs")
    parser.add_argument("--kvpress-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    threads = args.threads or cpu_threads()

    if args.kvpress_worker:
        return worker_main(args.model_dir, threads)
    if threads == 1:  # XLA's CPU client otherwise uses one thread per core
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                   " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1").strip()
    elif threads != cpu_threads():
        log(f"warning: XLA uses {cpu_threads()} threads; only torch follows --threads={threads}")
    if args.omp_wait_policy:  # before torch is imported; the kvpress worker inherits it
        os.environ["OMP_WAIT_POLICY"] = args.omp_wait_policy
    if args.quick:
        args.shapes, args.press_seq, args.repeats, args.warmup = "1x64,2x128", 256, 3, 1
    sys.path.insert(0, ROOT)
    import torch

    torch.set_num_threads(threads)
    quiet_transformers()
    started = time.time()
    folder = args.model_dir or build_model(args.cache_dir)
    result = {"model": {"folder": os.path.relpath(folder, ROOT), "config": MODEL,
                        "weights": "random (torch.manual_seed(0)), biases N(0, 0.5^2), norm scales 1 + N(0, 0.1^2)"},
              "machine": machine_info(threads),
              "notes": ["float32 on both sides; transformers forward under torch.inference_mode, use_cache=False, "
                        "its default attention implementation (sdpa)",
                        f"torch.set_num_threads({threads}); XLA's CPU pool uses the {cpu_threads()} usable cores"
                        + (" (and one thread, via XLA_FLAGS)" if threads == 1 else ""),
                        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')} for torch (kvpress worker too)",
                        "timings: warm-up calls, then interleaved repeats (order alternating), median"]}
    if not args.skip_forward:
        result["forward"] = bench_forward(folder, parse_shapes(args.shapes), args.warmup, args.repeats)
    if not args.skip_press:
        python, why = find_kvpress_python(args.kvpress_python)
        if python is None:
            result["press"] = {"unavailable": why + " (install: python3 -m venv .venv-bench && "
                                                    ".venv-bench/bin/pip install -r bench/requirements.txt)"}
            log(f"kvpress comparison skipped: {why}")
        else:
            settings_list = [dict(n_future=args.n_future, n_sink=int(n), use_covariance=True, use_vnorm=True,
                                  epsilon=0.0) for n in args.n_sinks.split(",")]
            with tempfile.TemporaryDirectory() as scratch:
                try:
                    result["press"] = bench_press(folder, python, threads, args.press_batch, args.press_seq,
                                                  settings_list, args.warmup, args.repeats, scratch)
                except RuntimeError as exc:
                    result["press"] = {"unavailable": f"kvpress ({python}) failed: {exc}"}
                    log(result["press"]["unavailable"])
    result["seconds"] = time.time() - started
    result["machine"]["load_average_at_end"] = list(os.getloadavg())
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(markdown(result))


if __name__ == "__main__":
    main()
