"""The test helpers live in ``mezo_core.testing`` (importable by plugin packages
and benchmarks); this name stays for the tests that import ``tiny``."""
import torch

from mezo_core import Backend
from mezo_core.perturb import apply_z
from mezo_core.rewards import Reward
from mezo_core.testing import (WORDS, InterruptAt, build_model, corpus, train_tokenizer,  # noqa: F401
                               write_run_config, write_task_files)


def replay_seed(default: int) -> int:
    """MEZO_TEST_SEED or ``default``, printed (pytest shows it with a failure) so that a
    failing draw can be replayed."""
    import os
    seed = int(os.environ.get("MEZO_TEST_SEED", default))
    print(f"seed {seed} (replay: MEZO_TEST_SEED={seed})")
    return seed


def seeded(default: int):
    """A torch generator seeded by :func:`replay_seed` (its seed printed)."""
    import torch
    return torch.Generator().manual_seed(replay_seed(default))


def seeded_random(default: int):
    """A ``random.Random`` seeded by :func:`replay_seed` (its seed printed)."""
    import random
    return random.Random(replay_seed(default))


def read_jsonl(path) -> list:
    """The rows of a JSON-lines file."""
    import json
    from pathlib import Path
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def metric_rows(run) -> list:
    """A run folder's ``metrics.jsonl`` rows, one a step."""
    from pathlib import Path
    return read_jsonl(Path(run) / "metrics.jsonl")


def error_text(stderr: str) -> str:
    """The CLI's one-line error from a process's stderr (transformers may draw a
    progress bar before it); asserts there is one and no traceback."""
    assert "Traceback" not in stderr and "mezo-run: error: " in stderr, stderr
    return stderr[stderr.index("mezo-run: error: "):]


def plain_choice_losses(model_dir, adapter_dir, texts, template="{text} It was", words=(" great", " terrible")):
    """Each text's loss of every verbalizer word (mean over the word's tokens) under a plain
    transformers model, with the PEFT adapter at ``adapter_dir`` (None: the base model), one
    prompt at a time: an oracle for the accuracies and losses a run reports."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel
        model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    out = []
    for text in texts:
        prompt = tok(template.format(text=text))["input_ids"]
        losses = []
        for word in words:
            target = tok(word, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logits = model(torch.tensor([prompt + target])).logits[0, len(prompt) - 1:-1]
            losses.append(float(torch.nn.functional.cross_entropy(logits, torch.tensor(target))))
        out.append(losses)
    return out


class QuadraticBackend(Backend):
    """theta: a few fp32 tensors. Example j's loss: 0.5 * w_j * ||theta - target||^2
    with w_j = 1 + prompt_ids[0] (so the batch matters): a loss with a known gradient.
    ``calls`` records every perturbation and forward."""

    name = "quadratic"

    def __init__(self, seed=0, dist="gaussian", shapes=((4, 3), (7,), (2, 5))):
        print("seed", seed)
        g = torch.Generator().manual_seed(seed)
        self.tensors = [torch.randn(s, generator=g) for s in shapes]
        self.targets = [torch.randn(s, generator=g) for s in shapes]
        self.dist, self.calls = dist, []

    def trainable_names(self):
        return [f"t{i}" for i in range(len(self.tensors))]

    def perturb(self, terms, decay=1.0):
        self.calls.append(("perturb", list(terms), decay))
        apply_z(self.tensors, terms, decay, dist=self.dist)

    def losses(self, batch):
        self.calls.append(("losses", len(batch)))
        sq = sum(float(((t.double() - c.double()) ** 2).sum()) for t, c in zip(self.tensors, self.targets))
        return torch.tensor([0.5 * (1 + e.prompt_ids[0]) * sq for e in batch], dtype=torch.float64)

    def save_adapter(self, path):
        raise NotImplementedError

    def load_adapter(self, path):
        raise NotImplementedError


def assert_samples_follow(first_tokens, logits, temperature):
    """Sampled first tokens against softmax(logits / T): each of the 5 likeliest within 4
    sigma of its probability, and Pearson's chi-square over the tokens expected >= 5 times
    (the rest pooled) accepting T and rejecting 2T (the check tells temperatures apart)."""
    n = len(first_tokens)
    probs = torch.softmax(logits / temperature, -1)
    freq = torch.bincount(torch.tensor(first_tokens), minlength=probs.numel()).double() / n
    top = probs.topk(5).indices
    sigma = (probs[top] * (1 - probs[top]) / n).sqrt()
    print(f"first tokens, {n} samples at T={temperature}: freq {freq[top].tolist()} vs p {probs[top].tolist()}")
    assert ((freq[top] - probs[top]).abs() <= 4 * sigma + 1e-9).all(), (freq[top], probs[top])

    def chi2(p):
        big = p * n >= 5
        observed = torch.cat([freq[big], freq[~big].sum()[None]]) * n
        expected = torch.cat([p[big], p[~big].sum()[None]]) * n
        return float(((observed - expected) ** 2 / expected.clamp(min=1e-12)).sum()), int(big.sum())
    statistic, df = chi2(probs)
    assert statistic < df + 5 * (2 * df) ** 0.5, (statistic, df)
    wrong, wrong_df = chi2(torch.softmax(logits / (2 * temperature), -1))
    assert wrong > wrong_df + 5 * (2 * wrong_df) ** 0.5, wrong


def commonest_inner_token(rows) -> int:
    """The token most often generated mid-row (neither first nor last): taken as EOS, it
    stops some rows early and lets others run to the end."""
    counts = {}
    for row in rows:
        for t in row[1:-1]:
            counts[t] = counts.get(t, 0) + 1
    return max(counts, key=counts.get)


class Record(Reward):
    """A reward that scores a completion by its length and keeps every text it saw
    (the generation tests compare what each path generated)."""
    name = "record"
    needs_reference = False

    def __init__(self, options=None):
        super().__init__(options)
        self.seen = []

    def score(self, completion, reference):
        self.seen.append(completion)
        return float(len(completion))


def count_calls(monkeypatch, obj, name, measure=lambda first, *rest, **kw: len(first)):
    """Wrap ``obj.name`` so that every call appends ``measure(*args)`` (default: the length
    of the first argument, e.g. a call's requests) to the list returned."""
    calls, real = [], getattr(obj, name)
    monkeypatch.setattr(obj, name, lambda *a, **kw: calls.append(measure(*a, **kw)) or real(*a, **kw))
    return calls


def recorded_rows(prompts, max_new_tokens, samples=1, first_seed=0):
    """Reward rows of ``prompts`` scored by a ``Record`` (row i sampled with seed
    first_seed + i): ``(rewarder, batch)``, the rewarder's ``reward.seen`` the texts."""
    from mezo_core.forwards import Prompt
    from mezo_core.rewards import Rewarder
    rewarder = Rewarder(Record(), max_new_tokens=max_new_tokens, samples=samples, temperature=1.0)
    return rewarder, [Prompt(p, None, rewarder, sample_seed=first_seed + i) for i, p in enumerate(prompts)]
