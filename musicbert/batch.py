"""The batch one rank feeds the model in one step: bars packed end to end into rows.

Packing is what lets training skip padding: a row of length ``L`` holds several bars,
attention is kept inside each bar (``segments``), and positions restart at 0 for every
bar. A batch with one bar per row and ``<pad>`` after it is the unpacked special case.

Bars are numbered in row-major order of their first token (the ``Bar_0`` token):
the model returns bar states in that order and ``pair_anchor`` / ``pair_positive`` index it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    tokens: torch.Tensor  # int64 [R, L]: input ids (masked view where masked), <pad> after the last bar
    segments: torch.Tensor  # int64 [R, L]: 1..k numbers the bars of a row, 0 on padding
    mlm_mask: torch.Tensor  # bool [R, L]: positions whose original token is to be predicted
    mlm_targets: torch.Tensor  # int64 [M]: original ids at mlm_mask, row-major order (M = mlm_mask.sum())
    pair_anchor: torch.Tensor  # int64 [P]: bar index of each pair's masked anchor (P = 0 in mode BERT)
    pair_positive: torch.Tensor  # int64 [P]: bar index of each pair's positive view

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return Batch(**{f.name: getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> "Batch":
        """Called by ``DataLoader(pin_memory=True)`` on custom batch types."""
        return Batch(**{f.name: getattr(self, f.name).pin_memory() for f in fields(self)})

    @property
    def n_bars(self) -> int:
        return int(self.bar_starts().shape[0])

    @property
    def n_real_tokens(self) -> int:
        return int((self.segments > 0).sum())

    @property
    def padding_efficiency(self) -> float:
        """Share of computed positions that hold real tokens."""
        return self.n_real_tokens / max(1, self.segments.numel())

    def bar_starts(self) -> torch.Tensor:
        """``[n_bars, 2]`` (row, column) of each bar's first token, in bar order."""
        seg = self.segments
        prev = torch.nn.functional.pad(seg[:, :-1], (1, 0), value=0)
        return torch.nonzero((seg > 0) & (seg != prev))
