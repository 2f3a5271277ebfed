"""Teacher forcing for multi-token targets, as a vLLM (v1) logits processor.

A request whose ``SamplingParams.extra_args`` holds ``{"mezo_force": [t0, t1, ...]}``
has every logit but ``t_k`` masked at its k-th generated position, so greedy
decoding emits exactly the target. vLLM computes the returned logprobs
(``logprobs_mode="raw_logprobs"``, its default) from the raw logits *before*
any logits processor, so the logprob reported for the k-th sampled token is
log p(t_k | prompt, t_<k) of the unmodified model: the teacher-forced
cross-entropy, one decoding step per target token, with the prompt (and its
cached prefix) computed once.
"""
from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

FORCE_KEY = "mezo_force"


def _forcer(targets: list[int]):
    def force(output_ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        step = len(output_ids)
        token = targets[step] if step < len(targets) else targets[-1]
        forced = torch.full_like(logits, float("-inf"))
        forced[token] = 0.0
        return forced
    return force


class ForceTargetsLogitsProcessor(AdapterLogitsProcessor):
    """Per-request forcing of the tokens listed under ``extra_args["mezo_force"]``."""

    @classmethod
    def validate_params(cls, sampling_params):
        extra = sampling_params.extra_args or {}
        targets = extra.get(FORCE_KEY)
        if targets is not None and (not isinstance(targets, (list, tuple)) or not targets
                                    or not all(isinstance(t, int) for t in targets)):
            raise ValueError(f"extra_args[{FORCE_KEY!r}] must be a non-empty list of token ids")

    def is_argmax_invariant(self) -> bool:
        return False

    def new_req_logits_processor(self, params):
        targets = (params.extra_args or {}).get(FORCE_KEY)
        if not targets:
            return None
        return _forcer([int(t) for t in targets])
