"""Small-number addition as a reward task (``conf/arith-reward.yaml``, reward
``numeric``): writes ``train.jsonl``, ``dev.jsonl`` and ``val.jsonl`` of
``{"prompt": "Q: What is 7 + 12?\\nA: 7 + 12 =", "reference": "19"}`` rows under a folder.

    python -m benchmarks.make_arith data/arith            # the recipe's default place
    python -m benchmarks.make_arith OUT --max 30 --train 300 --dev 150 --val 40 --seed 0

Pairs (a, b) with 0 <= a, b <= ``--max``, drawn without replacement and split so
that no pair (in either order) is in two files: dev measures sums not trained on.
A pure function of its arguments (no data is committed; the recipe's test makes it).
"""
from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PROMPT = "Q: What is {a} + {b}?\nA: {a} + {b} ="


def rows(pairs):
    return [{"prompt": PROMPT.format(a=a, b=b), "reference": str(a + b)} for a, b in pairs]


def make(out: Path, max_operand: int = 30, n_train: int = 300, n_dev: int = 150, n_val: int = 40,
         seed: int = 0) -> dict[str, Path]:
    """The three files under ``out``; returns {split: path}."""
    unordered = [(a, b) for a in range(max_operand + 1) for b in range(a, max_operand + 1)]
    need = n_train + n_dev + n_val
    if need > len(unordered):
        raise SystemExit(f"make_arith: {need} rows asked, but operands up to {max_operand} give only "
                         f"{len(unordered)} distinct pairs: raise --max")
    rng = random.Random(seed)
    chosen = rng.sample(unordered, need)
    chosen = [(a, b) if rng.random() < 0.5 else (b, a) for a, b in chosen]   # both orders appear
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, part in (("train", chosen[:n_train]), ("dev", chosen[n_train:n_train + n_dev]),
                       ("val", chosen[n_train + n_dev:])):
        paths[name] = out / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows(part)))
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="the folder to write train/dev/val.jsonl into")
    p.add_argument("--max", type=int, default=30, help="largest operand")
    p.add_argument("--train", type=int, default=300)
    p.add_argument("--dev", type=int, default=150)
    p.add_argument("--val", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    for name, path in make(a.out, a.max, a.train, a.dev, a.val, a.seed).items():
        print(f"{name}: {path}")


if __name__ == "__main__":
    main()
