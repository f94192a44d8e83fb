"""How likely the model finds a reply: lmms-eval's `loglikelihood`, used by multiple-choice tasks.

A batch from `RequestEncoder.batch(requests, generate=False)` holds prompt + reply with labels on
the reply only (the processor's training layout). Per sample: the sum of the log-probabilities of
its labelled tokens, and whether greedy decoding would have produced each of them.

    scores = reply_logprobs(module, batch)     # [(log p, is_greedy), ...], one per sample

Shapes: `input_ids`, `labels` (B, T); hidden states (B, T, D); only the N labelled positions are
projected to the vocabulary, (N, V), never the full (B, T, V).
"""

from __future__ import annotations

from typing import Any

import torch

from mm15.base.data.sample import IGNORE_INDEX
from mm15.base.module import MM15Module


@torch.no_grad()
def reply_logprobs(module: MM15Module, batch: dict[str, Any]) -> list[tuple[float, bool]]:
    model = module.model
    features = module.media_features(batch)  # the module's encoding: normalising, pooling (video SlowFast)
    embeds = model.embed(batch["input_ids"], media_features=features, layouts=batch.get("layouts"))
    hidden = model.llm.get_decoder()(inputs_embeds=embeds, attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]  # (B, T-1): the token each position predicts
    keep = targets != IGNORE_INDEX
    logits = model.llm.get_output_embeddings()(hidden[:, :-1][keep]).float()  # (N, V)
    wanted = targets[keep]
    logp = logits.log_softmax(-1).gather(1, wanted[:, None]).squeeze(1)  # (N,)
    missed = (logits.argmax(-1) != wanted).float()
    row = keep.nonzero()[:, 0]  # the sample of each labelled position
    size = targets.shape[0]
    totals = torch.zeros(size, device=logp.device).index_add_(0, row, logp)
    misses = torch.zeros(size, device=logp.device).index_add_(0, row, missed)
    return [(float(t), bool(m == 0)) for t, m in zip(totals.tolist(), misses.tolist())]
