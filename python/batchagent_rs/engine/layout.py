"""The layout of one engine step: what the scheduler hands the model runner, once per step.

A step packs the new tokens of every scheduled sequence into one flat batch, no padding: a
sequence in prefill contributes a chunk of its prompt, a decoding one its newest token. Each
sequence's KV lives in pages of `page_size` tokens of the paged cache, listed in order by its row
of `block_tables`; `slot_mapping` says where each new token's K and V go
(``page * page_size + offset``). A sequence's new tokens are the last ``query_lens[i]`` of its
``context_lens[i]`` tokens, so they attend causally to everything before them in the cache: the
attention mask over the packed batch is block-diagonal and causal, and cached prefix pages
(shared between sequences by block hash) are simply listed in several block tables.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch


@dataclass
class StepLayout:
    input_ids: torch.Tensor  # [tokens] int64: the new tokens, sequence after sequence
    positions: torch.Tensor  # [tokens] int64: each token's position in its sequence
    query_starts: torch.Tensor  # [seqs + 1] int64: sequence i's tokens are input_ids[starts[i]:starts[i+1]]
    context_lens: (
        torch.Tensor
    )  # [seqs] int64: tokens in the cache for sequence i once this step's are written
    block_tables: torch.Tensor  # [seqs, max_pages] int32: sequence i's pages, in order
    slot_mapping: torch.Tensor  # [tokens] int64: cache slot of each new token

    @property
    def num_seqs(self) -> int:
        return int(self.query_starts.shape[0]) - 1

    def validate(self, page_size: int, num_pages: int) -> None:
        """Raises ValueError naming the first inconsistency (a scheduler bug, not user input)."""
        t = self.input_ids.shape[0]
        if self.positions.shape[0] != t or self.slot_mapping.shape[0] != t:
            raise ValueError(f"input_ids, positions and slot_mapping must have one entry per token ({t})")
        if self.context_lens.shape[0] != self.num_seqs or self.block_tables.shape[0] != self.num_seqs:
            raise ValueError(f"context_lens and block_tables need one row per sequence ({self.num_seqs})")
        starts = self.query_starts.tolist()
        if starts[0] != 0 or starts[-1] != t or any(b < a for a, b in itertools.pairwise(starts)):
            raise ValueError(f"query_starts must rise from 0 to {t}: {starts}")
        for i, ctx in enumerate(self.context_lens.tolist()):
            n = starts[i + 1] - starts[i]
            if n == 0 or ctx < n:
                raise ValueError(f"sequence {i}: {n} new tokens with a context of {ctx}")
            if (ctx + page_size - 1) // page_size > self.block_tables.shape[1]:
                raise ValueError(f"sequence {i}: context {ctx} needs more pages than its block table holds")
            want = torch.arange(ctx - n, ctx)
            if not torch.equal(self.positions[starts[i] : starts[i + 1]].cpu(), want):
                raise ValueError(f"sequence {i}: positions must be {ctx - n}..{ctx - 1}")
            pages = self.block_tables[i, (want // page_size)].long().cpu()
            if not torch.equal(
                self.slot_mapping[starts[i] : starts[i + 1]].cpu(), pages * page_size + want % page_size
            ):
                raise ValueError(f"sequence {i}: slot_mapping disagrees with its block table")
        used = self.block_tables.long()
        if used.numel() and (used.min() < 0 or used.max() >= num_pages):
            raise ValueError(f"block_tables must hold page ids in 0..{num_pages - 1}")
