"""A validation split of SST-2's train file that looks like its dev sentences.

SST-2's train file holds every phrase of the treebank (median 7 words), its dev
file whole sentences (median 19). Validation rows drawn from the train file as it
is are mostly short phrases, and selecting the adapter (``best/``) or stopping on
them tracks the dev sentences badly: the GPU robustness grid of 2026-12-02 kept
adapters that ended below zero-shot on dev. This script draws ``--n`` rows of at
least ``--min-words`` words (sentence-like: median 18 words at 12) with a seeded
sample, writes them as ``val.tsv`` and the train file without them as
``train.tsv``, so no validation sentence is ever trained on. The treebank's
phrases of those sentences stay in ``train.tsv``; the task leaves them out of
training when it loads the split (``task.val_overlap_words``). Only the train
file is read: the dev sentences stay unseen.

    python -m benchmarks.dev_like_val ../shared/assets/data/sst2/train.tsv OUT_DIR
    mezo-run train task.train=OUT_DIR/train.tsv task.val=OUT_DIR/val.tsv task.n_val=1000
"""
from __future__ import annotations

import argparse
import random
from pathlib import Path


def split(lines: list[str], n: int, min_words: int, seed: int) -> tuple[list[str], list[str]]:
    """(validation rows, remaining train rows) of a TSV's data lines (header excluded)."""
    long = [i for i, line in enumerate(lines) if len(line.split("\t")[0].split()) >= min_words]
    if len(long) < n:
        raise SystemExit(f"only {len(long)} rows have >= {min_words} words; asked for {n}")
    chosen = set(random.Random(seed).sample(long, n))
    val = [lines[i] for i in sorted(chosen)]
    texts = {line.split("\t")[0].strip() for line in val}
    # a sentence may occur twice in the treebank's phrases: keep every copy out of training
    train = [line for i, line in enumerate(lines) if i not in chosen and line.split("\t")[0].strip() not in texts]
    return val, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("train", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--min-words", type=int, default=12)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    header, *lines = args.train.read_text().splitlines(keepends=True)
    val, train = split(lines, args.n, args.min_words, args.seed)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "val.tsv").write_text(header + "".join(val))
    (args.out_dir / "train.tsv").write_text(header + "".join(train))
    print(f"{len(val)} validation rows (>= {args.min_words} words), {len(train)} train rows -> {args.out_dir}")


if __name__ == "__main__":
    main()
