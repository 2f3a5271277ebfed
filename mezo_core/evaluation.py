"""Scoring a task's rows under the current adapter: accuracy by the lowest-loss
candidate, the gold candidate's loss, exact match of greedy generations, the mean
reward of greedy completions (reward tasks), and the per-row predictions of
``mezo-run eval --predictions``."""
from __future__ import annotations

import sys

import torch

from .errors import MezoError
from .forwards import Example
from .readers import Record, label_names


def evaluate(task, backend, batch_size: int, progress=None, split: str = "dev",
             predictions: list | None = None) -> dict:
    """Classification and multiple choice: accuracy (lowest-loss candidate wins),
    mean loss of the gold candidate and ``outcomes`` (a "1"/"0" string: each example
    right or not, in file order); completion: mean loss, and exact match
    of greedy generations (``task.exact_match``; skipped with a note where the
    backend cannot generate). ``split``: "dev" or "val" (the keys are prefixed with it).
    ``predictions``: a list that receives one record per row, in file order
    (``mezo-run eval --predictions``). Reward tasks: ``evaluate_rewards``."""
    if task.kind == "reward":
        return evaluate_rewards(task, backend, batch_size, progress, split, predictions)
    records = task.val if split == "val" else task.dev
    scored = task.kind != "completion"
    # shortest first: a batch is padded to its longest row, so rows of similar length
    # waste little (SST-2 dev: ~40% fewer padded tokens); the metrics are sums, order-free
    prompts = {id(r): task.prompt(r) for r in records} if scored else {}
    order = sorted(records, key=lambda r: len(prompts[id(r)]) if prompts else len(r.text))
    generate = not scored and task.cfg.get("exact_match", True)
    losses, right, exact = [], {}, 0
    rows_out: dict[int, dict] = {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if scored:
            chunk_prompts = [prompts[id(r)] for r in chunk]
            if task.kind == "classification":  # one set of words: the backends' choice_losses
                rows = backend.choice_losses(chunk_prompts, task.choices)
            else:
                rows = candidate_losses(backend, chunk_prompts, [task.candidates(r) for r in chunk])
            for r, scores in zip(chunk, rows):
                right[id(r)] = int(scores.argmin()) == r.label
                losses.append(float(scores[r.label]))
                if predictions is not None:
                    rows_out[id(r)] = prediction(task, r, scores)
        else:
            examples = [task.example(r) for r in chunk]
            chunk_losses = backend.losses(examples).tolist()
            losses += chunk_losses
            texts = generations(task, backend, chunk, examples) if generate else False
            generate = texts is not False
            matched = [exact_match(g, r.completion) for r, g in zip(chunk, texts or [])]
            exact += sum(matched)
            if predictions is not None:
                for i, (r, loss) in enumerate(zip(chunk, chunk_losses)):
                    rows_out[id(r)] = {"prompt": r.text, "completion": r.completion, "loss": loss,
                                       **({"generation": texts[i], "exact_match": matched[i]}
                                          if texts else {})}
        if progress:
            progress.update(len(chunk))
    out = {f"{split}_loss": sum(losses) / len(losses), f"{split}_examples": len(records)}
    if scored:
        out[f"{split}_accuracy"] = sum(right.values()) / len(records)
        # which examples were right, in file order: best/ selection compares two adapters pairwise
        out[f"{split}_outcomes"] = "".join("1" if right[id(r)] else "0" for r in records)
    elif generate:
        out[f"{split}_exact_match"] = exact / len(records)
    if predictions is not None:
        predictions += [{"index": i, "where": r.where, **rows_out[id(r)]} for i, r in enumerate(records)]
    return out

def evaluate_rewards(task, backend, batch_size: int, progress=None, split: str = "dev",
                     predictions: list | None = None) -> dict:
    """A reward task's rows scored by their greedy completions (whatever
    ``task.samples``: evaluation measures the adapter, not the sampler):
    ``{split}_reward``, the mean reward; ``{split}_loss``, minus it (what training
    minimises, and what best/ is selected on); ``{split}_exact_match``, the share of
    rows with a reference whose completion is it exactly (``exact_match``'s rule);
    ``{split}_outcomes`` where every reward is 0 or 1 (full reward or not, per row in
    file order: best/'s sign test)."""
    records = task.val if split == "val" else task.dev
    prompts = {id(r): task.prompt(r) for r in records}
    order = sorted(records, key=lambda r: len(prompts[id(r)]))   # similar lengths batch together
    rewards, texts = {}, {}
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        generated = task.rewarder.completions(backend, [prompts[id(r)] for r in chunk], greedy=True)
        for r, (text,) in zip(chunk, generated):
            texts[id(r)] = text
            rewards[id(r)] = task.rewarder.rewards([text], task.reference(r))[0]
        if progress:
            progress.update(len(chunk))
    mean = sum(rewards.values()) / len(records)
    out = {f"{split}_loss": 0.0 - mean, f"{split}_reward": mean, f"{split}_examples": len(records)}
    referenced = [r for r in records if task.reference(r) is not None]
    matched = {id(r): exact_match(texts[id(r)], task.reference(r)) for r in referenced}
    if referenced:
        out[f"{split}_exact_match"] = sum(matched.values()) / len(referenced)
    if all(v in (0.0, 1.0) for v in rewards.values()):
        out[f"{split}_outcomes"] = "".join("1" if rewards[id(r)] == 1.0 else "0" for r in records)
    if predictions is not None:
        predictions += [{"index": i, "where": r.where, "prompt": r.text, "reference": task.reference(r),
                         "generation": texts[id(r)], "reward": rewards[id(r)],
                         **({"exact_match": matched[id(r)]} if id(r) in matched else {})}
                        for i, r in enumerate(records)]
    return out


def prediction(task, record: Record, scores) -> dict:
    """One scored row for --predictions: the gold and predicted label (names where
    the verbalizer has them), right or not, each candidate's loss."""
    names = label_names(task.cfg.verbalizer) if task.kind == "classification" else None
    guess = int(scores.argmin())
    show = (lambda i: names[i]) if names else (lambda i: i)
    return {"text": record.text, "label": show(record.label), "prediction": show(guess),
            "correct": guess == record.label, "losses": [round(float(x), 6) for x in scores],
            **({"choices": list(record.choices)} if record.choices else {})}

def generations(task, backend, chunk, examples):
    """The greedy generation of each row of ``chunk`` (each up to its gold's length +
    EXACT_MATCH_EXTRA_TOKENS tokens), as text; False where the backend cannot
    generate (said once on stderr)."""
    budgets = [len(e.target_ids) + task.EXACT_MATCH_EXTRA_TOKENS for e in examples]
    try:
        outputs = backend.generate([e.prompt_ids for e in examples], max(budgets))
    except MezoError as exc:
        if not getattr(task, "_said_no_generation", False):
            print(f"mezo-run: {exc}: exact match skipped, the loss is reported alone", file=sys.stderr)
            task._said_no_generation = True
        return False
    return [task.tok.decode(list(ids[:n]), skip_special_tokens=True) for ids, n in zip(outputs, budgets)]


def normalize_answer(text: str) -> str:
    """Whitespace-insensitive form of an answer: runs of whitespace become one space,
    leading and trailing whitespace go (case and punctuation are kept)."""
    return " ".join(text.split())


def exact_match(generated: str, gold: str) -> bool:
    """Whether a greedy generation completes ``gold`` exactly: the generation is cut
    at its first newline after some text (unless the gold answer itself spans lines),
    then both are compared by ``normalize_answer``. A generation that runs on past
    the answer without a newline or EOS does not match."""
    if "\n" not in gold.strip():
        stripped = generated.lstrip()
        generated = stripped.split("\n", 1)[0]
    return normalize_answer(generated) == normalize_answer(gold)


def candidate_losses(backend, prompts, candidates) -> list[torch.Tensor]:
    """The loss of each row's candidates (a row's own number of them): rows with the
    same candidates (a verbalizer; repeated choice sets) go through ``choice_losses``
    together (the backends' fast path: single-token candidates in one pass), every
    other row's (prompt, candidate) pairs through one ``losses`` call."""
    groups: dict[tuple, list[int]] = {}
    for i, c in enumerate(candidates):
        groups.setdefault(tuple(c), []).append(i)
    out: list[torch.Tensor | None] = [None] * len(prompts)
    singles = []
    for choices, rows in groups.items():
        if len(rows) == 1 and any(len(c) != 1 for c in choices):
            singles.append(rows[0])
            continue
        scores = backend.choice_losses([prompts[i] for i in rows], list(choices)).cpu()
        for j, i in enumerate(rows):
            out[i] = scores[j]
    if singles:
        pairs = [Example(tuple(prompts[i]), tuple(c)) for i in singles for c in candidates[i]]
        flat = backend.losses(pairs).cpu()
        pos = 0
        for i in singles:
            out[i] = flat[pos:pos + len(candidates[i])]
            pos += len(candidates[i])
    return out


def evaluate_splits(task, backend, batch_size: int, label: str, progress: bool) -> tuple[dict, str | None]:
    """A run's evaluation: the dev set, and the validation set when there is one, each
    with a progress bar. Returns the metrics (``dev_*``, ``val_*``) and the selection
    split's per-example outcomes (best/ compares adapters on them)."""
    from tqdm.auto import tqdm
    result = {}
    for split, records in (("dev", task.dev), ("val", task.val)):
        if not records:
            continue
        bar = tqdm(total=len(records), desc=f"eval {label} ({split})", leave=False, disable=not progress,
                   dynamic_ncols=True)
        result.update(evaluate(task, backend, batch_size, bar, split=split))
        bar.close()
    outcomes = {k: result.pop(k) for k in [k for k in result if k.endswith("_outcomes")]}
    return result, outcomes.get(f"{'val' if task.val else 'dev'}_outcomes")
