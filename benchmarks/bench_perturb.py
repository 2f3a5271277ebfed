"""Full-parameter perturbation cost per MeZO step, side by side in one run, for
both distributions of z (``mezo.z``: gaussian, rademacher).

    python -m benchmarks.bench_perturb --device cuda --shape llama-6.7b --sweep --out benchmarks/results/perturb-6.7b-DATE-GPU.json
        # the GPU measurement (one H200: ~5 min)
    python -m benchmarks.bench_perturb --shape tiny                # CPU smoke check, seconds

Rows (all over the same weight tensors, bf16 on CUDA, timed round-robin):
* reference: MeZO's published loop -- four seeded passes per step (+eps, -2eps,
  +eps, update), each drawing z with torch.normal per tensor;
* bandwidth floor: one in-place multiply of every weight (one read + one write)
  -- the least any pass can cost -- times the passes of a schedule;
* ours, 3 passes: +eps z, -2eps z, restore + update (one term each; Gaussian);
* ours, fused 2 passes, per distribution: -2eps z, then restore + update + next
  step's +eps z (two z per element in one read and write) -- ``mezo.fuse_steps``.
The JSON's ``fused_gaussian_over_floor`` and ``fused_rademacher_over_floor`` are
the fused step over two passes at the measured floor. ``--sweep`` (CUDA) first
times each kernel's launch shapes (and the Gaussian's math mode) and runs the
rows with the fastest. It also checks on the device that each kernel's z equals
the torch path's (the Rademacher z bit for bit).
"""
from __future__ import annotations

import argparse
import statistics

import torch

from benchmarks.common import SHAPES, environment, timed, write_result
from mezo_core.perturb import apply_z, z_like
from mezo_core.philox import ROUNDS


def llama_weight_shapes(shape: str) -> list[tuple[int, ...]]:
    c = SHAPES[shape]
    h, inter, v, n = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["num_hidden_layers"]
    kv = h // c["num_attention_heads"] * c.get("num_key_value_heads", c["num_attention_heads"])
    layer = [(h, h), (kv, h), (kv, h), (h, h), (inter, h), (inter, h), (h, inter), (h,), (h,)]
    return [(v, h)] + layer * n + [(h,), (v, h)]


def reference_pass(tensors, seed, coef):
    """MeZO's reference perturbation (Malladi et al., mezo/large_models/trainer.py)."""
    torch.manual_seed(seed)
    for t in tensors:
        z = torch.normal(mean=0, std=1, size=t.size(), device=t.device, dtype=t.dtype)
        t.data = t.data + coef * z


def kernel_config(device):
    if not device.startswith("cuda"):
        return None
    from mezo_core import perturb_triton
    return dict(perturb_triton.CONFIG)


def tune_kernel(tensors, device, step, dist="gaussian", repeats=3):
    """Time a one-term and a two-term pass for each launch shape (and, for the
    Gaussian, math mode); leave the fastest (by the fused step: one of each) in
    ``perturb_triton.CONFIG``."""
    import itertools
    from mezo_core import perturb_triton
    if dist == "gaussian":
        shapes = [dict(tiles=t, num_warps=w, fast=f) for t, w, f in itertools.product((1, 2, 4, 8), (4, 8),
                                                                                       (True, False))]
    else:
        shapes = [dict(rademacher_tiles=t, rademacher_warps=w) for t, w in itertools.product((1, 2), (2, 4, 8))]
    results = []
    for shape in shapes:
        perturb_triton.CONFIG.update(shape)
        timing = {}
        for label, nterms in (("one_term_ms", 1), ("two_terms_ms", 2)):
            samples = []
            for _ in range(repeats + 1):  # the first compiles
                s = next(step)
                samples.append(1e3 * timed(lambda: apply_z(tensors, [(s + k, 1e-9) for k in range(nterms)],
                                                           dist=dist), device))
            timing[label] = statistics.median(samples[1:])
        results.append({"dist": dist, **shape, **timing})
        print(f"{dist} {shape}: one term {timing['one_term_ms']:7.2f} ms, two terms {timing['two_terms_ms']:7.2f} ms")
    best = min(results, key=lambda r: r["one_term_ms"] + r["two_terms_ms"])
    perturb_triton.CONFIG.update({k: best[k] for k in shapes[0]})
    print("fastest:", best)
    return results


def z_check(device):
    """Each kernel's z against the torch path's on this device, and against the CPU's."""
    out = {}
    for dist in ("gaussian", "rademacher"):
        probe = [torch.zeros(s, device=device) for s in [(4096, 300), (1000,), (5, 7)]]
        kernel_z = [t.clone() for t in probe]
        apply_z(kernel_z, [(123, 1.0)], dist=dist)
        torch_z = [t.clone() for t in probe]
        apply_z(torch_z, [(123, 1.0)], kernel="torch", dist=dist)
        out[f"z_{dist}_kernel_vs_torch_max_abs_diff"] = max(float((a - b).abs().max())
                                                           for a, b in zip(kernel_z, torch_z))
        out[f"z_{dist}_device_vs_cpu_max_abs_diff"] = max(float((a.cpu() - z_like(a.cpu(), 123, i, dist)).abs().max())
                                                         for i, a in enumerate(kernel_z))
    print("z on", device, out)
    return out


FUSED = "ours: fused 2 passes (-2eps; restore+update+next +eps), {}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--shape", default="tiny", choices=list(SHAPES))
    p.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--sweep", action="store_true", help="CUDA: time each kernel's launch shapes (and the "
                   "Gaussian's math) first, then run the rows with the fastest")
    p.add_argument("--out", help="the JSON to write (default: print it)")
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    gen = torch.Generator(device=args.device).manual_seed(0)
    tensors = [torch.randn(s, generator=gen, device=args.device).to(dtype) for s in llama_weight_shapes(args.shape)]
    n_params = sum(t.numel() for t in tensors)
    nbytes = sum(t.numel() * t.element_size() for t in tensors)
    eps, lr = 1e-3, 1e-6

    checks = z_check(args.device)
    step = iter(range(10**9))
    sweep = []
    if args.sweep and args.device.startswith("cuda"):
        sweep = tune_kernel(tensors, args.device, step, "gaussian") + tune_kernel(tensors, args.device, step,
                                                                                 "rademacher")

    def fused(dist):
        return lambda s: [apply_z(tensors, [(s, -2 * eps)], dist=dist),
                          apply_z(tensors, [(s, eps - lr), (s + 1, eps)], dist=dist)]
    rows = {
        "reference: 4 torch.normal passes": lambda s: [reference_pass(tensors, s + k, c)
                                                      for k, c in enumerate((eps, -2 * eps, eps, -lr))],
        "bandwidth floor x 1 pass": lambda s: torch._foreach_mul_(tensors, 1.0),
        "ours: 3 passes (+eps, -2eps, restore+update)": lambda s: [
            apply_z(tensors, [(s, eps)]), apply_z(tensors, [(s, -2 * eps)]),
            apply_z(tensors, [(s, eps - lr)])],
        FUSED.format("gaussian"): fused("gaussian"),
        FUSED.format("rademacher"): fused("rademacher"),
    }
    for fn in rows.values():  # warm-up: kernel compilation, allocator
        fn(next(step))
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, fn in rows.items():
            s = next(step)
            times[name].append(timed(lambda: fn(s), args.device))
    med = {name: 1e3 * statistics.median(t) for name, t in times.items()}
    floor_pass = med["bandwidth floor x 1 pass"]
    table = []
    for name, ms in med.items():
        passes = 4 if name.startswith("reference") else 3 if "3 passes" in name else 2 if "fused" in name else 1
        table.append({"row": name, "ms": ms, "passes": passes, "over_floor_of_4_passes": ms / (4 * floor_pass),
                      "over_floor_of_its_passes": ms / (passes * floor_pass)})
        print(f"{name:66} {ms:9.2f} ms  {ms / (4 * floor_pass):5.2f}x floor(4 passes)  "
              f"{ms / (passes * floor_pass):5.2f}x floor({passes})")
    write_result({"benchmark": "full-parameter perturbation per step", **environment(args.device),
                  "shape": args.shape, "dtype": str(dtype), "params": n_params, "weight_bytes": nbytes,
                  "achieved_bandwidth_gbs_floor_pass": 2 * nbytes / floor_pass / 1e6, "floor_pass_ms": floor_pass,
                  "gaussian_z": f"Philox4x32-{ROUNDS['gaussian']}, each 32-bit word -> two 16-bit uniforms -> "
                                "one Box-Muller pair: 8 elements per Philox evaluation (mezo_core.philox)",
                  "rademacher_z": f"Philox4x32-{ROUNDS['rademacher']}, one bit an element (mezo_core.philox)",
                  "fused_gaussian_over_floor": med[FUSED.format("gaussian")] / (2 * floor_pass),
                  "fused_rademacher_over_floor": med[FUSED.format("rademacher")] / (2 * floor_pass),
                  **checks, "rounds": args.rounds, "rows": table, "kernel_config": kernel_config(args.device),
                  "kernel_sweep": sweep, "raw_ms": {k: [1e3 * x for x in v] for k, v in times.items()}},
                 args.out)


if __name__ == "__main__":
    main()
