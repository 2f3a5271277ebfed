"""The SGLang backend's step time on a GPU host, against hf, as JSON.

    python -m benchmarks.gpu_sglang --out $OUT/sglang.json [--big]

Timing: the median MeZO step (q=1) of the sglang and hf backends on the same
batch (random-weight Llama of ``benchmarks.common``'s ``tiny`` shape), with the
sglang step split into adapter loads and generate calls, and the load time of
each adapter transport; ``--big`` adds the SmolLM2-135M shape (a second engine).
Correctness on the GPU (losses against hf, choices, prefix caching, stale
versions, a MeZO run) is tests/test_sglang_backend.py's: ``pytest -m gpu``
(``python -m benchmarks gpu sglang`` runs both). Every section is recorded even
when another fails; the JSON is rewritten after each one.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from mezo_core import Example
from mezo_core.mezo import direction_seeds, mezo_step
from mezo_core.stats import stats_of

from .common import SHAPES, build_random_model, workload


def make_config(model_dir, device="cuda", dtype="bfloat16", r=8, sglang=None):
    from mezo_core.config import load_config
    cfg = load_config(None, [f"model.path={model_dir}", f"model.device={device}", f"model.dtype={dtype}",
                             f"lora.r={r}", f"lora.alpha={2 * r}"])
    cfg.sglang.update(sglang or {})
    return cfg


def examples(n, prompt_len, target_len, vocab, seed=0, shared_prefix=()):
    """``n`` random rows (``common.workload``), optionally behind a shared prefix."""
    rows = workload(n, prompt_len + target_len, vocab, seed=seed)
    return [Example(tuple(shared_prefix) + e.prompt_ids[:prompt_len], (e.prompt_ids + e.target_ids)[prompt_len:])
            for e in rows]


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__,
           "command": " ".join(["python", "-m", "benchmarks.gpu_sglang"] + sys.argv[1:]),
           "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    for mod in ("sglang", "transformers", "peft", "triton", "flashinfer"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            out[mod] = f"unavailable: {type(exc).__name__}"
    if torch.cuda.is_available():
        out["device"] = torch.cuda.get_device_name()
        out["cuda"] = torch.version.cuda
    return out


class Report:
    def __init__(self, path):
        self.path, self.data = path, {"benchmark": "sglang backend checks and step time",
                                      **versions(), "sections": {}}

    def section(self, name, fn, *args):
        t0 = time.perf_counter()
        print(f"== {name}", flush=True)
        try:
            result = fn(*args)
            entry = {"ok": True, **(result or {})}
        except Exception as exc:  # noqa: BLE001 - record and go on
            traceback.print_exc()
            entry = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc()[-3000:]}
        entry["seconds"] = round(time.perf_counter() - t0, 2)
        self.data["sections"][name] = entry
        print(json.dumps({k: v for k, v in entry.items() if k != "traceback"}, default=str)[:2000],
              flush=True)
        self.write()
        return entry

    def write(self):
        if self.path:
            Path(self.path).write_text(json.dumps(self.data, indent=1, default=float) + "\n")


def sync():
    torch.cuda.synchronize()


def timed_steps(backend, batch, steps, warmup=2, seed=100):
    times = []
    for i in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        mezo_step(backend, batch, direction_seeds(seed, i, 1), eps=1e-3, lr=1e-6)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times), times


# -- sections -------------------------------------------------------------------------
def start_engine(model_dir, eviction):
    from mezo_backend_sglang.backend import SGLangBackend
    opts = {"mem_fraction_static": 0.3, "eviction_policy": eviction}
    t0 = time.perf_counter()
    sg = SGLangBackend(make_config(model_dir, sglang=opts))
    info = {}
    try:
        server = sg.engine.get_server_info()
        info = {k: server.get(k) for k in ("radix_eviction_policy", "attention_backend", "dtype",
                                            "max_loras_per_batch", "lora_backend", "mem_fraction_static")}
    except Exception as exc:  # noqa: BLE001
        info = {"server_info_error": str(exc)}
    return sg, {"engine_start_s": time.perf_counter() - t0, "eviction_policy": eviction, **info}


def step_time(sg, hf16, batch, label, steps):
    sg.reset_stats()
    t_sg, all_sg = timed_steps(sg, batch, steps)
    st = stats_of(sg)
    n = steps + 2
    t_hf, all_hf = timed_steps(hf16, batch, steps)
    tokens = sum(e.num_tokens for e in batch)
    return {"workload": label, "batch": len(batch), "tokens_per_step_forward": tokens,
            "sglang_step_ms": 1e3 * t_sg, "hf_bf16_step_ms": 1e3 * t_hf,
            "sglang_over_hf": t_sg / t_hf,
            "sglang_adapter_load_ms_per_step": 1e3 * st["adapter_load_s"] / n,
            "sglang_generate_ms_per_step": 1e3 * st["generate_s"] / n,
            "sglang_adapter_loads_per_step": st["adapter_loads"] / n,
            "sglang_token_reuse": st["token_reuse"],
            "sglang_generate_calls_per_step": st["generate_calls"] / n,
            "sglang_step_times_ms": [round(1e3 * t, 2) for t in all_sg],
            "hf_step_times_ms": [round(1e3 * t, 2) for t in all_hf]}


def transports(sg, repeats=5):
    """Seconds to load one adapter version (and unload the last), per transport."""
    out, keep, applied = {}, sg.transport, []
    try:
        for transport in ("bucket", "tensors", "disk"):
            sg.transport = transport
            times = []
            for i in range(repeats + 1):
                sg.perturb([(900 + i, 1e-4)])
                applied.append((900 + i, -1e-4))
                t0 = time.perf_counter()
                sg.adapter_name  # loads the new version
                times.append(time.perf_counter() - t0)
            out[f"{transport}_load_ms"] = 1e3 * statistics.median(times[1:])
    finally:
        sg.transport = keep
        sg.perturb(applied)
    out["tensors"] = len(sg.trainable_names())
    out["adapter_mib_fp32"] = sum(t.numel() for t in sg.trainable_tensors()) * 4 / 2**20
    return out


def timings(sg, hf16, vocab, steps):
    out = {"adapter_transport": transports(sg)}
    out["plain_B16_T128"] = step_time(sg, hf16, examples(16, 120, 8, vocab=vocab, seed=20), "plain", steps)
    prefix = tuple(examples(1, 112, 1, vocab=vocab, seed=21)[0].prompt_ids)
    shared = examples(16, 8, 8, vocab=vocab, seed=22, shared_prefix=prefix)
    keep = sg.prime_min_tokens
    try:
        sg.prime_min_tokens = 32
        out["shared_prefix112_B16_T128_primed"] = step_time(sg, hf16, shared, "shared prefix, primed",
                                                            steps)
        sg.prime_min_tokens = 0
        out["shared_prefix112_B16_T128_one_call"] = step_time(sg, hf16, shared, "shared prefix, one call",
                                                              steps)
    finally:
        sg.prime_min_tokens = keep
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--big", action="store_true", help="also time the SmolLM2-135M shape")
    p.add_argument("--big-only", action="store_true", help="only time the SmolLM2-135M shape")
    p.add_argument("--eviction", default="fifo")
    args = p.parse_args(argv)
    from mezo_backend_hf.backend import HFBackend

    rep = Report(args.out)
    tmp = tempfile.mkdtemp(prefix="gpu-sglang-")
    rep.data["model"] = {"shape": "tiny", **SHAPES["tiny"], "lora": "r=8 alpha=16 q_proj,v_proj",
                         "dtype": "bfloat16"}
    if args.big_only:
        args.big = True
        return finish(rep, args, tmp)
    model_dir = build_random_model("tiny", Path(tmp) / "tiny")
    holder = {}

    def engine():
        try:
            holder["sg"], info = start_engine(model_dir, args.eviction)
        except Exception as exc:  # noqa: BLE001 - fall back to the default policy
            print(f"engine with eviction={args.eviction} failed: {exc}; retrying with lru", flush=True)
            holder["sg"], info = start_engine(model_dir, "lru")
            info["first_try_error"] = f"{type(exc).__name__}: {exc}"[:1000]
        return info

    if not rep.section("engine_start", engine)["ok"]:
        return 1
    sg = holder["sg"]
    hf16 = HFBackend(make_config(model_dir))
    rep.section("step_time_small", timings, sg, hf16, SHAPES["tiny"]["vocab_size"], args.steps)
    rep.data["final_stats"] = stats_of(sg)
    sg.close()
    hf16.close()
    del sg, hf16
    torch.cuda.empty_cache()
    rep.write()
    return finish(rep, args, tmp)


def finish(rep, args, tmp):
    from mezo_backend_hf.backend import HFBackend
    if args.big:
        def big():
            from mezo_backend_sglang.backend import SGLangBackend
            d = build_random_model("smollm2-135m", Path(tmp) / "smollm2-135m")
            t0 = time.perf_counter()
            sgb = SGLangBackend(make_config(d, r=16, sglang={"mem_fraction_static": 0.3}))
            start_s = time.perf_counter() - t0
            hfb = HFBackend(make_config(d, r=16))
            try:
                out = timings(sgb, hfb, SHAPES["smollm2-135m"]["vocab_size"], args.steps)
            finally:
                sgb.close()
                hfb.close()
            return {"shape": "smollm2-135m (hidden 576, 30 layers, vocab 49152), bf16, lora r=16 q,v",
                    "engine_start_s": start_s, **out}
        rep.section("step_time_135m_shape", big)
    ok = all(s["ok"] for s in rep.data["sections"].values())
    rep.data["all_ok"] = ok
    rep.write()
    print(json.dumps({k: (v.get("ok"), v.get("error")) for k, v in rep.data["sections"].items()}))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
