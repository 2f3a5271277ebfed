"""Named suites: the benchmark commands behind each published result, run as one.

    python -m benchmarks list                       # every suite and its commands
    python -m benchmarks run smoke                  # -> benchmarks/results/smoke-cpu-DATE.json
    python -m benchmarks run hf --out-dir $OUT      # a GPU suite, results where you say

Every step is a process of its own (``python -m ...``, a timeout each: a hung
engine cannot stop the rest); a step whose module writes JSON gets ``--out`` and
its result is kept whole. The suite's JSON holds the device, the versions, the
command and, per step, its command, exit code, time, result and the end of its log
(files a harness writes beside its JSON, e.g. a chart, are kept as SUITE-...-NAME).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]      # after ``python -m``
    timeout: int = 600
    out: bool = True           # the module takes --out FILE.json
    out_dir: bool = False      # the module takes --out-dir DIR and names its own JSON there (seed7b)


@dataclass(frozen=True)
class Suite:
    about: str
    device: str                # cpu | cuda | cuda x2 (what the suite needs)
    steps: tuple[Step, ...]
    needs: tuple[str, ...] = field(default=())   # extra site-packages (GPU host): "sglang"


def _hf(name, *options, timeout=200, preset="llama-1.1b"):
    hf = [a for opt in options for a in ("--hf", opt)]
    return Step(name, ("benchmarks.bench_hf", "--device", "cuda", "--preset", preset, *hf), timeout)


def _profile(name, *options, layers="top", extra=()):
    hf = [a for opt in options for a in ("--hf", opt)]
    return Step(name, ("benchmarks.profile_step", "--device", "cuda", "--shape", "llama-1.1b",
                       "--lora-layers", layers, *hf, *extra), 200, out=False)


def _engine_suites(engine):
    """``ENGINE-tests`` (its GPU tests) and ``engines-ENGINE``: its step against two bare
    engine passes, hf rows beside, on the 1.1B shape and the SST-2 demo recipe."""
    rows = ("--rows", f"hf,hf-trunk,{engine}", "--eps-steps", "1")
    return {
        f"{engine}-tests": Suite(f"{engine}'s GPU tests (pytest -m gpu)", "cuda", (
            Step(f"pytest-{engine}", ("pytest", "-p", "no:cacheprovider", "-q", "-rs", "-m", "gpu",
                                      f"tests/test_{engine}_backend.py"), 400, out=False),
        ), needs=(engine,)),
        f"reward-{engine}": Suite(f"a reward step on {engine} against generating as many completions, hf "
                                  "beside (1.1B shape, 64 prompts x 128 new tokens, q=8), then 8 samples a prompt",
                                  "cuda", (
            Step(f"reward-{engine}", ("benchmarks.reward_speed", "--device", "cuda", "--shape", "llama-1.1b",
                                      "--prompts", "64", "--prompt-len", "64", "--shared", "48", "--new", "128",
                                      "--q", "8", "--steps", "2", "--rows", f"{engine},{engine}-pairs,hf-pm"), 420),
            Step(f"reward-{engine}-samples8", ("benchmarks.reward_speed", "--device", "cuda", "--shape",
                                               "llama-1.1b", "--prompts", "16", "--prompt-len", "64", "--shared",
                                               "48", "--new", "32", "--q", "2", "--samples", "8", "--steps", "2",
                                               "--rows", engine), 170),
        ), needs=(engine,)),
        f"engines-{engine}": Suite(f"{engine}'s step against two bare {engine} passes beside hf: the 1.1B "
                                   "shape and the SST-2 demo recipe", "cuda", (
            Step(f"{engine}-1.1b", ("benchmarks.compare", "--device", "cuda", *rows, "--steps", "20"), 290),
            Step(f"{engine}-sst2", ("benchmarks.compare", "--device", "cuda", "--task", "conf/sst2.yaml", *rows,
                                    "--steps", "30", "--batch-pool", "4"), 280),
        ), needs=(engine,)),
    }


def _seed(name, rows, shape="7b", needs=(), about=""):
    """A suite of the seed's experiment (benchmarks/seed7b.py): rows that fit one device
    call (<= 10 min), written to OUT_DIR/seed-7b-DATE-GPU.json (rows of earlier calls merged)."""
    step = Step(name, ("benchmarks.seed7b", "--shape", shape, "--rows", rows, "--budget-s", "530"), 560,
                out=False, out_dir=True)
    return Suite(about, "cuda", (step,), needs=needs)


REUSE_GPU = ("benchmarks.bench_reuse", "--device", "cuda", "--shape", "llama-1.1b", "--batch", "16", "--seq", "256",
             "--eps-steps", "2")

SUITES: dict[str, Suite] = {
    # -- CPU -------------------------------------------------------------------------
    "smoke": Suite("every harness end to end on tiny shapes, in a few minutes (no meaningful numbers)", "cpu", (
        Step("perturb", ("benchmarks.bench_perturb", "--shape", "tiny", "--rounds", "2")),
        Step("hf", ("benchmarks.bench_hf", "--shape", "tiny", "--batch", "4", "--seq", "32", "--steps", "2")),
        Step("reuse", ("benchmarks.bench_reuse", "--batch", "4", "--seq", "32", "--rounds", "2",
                       "--eps-steps", "1")),
        Step("compare", ("benchmarks.compare", "--shape", "tiny", "--rows", "hf,hf-trunk", "--steps", "2",
                         "--warmup", "1", "--eps-steps", "1", "--batch", "4", "--seq", "24")),
    )),
    "cpu": Suite("the CPU measurements of RESULTS.md: hf step, perturbation, reuse, backends side by side, "
                 "long-input evaluation", "cpu", (
        Step("hf", ("benchmarks.bench_hf",)),
        Step("perturb", ("benchmarks.bench_perturb", "--shape", "smollm2-135m")),
        Step("reuse", ("benchmarks.bench_reuse",)),
        Step("compare", ("benchmarks.compare",), 1200),
        Step("eval-long", ("benchmarks.bench_eval_long",), 1200),
    )),
    "accuracy-cpu": Suite("SST-2 accuracy with the bundled SmolLM2-135M: MeZO recipes, backprop, zero-shot",
                          "cpu", (Step("accuracy", ("benchmarks.accuracy", "--suite", "cpu"), 7200),)),
    # -- GPU (python -m benchmarks gpu SUITE on the GPU host; a device call is <= 10 min) ----
    "kernels": Suite("the CUDA tests (pytest -m gpu: Triton kernel, approximate math, CUDA graphs) and the "
                     "full-parameter perturbation on the 6.7B shape", "cuda", (
        Step("pytest-gpu", ("pytest", "-p", "no:cacheprovider", "-q", "-rs", "-m", "gpu", "tests"), 240, out=False),
        Step("perturb-6.7b", ("benchmarks.bench_perturb", "--device", "cuda", "--shape", "llama-6.7b", "--sweep"),
             330),
    )),
    "hf": Suite("the hf step on the 1.1B shape, with and without CUDA graphs, and the reuse rows", "cuda", (
        _hf("hf-1.1b-graphs-false", "cuda_graphs=false", timeout=115),
        _hf("hf-1.1b-graphs-true", "cuda_graphs=true", timeout=115),
        Step("reuse-1.1b", REUSE_GPU + ("--rows", "trunk cache", "trunk cache + CUDA graphs",
                                        "trunk cache + shared prefixes", "plain (LoRA all layers)"), 330),
    )),
    "lora-dtype": Suite("model-dtype LoRA, with and without CUDA graphs", "cuda", (
        _hf("hf-1.1b-lora-dtype-model", "lora_dtype=model", timeout=115),
        _hf("hf-1.1b-lora-dtype-model-graphs", "lora_dtype=model", "cuda_graphs=true", timeout=115),
        Step("reuse-1.1b-lora-dtype", REUSE_GPU + ("--rows", "trunk cache", "trunk cache + CUDA graphs",
                                                   "trunk cache + model-dtype LoRA",
                                                   "trunk cache + CUDA graphs + model-dtype LoRA"), 300),
    )),
    "profile": Suite("where a step's time goes (torch.profiler), trunk rows and all layers", "cuda", (
        _profile("profile-trunk-graphs", "cuda_graphs=true", "lora_dtype=model"),
        _profile("profile-trunk-every-option", "compile=true", "cuda_graphs=true", "lora_dtype=model",
                 "trim_last_layer=true"),
        _profile("profile-all-layers", layers="all"),
    )),
    "reuse": Suite("the trunk rows timed round robin, with their peak memory in fresh processes", "cuda", (
        Step("reuse-1.1b-memory", REUSE_GPU + ("--memory", "--rows", "trunk cache",
                                               "trunk cache + compile + CUDA graphs + model-dtype LoRA",
                                               "trunk cache + every GPU option"), 400),
    )),
    "all-layers": Suite("the all-layer step with the fused layers", "cuda", (
        _hf("hf-1.1b-lora-dtype-model", "lora_dtype=model", timeout=170),
        _hf("hf-1.1b-every-option", "compile=true", "cuda_graphs=true", "lora_dtype=model", "trim_last_layer=true",
            timeout=170),
        _hf("hf-1.1b-compile", "compile=true", timeout=170),
    )),
    "dp": Suite("data parallel: 1 and 2 ranks, the same global batch", "cuda x2", tuple(
        Step(f"dp{n}", ("torch.distributed.run", "--nproc_per_node", str(n), "-m", "benchmarks.bench_dp",
                        "--shape", "llama-1.1b", "--global-batch", "32", "--seq", "256"), 140)
        for n in (1, 2))),
    "sglang": Suite("the SGLang GPU tests (pytest -m gpu) and its step time against hf", "cuda", (
        Step("pytest-sglang", ("pytest", "-p", "no:cacheprovider", "-q", "-rs", "-m", "gpu",
                               "tests/test_sglang_backend.py"), 270, out=False),
        Step("sglang", ("benchmarks.gpu_sglang",), 280),
    ), needs=("sglang",)),
    **{name: suite for engine in ("sglang", "vllm") for name, suite in _engine_suites(engine).items()},
    "sglang-big": Suite("SGLang on the SmolLM2-135M shape", "cuda", (
        Step("sglang-big", ("benchmarks.gpu_sglang", "--big-only"), 300),
    ), needs=("sglang",)),
    "seed-7b": _seed("seed-7b", "ref,hf,hf-fast,hf-prefix", about="the seed's experiment at 7B (issue 27): "
                     "MeZO reference vs hf default, hf's fastest all-layer options, hf prefix sharing"),
    "seed-7b-more": _seed("seed-7b-more", "ref,hf-fast-nopm,hf-pm,hf-lora-model",
                          about="the seed's experiment at 7B: the hf options one at a time"),
    "seed-7b-8bit": _seed("seed-7b-8bit", "ref,hf,hf-int8,hf-fp8,hf-fast-fp8", needs=("sglang",),
                          about="the seed's experiment at 7B, 8-bit frozen weights in hf (torchao, carried by the "
                                "SGLang bundle)"),
    "seed-7b-sglang": _seed("seed-7b-sglang", "sglang,sglang-prime,sglang-fp8", needs=("sglang",),
                            about="the seed's experiment at 7B on SGLang: bf16, primed prefix, fp8"),
    "seed-7b-vllm": _seed("seed-7b-vllm", "vllm,vllm-fp8", needs=("vllm",),
                          about="the seed's experiment at 7B on vLLM: bf16, fp8"),
    "seed-13b": _seed("seed-13b", "hf,hf-int8,hf-fp8", shape="13b", needs=("sglang",),
                      about="the seed's experiment at the 13B shape: hf memory, bf16 and 8-bit"),
    "accuracy-gpu": Suite("SST-2 accuracy on the GPU: MeZO recipes side by side, backprop, zero-shot", "cuda", (
        Step("accuracy", ("benchmarks.accuracy", "--suite", "gpu"), 3600),)),
    "accuracy-gpu-grid": Suite("the robustness grid alone (lr x k_per_class), as one device call affords", "cuda", (
        Step("accuracy", ("benchmarks.accuracy", "--suite", "gpu-grid"), 560),)),
}


def describe() -> str:
    lines = []
    for name, suite in SUITES.items():
        lines.append(f"{name:13} [{suite.device}] {suite.about}")
        lines += [f"{'':16}python -m {' '.join(_quoted(step.argv))}" for step in suite.steps]
    return "\n".join(lines)


def _quoted(argv):
    return [f"'{a}'" if " " in a else a for a in argv]


def device_tag() -> str:
    """A short name of the machine's accelerator for file names: h200, cpu, ..."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30).stdout.split("\n")[0]
    except (OSError, subprocess.SubprocessError):
        out = ""
    words = [w for w in out.lower().replace("nvidia", "").split() if any(c.isdigit() for c in w)]
    return words[0] if words else "cpu"


def run(name: str, out_dir: Path | None = None, env: dict | None = None, command: str = "") -> dict:
    """Run every step of suite ``name``; write and return the suite's JSON."""
    suite = SUITES[name]
    out_dir = Path(out_dir or RESULTS)
    stamp = time.strftime("%Y-%m-%d", time.gmtime())
    out = out_dir / f"{name}-{device_tag()}-{stamp}.json"
    work = out_dir / f".{out.stem}"
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    record = {"suite": name, "about": suite.about, "command": command or f"python -m benchmarks run {name}",
              "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **versions(env), "steps": []}
    for step in suite.steps:
        argv = [sys.executable, "-m", *step.argv]
        target = work / f"{step.name}.json"
        if step.out:
            argv += ["--out", str(target)]
        if step.out_dir:
            argv += ["--out-dir", str(out_dir)]
        print(f"== {step.name}: {' '.join(_quoted(argv[1:]))}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        try:
            proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=step.timeout)
            rc, log = proc.returncode, proc.stdout + proc.stderr
        except subprocess.TimeoutExpired as exc:
            rc, log = "timeout", _text(exc.stdout) + _text(exc.stderr)
        row = {"name": step.name, "command": " ".join(_quoted(["python", "-m", *step.argv])), "rc": rc,
               "wall_s": round(time.perf_counter() - start, 1), "log_tail": log[-3000:]}
        if target.exists():
            row["result"] = json.loads(target.read_text())
            target.unlink()
        for extra in sorted(work.iterdir()):   # what a harness writes beside its JSON (compare's PNG)
            kept = extra.rename(out_dir / f"{out.stem}-{extra.name}")
            row.setdefault("files", []).append(kept.name)
        record["steps"].append(row)
        print(f"   rc={rc} in {row['wall_s']} s", file=sys.stderr, flush=True)
        out.write_text(json.dumps(record, indent=1) + "\n")   # rewritten after every step
    work.rmdir()
    record["all_ok"] = all(row["rc"] == 0 for row in record["steps"])
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}", file=sys.stderr)
    return record


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def versions(env) -> dict:
    """Device and versions as the steps see them (their environment, not this process's)."""
    code = ("import json, platform, importlib.metadata as m\n"
            "out = {'python': platform.python_version(), 'platform': platform.platform()}\n"
            "for d in ('mezo-run', 'torch', 'transformers', 'peft', 'triton', 'vllm', 'sglang'):\n"
            "    try: out[d] = m.version(d)\n"
            "    except m.PackageNotFoundError: pass\n"
            "import torch\n"
            "out['device'] = (torch.cuda.get_device_name() + f' x{torch.cuda.device_count()}' "
            "if torch.cuda.is_available() else f'cpu ({platform.processor() or platform.machine()})')\n"
            "print(json.dumps(out))")
    try:
        proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        return json.loads(proc.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"versions_error": "could not read them"}
