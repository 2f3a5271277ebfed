"""Which rows train, select and report: MeZO-paper k-shot sampling, the validation
split (a file of its own, or rows held out from the train file) and the overlap rule
that keeps pieces of validation rows out of training."""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

from .errors import MezoError
from .philox import mix
from .readers import Record, hf_dataset_spec


class Overlap:
    """Which texts overlap one of ``texts``: one is a run of at least ``min_words``
    words of the other (whitespace-separated words, compared exactly).

    Why: SST-2's train file holds every phrase of the treebank, so a validation
    sentence drawn from it (or a file made of such sentences) has its own phrases,
    labelled, among the training rows: 7470 of the 66349 rows overlap the 1000
    sentence-like rows of ``benchmarks.dev_like_val`` at 4 words. Trained on, they
    make validation gains that dev does not see, and best/ then moves to adapters
    that are worse on unseen data. Four words separate copied pieces from shared
    vocabulary: of the train rows found inside dev's 872 sentences (no sentence in
    common), 1729 have 1-3 words and 40 have 4 or more."""

    def __init__(self, texts: Sequence[str], min_words: int):
        self.min_words = min_words
        self.whole: set[str] = set()
        self.pieces: set[str] = set()
        for text in texts:
            words = text.split()
            if len(words) >= min_words:
                self.whole.add(" ".join(words))
                self.pieces.update(_runs(words, range(min_words, len(words) + 1)))
        self.lengths = sorted({len(t.split()) for t in self.whole})

    def __call__(self, text: str) -> bool:
        words = text.split()
        if len(words) < self.min_words:
            return False
        if " ".join(words) in self.pieces:   # text lies inside one of the texts
            return True
        return any(run in self.whole for run in _runs(words, [n for n in self.lengths if n <= len(words)]))


def _runs(words: list[str], lengths) -> Iterator[str]:
    for n in lengths:
        for i in range(len(words) - n + 1):
            yield " ".join(words[i:i + n])


def sample(records: Sequence[Record], k_per_class: int | None, n: int | None, seed: int) -> list[Record]:
    """MeZO-paper sampling: k per class (or n overall), fixed seed; None keeps all."""
    rng = random.Random(seed)
    if k_per_class:
        by_label: dict[int, list[Record]] = {}
        for r in records:
            by_label.setdefault(r.label, []).append(r)
        out = []
        for label in sorted(by_label):
            pool = by_label[label]
            if len(pool) < k_per_class:
                raise MezoError(f"task.k_per_class={k_per_class}: label {label} has only {len(pool)} examples")
            out += rng.sample(pool, k_per_class)
        rng.shuffle(out)
        return out
    if n:
        return rng.sample(list(records), min(n, len(records)))
    return list(records)


@dataclass
class Splits:
    train: list          # the training sample
    val: list            # the selection rows (a validation file, or held out from train)
    dev: list            # the reported rows
    overlap_dropped: int  # train rows left out for overlapping a validation row


def make_splits(cfg, load: Callable[[str], list], source: str) -> Splits:
    """The three splits of ``cfg`` (task config): ``load(split)`` reads "train", "dev"
    or "val"; ``source`` names the train data in messages. Seeded by ``sample_seed``.
    ``k_per_class`` samples classification rows, and reward rows that all have a label
    (classification data answered by generation); other kinds take ``n_train`` rows."""
    hf = cfg.get("hf_dataset")
    train = load("train")
    overlap_words = cfg.get("val_overlap_words", 0)
    # selection data that is not the reported dev set: a file of its own (task.val) ...
    val = []
    if cfg.get("val") or (hf and hf_dataset_spec(hf)["split_val"]):
        pool = load("val")
        val = pool if not cfg.n_val or cfg.n_val >= len(pool) else \
            random.Random(mix(cfg.sample_seed, 0x7A1)).sample(pool, cfg.n_val)
    overlap_dropped = 0     # train rows left out for overlapping the validation rows
    if val and overlap_words:
        overlaps = Overlap([r.text for r in val], overlap_words)
        kept = [r for r in train if not overlaps(r.text)]
        overlap_dropped, train = len(train) - len(kept), kept
        if overlap_dropped:
            print(f"mezo-run: left {overlap_dropped} rows of {source} out of training: each is part of "
                  f"a validation row or holds one (task.val_overlap_words={overlap_words})", file=sys.stderr)
    labelled = cfg.kind == "classification" or (cfg.kind == "reward" and all(r.label is not None for r in train))
    sampled = sample(train, cfg.k_per_class if labelled else None, cfg.n_train, cfg.sample_seed)
    dev = load("dev")
    # a seeded random sample, in file order (not the first n rows: a file sorted by
    # label would give one class)
    if cfg.n_dev and cfg.n_dev < len(dev):
        keep = sorted(random.Random(mix(cfg.sample_seed, 0xDE7)).sample(range(len(dev)), cfg.n_dev))
        dev = [dev[i] for i in keep]
    # ... else examples held out from the train file, none overlapping the training sample
    if not val and cfg.n_val:
        chosen = {id(r) for r in sampled}
        pool = [r for r in train if id(r) not in chosen]
        if overlap_words:
            overlaps = Overlap([r.text for r in sampled], overlap_words)
            pool = [r for r in pool if not overlaps(r.text)]
        if len(pool) < cfg.n_val:
            raise MezoError(f"config field 'task.n_val': {cfg.n_val} validation examples asked, but "
                            f"{source} has only {len(pool)} beyond the training sample"
                            + (f" and the rows overlapping it (task.val_overlap_words={overlap_words})"
                               if overlap_words else ""))
        val = random.Random(mix(cfg.sample_seed, 0x7A1)).sample(pool, cfg.n_val)
    return Splits(sampled, val, dev, overlap_dropped)
