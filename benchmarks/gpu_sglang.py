"""The SGLang backend on a GPU host: correctness checks and step times, as JSON.

    python -m benchmarks.gpu_sglang --out $OUT/sglang.json [--big]

Checks (same random Llama and adapter in every engine, see tests/sglang_support.py):
losses against the hf backend on the GPU (fp32 and bf16), single-token choice
scores, cached tokens of shared-prefix batches, the stale-version check (loss
after a change equals a freshly loaded adapter's, computed with no cache reuse),
a short MeZO run. Timing: the median MeZO step (q=1) of the sglang and hf
backends on the same batch, with the sglang step split into adapter loads and
generate calls; ``--big`` adds a SmolLM2-135M-shaped model (a second engine).
Every section is recorded even when another fails; the JSON is rewritten after
each one.
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from sglang_support import build_llama, examples, make_config  # noqa: E402

from mezo_core.mezo import direction_seeds, mezo_step  # noqa: E402


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


def maxdiff(a, b) -> float:
    return float((a - b).abs().max())


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
    sg = SGLangBackend(make_config(model_dir, device="cuda", dtype="bfloat16", sglang=opts))
    info = {}
    try:
        server = sg.engine.get_server_info()
        info = {k: server.get(k) for k in ("radix_eviction_policy", "attention_backend", "dtype",
                                            "max_loras_per_batch", "lora_backend", "mem_fraction_static")}
    except Exception as exc:  # noqa: BLE001
        info = {"server_info_error": str(exc)}
    return sg, {"engine_start_s": time.perf_counter() - t0, "eviction_policy": eviction, **info}


def agreement(sg, hf32, hf16):
    batch = examples(8, 24, 6, seed=11)
    out = {}
    for label, coef in (("initial", 0.0), ("perturbed_0.05", 0.05), ("perturbed_0.5", 0.5)):
        for b in (sg, hf32, hf16):
            b.perturb([(77, coef)])
        ls, l32, l16 = sg.losses(batch), hf32.losses(batch), hf16.losses(batch)
        for b in (sg, hf32, hf16):
            b.perturb([(77, -coef)])
        out[label] = {"sglang": ls.tolist(), "hf_fp32": l32.tolist(), "hf_bf16": l16.tolist(),
                      "max_abs_sglang_vs_hf_fp32": maxdiff(ls, l32),
                      "max_abs_sglang_vs_hf_bf16": maxdiff(ls, l16),
                      "max_abs_hf_bf16_vs_hf_fp32": maxdiff(l16, l32)}
    base = out["initial"]
    for label in ("perturbed_0.05", "perturbed_0.5"):
        d_sg = torch.tensor(out[label]["sglang"]) - torch.tensor(base["sglang"])
        d_hf = torch.tensor(out[label]["hf_fp32"]) - torch.tensor(base["hf_fp32"])
        out[label]["mean_abs_change_hf_fp32"] = float(d_hf.abs().mean())
        out[label]["max_abs_change_diff_sglang_vs_hf_fp32"] = maxdiff(d_sg, d_hf)
    # the driver-side state equals hf's bit for bit (same z on the same device)
    out["state_equal_hf"] = all(torch.equal(a, b.detach().float().to(a.device)) for a, b in
                                zip(sg.trainable_tensors(), hf32.trainable_tensors()))
    return out


def choices_check(sg, hf32):
    from mezo_core import Backend
    prompts = [e.prompt_ids for e in examples(6, 20, 1, seed=13)]
    choices = [(20,), (33,), (250,)]
    sg.perturb([(80, 0.05)])
    hf32.perturb([(80, 0.05)])
    try:
        fast = sg.choice_losses(prompts, choices)
        slow = Backend.choice_losses(sg, prompts, choices)
        ref = hf32.choice_losses(prompts, choices)
    finally:
        sg.perturb([(80, -0.05)])
        hf32.perturb([(80, -0.05)])
    return {"max_abs_fast_vs_generic": maxdiff(fast, slow), "max_abs_fast_vs_hf_fp32": maxdiff(fast, ref)}


def prefix_cache(sg):
    prefix = tuple(examples(1, 200, 1, seed=14)[0].prompt_ids)
    batch = examples(8, 8, 2, seed=15, shared_prefix=prefix)
    sg.losses(batch[:1])  # make sure the adapter is loaded
    keep_prime, sg.prime_min_tokens = sg.prime_min_tokens, 0
    try:
        sg.reset_cache()
        sg.reset_stats()
        plain = sg.losses(batch)
        first = sg.get_stats()
        sg.reset_stats()
        sg.losses(batch)
        second = sg.get_stats()
    finally:
        sg.prime_min_tokens = keep_prime
    sg.prime_min_tokens = 32
    try:
        sg.reset_cache()
        sg.reset_stats()
        primed = sg.losses(batch)
        third = sg.get_stats()
    finally:
        sg.prime_min_tokens = keep_prime
    keep = ("lookups", "hits", "hit_rate", "tokens_reused", "tokens_looked_up", "token_reuse",
            "generate_calls", "primed_batches")
    return {"prefix_tokens": len(prefix), "batch": len(batch), "tokens_per_example": batch[0].num_tokens,
            "one_call_after_flush": {k: first[k] for k in keep},
            "second_call_same_version": {k: second[k] for k in keep},
            "primed_after_flush": {k: third[k] for k in keep},
            "max_abs_primed_vs_one_call": maxdiff(primed, plain)}


def stale(sg, tmp):
    prefix = tuple(examples(1, 150, 1, seed=16)[0].prompt_ids)
    batch = examples(6, 6, 3, seed=17, shared_prefix=prefix)
    before = sg.losses(batch)
    sg.losses(batch)
    v_before = sg.adapter_name
    sg.perturb([(79, 1.0)])
    sg.reset_stats()
    after = sg.losses(batch)
    cached_after = sg.stats().tokens_reused
    v_after = sg.adapter_name
    sg.save_adapter(Path(tmp) / "fresh")
    from mezo_backend_sglang.backend import losses_under_folder
    fresh, outs = losses_under_folder(sg.engine, Path(tmp) / "fresh", batch)
    sg.perturb([(79, -1.0)])
    return {"load_fresh_ok": True, "versions": [v_before, v_after],
            "max_abs_change_from_old": maxdiff(after, before),
            "max_abs_after_vs_fresh": maxdiff(after, fresh),
            "cached_tokens_after_change": cached_after,
            "max_cached_if_only_own_batch": (len(batch) - 1) * (len(prefix) + 6),
            "fresh_cached_tokens": [o["meta_info"]["cached_tokens"] for o in outs]}


def mezo_run(sg, hf16):
    batch = examples(16, 16, 4, seed=18)
    out = {}
    for label, b in (("sglang", sg), ("hf_bf16", hf16)):
        start = [t.clone() for t in b.trainable_tensors()]
        first = float(b.losses(batch).mean())
        curve = []
        for step in range(40):
            r = mezo_step(b, batch, direction_seeds(1, step, 1), eps=1e-2, lr=5e-3)
            curve.append(round(r.loss, 5))
        out[label] = {"first": first, "last": float(b.losses(batch).mean()), "step_losses": curve}
        with torch.no_grad():  # back to the start for the next check
            for t, s in zip(b.trainable_tensors(), start):
                t.copy_(s)
        if hasattr(b, "_dirty"):
            b._dirty = True
    out["lowered"] = out["sglang"]["last"] < out["sglang"]["first"] - 0.05
    return out


def step_time(sg, hf16, batch, label, steps):
    sg.reset_stats()
    t_sg, all_sg = timed_steps(sg, batch, steps)
    st = sg.get_stats()
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
    p.add_argument("--big", action="store_true", help="also time a SmolLM2-135M-shaped model")
    p.add_argument("--big-only", action="store_true", help="only time the SmolLM2-135M-shaped model")
    p.add_argument("--eviction", default="fifo")
    args = p.parse_args(argv)
    from mezo_backend_hf.backend import HFBackend

    rep = Report(args.out)
    tmp = tempfile.mkdtemp(prefix="gpu-sglang-")
    model_dir = build_llama(Path(tmp) / "llama-h256-l2")
    rep.data["model"] = {"hidden": 256, "layers": 2, "heads": 4, "kv_heads": 2, "vocab": 300,
                         "init_std": 0.1, "lora": "r=8 alpha=16 q_proj,v_proj", "sglang_dtype": "bfloat16"}
    holder = {}
    if args.big_only:
        args.big = True
        return finish(rep, args, tmp)

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
    hf32 = HFBackend(make_config(model_dir, device="cuda", dtype="float32"))
    hf16 = HFBackend(make_config(model_dir, device="cuda", dtype="bfloat16"))
    rep.section("agreement_with_hf", agreement, sg, hf32, hf16)
    rep.section("single_token_choices", choices_check, sg, hf32)
    rep.section("shared_prefix_cache", prefix_cache, sg)
    rep.section("stale_version", stale, sg, tmp)
    rep.section("mezo_run", mezo_run, sg, hf16)
    rep.section("step_time_small", timings, sg, hf16, 300, args.steps)
    rep.data["final_stats"] = sg.get_stats()
    sg.close()
    hf32.close()
    hf16.close()
    del sg, hf32, hf16
    torch.cuda.empty_cache()
    rep.write()
    return finish(rep, args, tmp)


def finish(rep, args, tmp):
    from mezo_backend_hf.backend import HFBackend
    if args.big:
        def big():
            from mezo_backend_sglang.backend import SGLangBackend
            d = build_llama(Path(tmp) / "llama-135m-shape", hidden=576, layers=30, heads=9, kv_heads=3,
                            intermediate=1536, vocab=49152, init_std=0.02, dtype=torch.bfloat16)
            t0 = time.perf_counter()
            sgb = SGLangBackend(make_config(d, device="cuda", dtype="bfloat16", r=16,
                                            sglang={"mem_fraction_static": 0.3}))
            start_s = time.perf_counter() - t0
            hfb = HFBackend(make_config(d, device="cuda", dtype="bfloat16", r=16))
            try:
                out = timings(sgb, hfb, 49152, args.steps)
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
