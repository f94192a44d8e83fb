"""`packed_sdpa`: SDPA that runs each packed sample on its own, for packed rows on CPU (and anywhere
flash-attention is missing).

With packed rows (`mm15.base.data.packing`) the LLM's own SDPA path builds a block-diagonal causal
mask over the whole row and attends over all of it: the cost grows with the square of the row
length, which on CPU can cost more than the padding it saves. flash-attention's varlen kernels
(`attn_implementation: flash_attention_2`, CUDA) avoid that; `packed_sdpa` does the same with
PyTorch's SDPA: it reads the sample boundaries from the position ids (a restart at 0 starts a
sample, as transformers' packed-sequence detection reads them) and runs causal SDPA on each
sample, so the cost is the sum of the squared sample lengths, as for the padded batch minus its
padding. Rows without restarts (padded batches: validation, generation) go through transformers'
SDPA with their mask, unchanged.

    llm: {attn_implementation: packed_sdpa}   # in a model spec (configs/base/demo_packed.yaml)

Registered with transformers' `AttentionInterface` (and its mask interface, as SDPA's) on import of
`mm15.base.model`.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

NAME = "packed_sdpa"


def segments(position_ids: torch.Tensor) -> list[list[tuple[int, int]]] | None:
    """Per row, the (start, end) of each sample (positions restarting at 0); None when no row
    holds more than one sample."""
    starts = position_ids == 0
    starts[:, 0] = True
    rows, length = position_ids.shape
    if int(starts.sum()) == rows:
        return None
    begin: list[list[int]] = [[] for _ in range(rows)]
    for r, c in starts.nonzero().tolist():  # one (row, column) per sample, not per token
        begin[r].append(c)
    return [list(zip(b, b[1:] + [length])) for b in begin]


def packed_sdpa_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                        **kwargs: Any) -> tuple[torch.Tensor, None]:
    """query (B, H, T, d), key / value (B, H_kv, T, d) -> (B, T, H, d), as transformers' SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    parts = None
    if position_ids is not None and query.shape[2] == key.shape[2] and query.shape[2] > 1:
        parts = segments(position_ids.expand(query.shape[0], -1))
    if parts is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    gqa = query.shape[1] != key.shape[1]
    p = dropout if module.training else 0.0
    rows = []
    for b, row in enumerate(parts):
        pieces = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                 dropout_p=p, is_causal=True, scale=scaling, enable_gqa=gqa)
                  for s, e in row]
        rows.append(torch.cat(pieces, dim=2))
    return torch.cat(rows, dim=0).transpose(1, 2).contiguous(), None


def register() -> None:
    """Make `attn_implementation: packed_sdpa` known to transformers (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    ALL_MASK_ATTENTION_FUNCTIONS.register(NAME, sdpa_mask)
