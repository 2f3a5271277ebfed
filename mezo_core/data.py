"""Tasks as in the MeZO paper: classification by prompt + verbalizer words
(SST-2: ``<sentence> It was [terrible|great]``), multiple choice with candidates of
each example's own (COPA), plain prompt/completion, and prompts whose generated
completions a reward scores (``reward``): a Task turns the rows of its splits into
token-level Examples (reward rows: Prompts) and training batches. Reading rows is
``readers``, choosing them ``splits``, scoring them ``evaluation``."""
from __future__ import annotations

import dataclasses
import random
import sys

import torch

from .errors import MezoError
from .evaluation import candidate_losses, evaluate, exact_match, normalize_answer  # noqa: F401 (public)
from .forwards import Example, Prompt
from .philox import mix
from .readers import (MAX_LABEL_CHARS, MAX_LINE_CHARS, Record, hf_dataset_spec, label_names,  # noqa: F401
                      load_hf_split, read_records, verbalizer_words)
from .splits import Overlap, make_splits, sample  # noqa: F401 (public)


class Task:
    """Turns records into token-level Examples for a tokenizer."""

    def __init__(self, cfg, tokenizer, batch_size: int | None = None, registry=None):
        """``batch_size`` (mezo.batch_size, when training) is checked against the
        sampled train set: a larger batch would repeat examples within a step.
        ``registry``: where a reward task finds ``task.reward`` (None: the installed plugins)."""
        self.cfg, self.tok = cfg, tokenizer
        self.kind = cfg.kind
        self.words = verbalizer_words(cfg.verbalizer)
        labels = label_names(cfg.verbalizer) or len(self.words)
        self.max_tokens = cfg.get("max_tokens")
        self._prompts: dict[int, tuple[int, ...]] = {}   # id(record) -> prompt ids (truncated)
        self._cut: set[int] = set()                       # id(record) of the examples truncated
        hf = cfg.get("hf_dataset")
        source = f"task.hf_dataset={hf_dataset_spec(hf)['path']}" if hf else cfg.train

        def load(split):  # "train", "dev" or "val": a file, or a split of task.hf_dataset
            if hf and not (split == "val" and cfg.get("val")):  # a task.val file wins over split_val
                return load_hf_split(hf, f"split_{split}", cfg.kind, labels)
            return read_records(cfg[split], cfg.kind, labels, f"task.{split}")

        parts = make_splits(cfg, load, source)
        self.train, self.val, self.dev = parts.train, parts.val, parts.dev
        self.overlap_dropped = parts.overlap_dropped   # train rows left out for overlapping the validation rows
        if batch_size is not None and batch_size > len(self.train):
            raise MezoError(f"config field 'mezo.batch_size': {batch_size} is larger than the "
                            f"training set ({len(self.train)} examples sampled from {source})")
        self._candidates: dict[int, tuple[tuple[int, ...], ...]] = {}  # id(record) -> candidate ids
        if self.kind == "classification":
            self.choices = [tuple(self._ids(w, special=False)) for w in self.words]
            self._check_choices()
        self.rewarder = None
        if self.kind == "reward":
            from .registry import or_installed
            from .rewards import Rewarder, make_reward
            self.rewarder = Rewarder(make_reward(or_installed(registry), cfg), cfg.max_new_tokens, cfg.samples,
                                     cfg.temperature)
            self._check_references()
        self.train_examples = [self.example(r) for r in self.train]
        self.truncated = 0
        if self.max_tokens:
            self._report_truncation()

    def _report_truncation(self):
        """Say once how many examples task.max_tokens cut (stderr; Trainer puts it in the summary)."""
        for r in (*self.dev, *self.val):
            self.prompt(r)
        counts = {name: sum(id(r) in self._cut for r in rows)
                  for name, rows in (("train", self.train), ("dev", self.dev), ("val", self.val)) if rows}
        self.truncated = sum(counts.values())
        if self.truncated:
            print(f"mezo-run: task.max_tokens={self.max_tokens}: cut the text of {self.truncated} examples ("
                  + ", ".join(f"{n} {name}" for name, n in counts.items()) + ")", file=sys.stderr)

    def reference(self, record: Record) -> str | None:
        """A reward row's reference: its own, or (a labelled row) its label's
        verbalizer word without surrounding whitespace; None where it has none."""
        return record.completion if record.label is None else self.words[record.label].strip()

    def _check_references(self):
        """Every row has a reference where the reward needs one (said before any model work)."""
        if not getattr(self.rewarder.reward, "needs_reference", True):
            return
        for record in (*self.train, *self.val, *self.dev):
            if self.reference(record) is None:
                raise MezoError(f"{record.where or 'task'}: reward {self.cfg.reward!r} needs a reference in "
                                f"every row (\"reference\" in JSONL, a 'reference' column in TSV)")

    def _check_choices(self, words=None, choices=None, where="config field 'task.verbalizer'"):
        """Two words with the same tokens could never be told apart: accuracy would be a coin."""
        seen = {}
        for word, ids in zip(words or self.words, choices or self.choices):
            if not ids:
                raise MezoError(f"{where}: word {word!r} has no tokens")
            if ids in seen:
                raise MezoError(f"{where}: words {seen[ids]!r} and {word!r} "
                                f"tokenize to the same ids {list(ids)}")
            seen[ids] = word

    def candidates(self, record: Record) -> tuple[tuple[int, ...], ...]:
        """The token ids of the answers a row is scored on: the verbalizer's words, or
        (multiple choice) the row's own candidates, tokenized after the prompt without
        special tokens (as the verbalizer's words are), checked distinct once."""
        if record.choices is None:
            return tuple(self.choices)
        ids = self._candidates.get(id(record))
        if ids is None:
            ids = tuple(tuple(self._ids(c, special=False)) for c in record.choices)
            self._check_choices(record.choices, ids, f"{record.where or 'task'}: choices")
            self._candidates[id(record)] = ids
        return ids

    def _ids(self, text, special=True):
        return self.tok(text, add_special_tokens=special)["input_ids"]

    def prompt(self, record: Record) -> tuple[int, ...]:
        """The prompt's ids, computed once per record (and cut to task.max_tokens)."""
        ids = self._prompts.get(id(record))
        if ids is None:
            ids = self._prompts[id(record)] = self._make_prompt(record)
        return ids

    def _make_prompt(self, record: Record) -> tuple[int, ...]:
        """Classification and multiple choice: ``task.template`` around the text (cut
        to task.max_tokens from the text's tail); completion: the prompt as written.
        Reward rows: the prompt as written (cut to task.max_tokens from its head), or
        for a labelled row the template around its text, as classification's."""
        if self.kind == "reward":
            return self._reward_prompt(record)
        if self.kind == "completion":
            ids = tuple(self._ids(record.text))
            room = None if not self.max_tokens else self.max_tokens - len(self._ids(record.completion, special=False))
            if room is not None and len(ids) > room:
                # keep the end of the prompt (it leads into the completion) and a leading BOS
                bos = self.tok.bos_token_id if ids and ids[0] == getattr(self.tok, "bos_token_id", None) else None
                head = (ids[0],) if bos is not None else ()
                if room <= len(head):
                    raise MezoError(f"config field 'task.max_tokens': {self.max_tokens} leaves no room for the "
                                    f"prompt of {record.text[:40]!r} before its completion")
                self._cut.add(id(record))
                ids = head + ids[len(ids) - (room - len(head)):]
            return ids
        ids = tuple(self._ids(self.cfg.template.format(text=record.text)))
        room = None if not self.max_tokens else self.max_tokens - max(map(len, self.candidates(record)))
        if room is None or len(ids) <= room:
            return ids
        return self._truncated_prompt(record, room)

    def _reward_prompt(self, record: Record) -> tuple[int, ...]:
        if record.label is not None:
            ids = tuple(self._ids(self.cfg.template.format(text=record.text)))
            return ids if not self.max_tokens or len(ids) <= self.max_tokens else \
                self._truncated_prompt(record, self.max_tokens)
        ids = tuple(self._ids(record.text))
        if self.max_tokens and len(ids) > self.max_tokens:   # keep the end (it leads into the answer) and BOS
            head = (ids[0],) if ids[0] == getattr(self.tok, "bos_token_id", None) else ()
            self._cut.add(id(record))
            ids = head + ids[len(ids) - (self.max_tokens - len(head)):]
        return ids

    def _truncated_prompt(self, record: Record, room: int) -> tuple[int, ...]:
        """The prompt with the longest head of the text's tokens that fits ``room``:
        the template around {text} (its answer slot included) is never cut."""
        text_ids = self._ids(record.text, special=False)
        build = lambda k: tuple(self._ids(self.cfg.template.format(  # noqa: E731
            text=self.tok.decode(text_ids[:k]) if k else "")))
        lo, hi = 0, len(text_ids)            # the longest k whose prompt fits: binary search
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(build(mid)) <= room:
                lo = mid
            else:
                hi = mid - 1
        ids = build(lo)
        if lo == 0 or len(ids) > room:
            need = len(build(0)) + self.max_tokens - room + 1
            raise MezoError(f"config field 'task.max_tokens': {self.max_tokens} is too small: the template, "
                            f"the longest answer word and one token of text need {need}")
        self._cut.add(id(record))
        return ids

    def example(self, record: Record) -> Example:
        if not self.prompt(record):
            raise MezoError(f"task: the prompt of {record.text[:40]!r} has no tokens (the tokenizer adds "
                            "no BOS token): give every example a non-empty prompt")
        if self.kind == "reward":
            return Prompt(self.prompt(record), self.reference(record), self.rewarder)
        if self.kind in ("classification", "multiple_choice"):
            candidates = self.candidates(record)
            choices = candidates if self.cfg.train_loss == "choices" else None
            return Example(self.prompt(record), candidates[record.label], choices)
        return Example(self.prompt(record), tuple(self._ids(record.completion, special=False)))

    def train_batch(self, run_seed: int, step: int, batch_size: int) -> list[Example]:
        """Batches walk through a seeded permutation per epoch: a pure function
        of (seed, step), so a resumed run sees the same batches. A reward row gets
        the seed of its samples from (seed, step, its place in the batch)."""
        n = len(self.train_examples)
        out = []
        for i in range(step * batch_size, (step + 1) * batch_size):
            epoch, pos = divmod(i, n)
            perm = self._perm(run_seed, epoch, n, batch_size)
            example = self.train_examples[perm[pos]]
            if isinstance(example, Prompt):
                example = dataclasses.replace(example, sample_seed=mix(run_seed, step, i, 0x5A3F))
            out.append(example)
        return out

    def _perm(self, run_seed, epoch, n, batch_size=1):
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != (run_seed, epoch, batch_size):
            gen = torch.Generator().manual_seed(mix(run_seed, epoch, 0xDA7A))
            perm = torch.randperm(n, generator=gen).tolist()
            if self.cfg.get("group_by_length"):
                perm = self._group_by_length(perm, run_seed, epoch, batch_size)
            self._perm_cache = ((run_seed, epoch, batch_size), perm)
        return self._perm_cache[1]

    GROUP_WINDOW = 50  # batches per window that task.group_by_length sorts by length

    def _group_by_length(self, perm, run_seed, epoch, b):
        """The epoch's permutation with rows of similar length side by side (less
        padding per batch): windows of ``GROUP_WINDOW`` batches are sorted by length,
        cut into batches, and those batches shuffled -- still a pure function of
        (seed, epoch), so of (seed, step)."""
        out = []
        for w, start in enumerate(range(0, len(perm), b * self.GROUP_WINDOW)):
            window = sorted(perm[start:start + b * self.GROUP_WINDOW],
                            key=lambda i: self.train_examples[i].num_tokens)
            blocks = [window[i:i + b] for i in range(0, len(window), b)]
            random.Random(mix(run_seed, epoch, w, 0x6B7)).shuffle(blocks)
            out += [i for block in blocks for i in block]
        return out

    #: tokens a greedy generation may run past the gold completion's length (exact match)
    EXACT_MATCH_EXTRA_TOKENS = 4

    def evaluate(self, backend, batch_size: int, progress=None, split: str = "dev",
                 predictions: list | None = None) -> dict:
        """``evaluation.evaluate`` of this task (its docstring says what is measured)."""
        return evaluate(self, backend, batch_size, progress, split, predictions)
