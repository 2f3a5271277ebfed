"""Built-in rewards: how a generated completion is scored against its row's reference
(``task.reward``; each gives 1.0 or 0.0)."""
from __future__ import annotations

import math
import re
import string
from dataclasses import dataclass

from mezo_core.config import setting
from mezo_core.errors import MezoError
from mezo_core.evaluation import exact_match
from mezo_core.rewards import Reward

_PUNCTUATION = string.punctuation + "“”‘’«»…"


def _need(reference, name):
    if reference is None:
        raise MezoError(f"reward {name!r} needs a reference in every row (\"reference\" in JSONL, the "
                        f"second column in TSV)")
    return reference


def _word(text: str) -> str:
    """A word without case or surrounding punctuation: ``" Positive!"`` -> ``"positive"``."""
    return text.strip().strip(_PUNCTUATION).casefold()


class LabelWord(Reward):
    """1 if the first word of the completion (whitespace-separated, case and the
    punctuation around it ignored) equals the reference (likewise normalised):
    ``" Positive."`` for ``positive``. For classification answered by generation."""
    name = "label_word"

    def score(self, completion, reference):
        words = completion.split()
        return float(bool(words) and _word(words[0]) == _word(_need(reference, self.name)))


class ExactMatch(Reward):
    """1 if the completion is the reference: the rule of completion tasks' exact match
    (``mezo_core.evaluation.exact_match``: the completion cut at its first newline
    after some text, whitespace runs as one space, case and punctuation kept)."""
    name = "exact_match"

    def score(self, completion, reference):
        return float(exact_match(completion, _need(reference, self.name)))


@dataclass
class RegexOptions:
    pattern: str = setting("", "a Python regular expression searched in the completion; with a capture "
                               "group and a reference, group 1 of the first match must equal the reference "
                               "(surrounding whitespace ignored), otherwise any match scores 1")
    ignore_case: bool = setting(False, "match case-insensitively (the group's comparison too)")

    def __post_init__(self):
        if not self.pattern:
            raise MezoError("config field 'task.reward_options.pattern': reward 'regex' needs a pattern")
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise MezoError(f"config field 'task.reward_options.pattern': {self.pattern!r} is not a regular "
                            f"expression: {exc}") from None


class Regex(Reward):
    """``task.reward_options.pattern`` searched in the completion (``re.search``).
    Without a capture group, or for a row without a reference: 1 if it matches. With
    a group and a reference: 1 if group 1 of the first match equals the reference
    (both stripped; case-insensitive with ``ignore_case``), e.g. ``answer: (\\w+)``."""
    name = "regex"
    options = RegexOptions
    needs_reference = False

    def __init__(self, options=None):
        super().__init__(options or RegexOptions(pattern=".+"))
        self.regex = re.compile(self.opts.pattern, re.IGNORECASE if self.opts.ignore_case else 0)

    def score(self, completion, reference):
        found = self.regex.search(completion)
        if found is None:
            return 0.0
        if not self.regex.groups or reference is None:
            return 1.0
        group, reference = (found.group(1) or "").strip(), reference.strip()
        if self.opts.ignore_case:
            group, reference = group.casefold(), reference.casefold()
        return float(group == reference)


@dataclass
class NumericOptions:
    tolerance: float = setting(0.0, "the largest absolute difference that still counts as equal")


_NUMBER = re.compile(r"[-+]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def first_number(text: str) -> float | None:
    """The first number written in ``text`` (a sign, digits with thousands commas, a
    decimal point), or None: ``"= 1,234.5 apples"`` -> 1234.5."""
    found = _NUMBER.search(text)
    if found is None:
        return None
    try:
        return float(found.group().replace(",", ""))
    except ValueError:
        return None


class Numeric(Reward):
    """1 if the first number in the completion equals the reference's number (within
    ``task.reward_options.tolerance``): ``" 12 apples"`` for ``12``."""
    name = "numeric"
    options = NumericOptions

    def score(self, completion, reference):
        want = first_number(_need(reference, self.name))
        if want is None:
            raise MezoError(f"reward 'numeric': the reference {reference!r:.40} holds no number")
        got = first_number(completion)
        return float(got is not None and math.isclose(got, want, rel_tol=0.0, abs_tol=self.opts.tolerance))
