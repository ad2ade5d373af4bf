"""Packing bars (and their pair views) into the rows of a :class:`~musicbert.batch.Batch`.

A *unit* is what must land in one batch: a masked anchor bar and, in the contrastive modes,
its positive view. :class:`Packer` keeps a window (pool) of units and makes each batch by
filling each row as full as possible with an exact subset-sum over the pool's oldest units
(see :meth:`Packer._place`); a unit that does not fit waits in the pool for a later batch.
Units that have waited ``max_age`` batches go first, so none waits for ever. With a pool of
a few batches' worth of bars this fills about 99% of the positions (bars are 30..512
tokens, rows 1024). A row looks at no more than :data:`LOOKAHEAD_ROWS` rows' worth of
units, however large the pool, so packing costs the same per token at 12 rows per batch
as at 96 (``bench/packing.py``).

Everything here is deterministic: the same units added in the same order give the same
batches, which is what makes the training stream exactly resumable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TypeVar

import numpy as np
import torch

from musicbert.batch import Batch
from musicbert.vocab import VOCAB

T = TypeVar("T")

#: A row's subset-sum chooses among the oldest units of the pool that add up to this many
#: rows' worth of tokens: so a row costs the same however many rows a batch has (and its
#: pool), and rows still fill to ~99% -- a little better than choosing among the whole
#: pool, which lets young units jump ahead and more old ones fall due (bench/packing.py).
LOOKAHEAD_ROWS = 4


@dataclass
class Piece:
    """One bar as it enters the model."""

    tokens: np.ndarray  # 1-D input ids (the masked view for anchors)
    chosen: np.ndarray | None = None  # bool, positions whose original id is an MLM target (anchors only)
    original: np.ndarray | None = None  # the unmasked ids (targets are original[chosen])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


@dataclass
class Unit:
    """An anchor and its optional positive view: both go into the same batch."""

    anchor: Piece
    positive: Piece | None = None
    key: tuple[int, ...] = ()  # where it came from (the training stream's state records it)
    age: int = 0  # batches it has waited in the pool
    size: int = field(init=False)

    def __post_init__(self) -> None:
        self.size = len(self.anchor) + (len(self.positive) if self.positive is not None else 0)


def _best_fit(free: np.ndarray, n: int) -> int:
    """The fullest row with room for ``n`` tokens (lowest index on ties), or -1."""
    room = np.where(free >= n, free, np.iinfo(np.int64).max)
    r = int(np.argmin(room))
    return r if free[r] >= n else -1


def subset_sum(items: Iterable[T], cap: int, size: Callable[[T], int] = int) -> list[T]:
    """A subset of ``items`` whose ``size`` sum is the largest <= ``cap``; earlier items preferred.

    ``items`` is read lazily and only until some prefix of it fills ``cap`` exactly, so a
    long iterable costs only the items needed. The chosen items come last-first.
    """
    if cap <= 0:
        return []
    mask = (1 << (cap + 1)) - 1
    seen: list[T] = []
    reach = [1]  # reach[i]: bit t set <=> some subset of the first i items sums to t
    r = 1
    for item in items:
        seen.append(item)
        r = (r | (r << size(item))) & mask
        reach.append(r)
        if (r >> cap) & 1:
            break
    t = r.bit_length() - 1
    chosen = []
    for i in range(len(reach) - 2, -1, -1):
        if t == 0:
            break
        if not (reach[i] >> t) & 1:  # t needs item i
            chosen.append(seen[i])
            t -= size(seen[i])
    return chosen


class Packer:
    """Pool of units -> batches of ``n_rows`` x ``row_len``.

    ``window_tokens`` is how many tokens the caller keeps in the pool before each batch
    (see :meth:`wants_more`); more gives tighter packing at the cost of memory and delay.
    """

    def __init__(
        self,
        n_rows: int,
        row_len: int,
        window_tokens: int | None = None,
        max_age: int | None = None,
        pad_id: int = VOCAB.pad_id,
    ):
        if n_rows < 1 or row_len < 1:
            raise ValueError(f"need at least one row of at least one token, got {n_rows} x {row_len}")
        self.n_rows = n_rows
        self.row_len = row_len
        # Three batches' worth of tokens, and at least 32 rows' worth so that small batches
        # still choose among enough bars; units wait about window / batch batches on average.
        self.window_tokens = window_tokens if window_tokens is not None else max(3 * n_rows * row_len, 32 * row_len)
        self.max_age = max_age if max_age is not None else 4 * math.ceil(self.window_tokens / (n_rows * row_len))
        self.pad_id = pad_id
        self.pool: list[Unit] = []
        self.pool_tokens = 0

    def wants_more(self) -> bool:
        return self.pool_tokens < self.window_tokens

    def add(self, unit: Unit) -> None:
        # A piece longer than a row could never be placed; cut it (bars are at most 512
        # tokens and rows at least model.max_len, so this only happens with odd settings).
        for piece in (unit.anchor, unit.positive):
            if piece is not None and len(piece) > self.row_len:
                piece.tokens = piece.tokens[: self.row_len]
                if piece.chosen is not None:
                    piece.chosen = piece.chosen[: self.row_len]
                    piece.original = piece.original[: self.row_len]
        unit.__post_init__()
        self.pool.append(unit)
        self.pool_tokens += unit.size

    def __len__(self) -> int:
        return len(self.pool)

    def _place(self) -> list[tuple[int, int, int | None]]:
        """Choose the batch: ``(unit index, anchor row, positive row or None)`` per placed unit.

        1. Rows are filled one by one, each as full as possible: first with the pieces that
           are due (those of units that have waited ``max_age`` batches or are longer than a
           row, then partners of pieces in earlier rows), then with an exact subset-sum (a
           bitset dynamic programme) over the pieces of the oldest units not yet placed
           (:data:`LOOKAHEAD_ROWS` rows' worth), older units preferred among equally good
           fills. A piece chosen without its partner makes the partner due; in the last row
           a piece goes alone only if its partner fits into another row's gap.
        2. A due piece that finds no room takes its unit out again; remaining gaps take any
           unit whose pieces fit into them (best fit, largest first).
        """
        plan = _Placement(self.pool, self.n_rows, self.row_len, self.max_age)
        for r in range(self.n_rows):
            plan.fill_row(r)
        plan.place_leftover_due()
        plan.fill_gaps()
        placed = [(i, r, plan.row_of.get((i, 1))) for (i, k), r in plan.row_of.items() if k == 0]
        if not placed and self.pool:
            # Only possible when one unit is larger than the whole batch (a single row shorter
            # than anchor + positive): send its anchor alone rather than stall.
            self.pool[plan.by_size[0]].positive = None
            placed.append((plan.by_size[0], 0, None))
        return placed

    def next_batch(self) -> Batch:
        """Pack a batch from the pool; units left over wait (age + 1). An empty pool gives an empty batch."""
        placed = self._place()
        rows: list[list[tuple[Piece, int]]] = [[] for _ in range(self.n_rows)]  # (piece, pair id or -1)
        for pair_id, (i, ra, rp) in enumerate(placed):
            unit = self.pool[i]
            has_pair = rp is not None
            rows[ra].append((unit.anchor, pair_id if has_pair else -1))
            if has_pair:
                rows[rp].append((unit.positive, -2 - pair_id))
        batch = self._build(rows, len(placed))
        taken = {i for i, _, _ in placed}
        rest = [u for k, u in enumerate(self.pool) if k not in taken]
        for u in rest:
            u.age += 1
        self.pool = rest
        self.pool_tokens = sum(u.size for u in rest)
        return batch

    def _build(self, rows: list[list[tuple[Piece, int]]], n_units: int) -> Batch:
        R, L = self.n_rows, self.row_len
        tokens = np.full((R, L), self.pad_id, dtype=np.int64)
        segments = np.zeros((R, L), dtype=np.int64)
        mlm_mask = np.zeros((R, L), dtype=bool)
        originals = np.zeros((R, L), dtype=np.int64)
        anchor_bar = np.full(n_units, -1, dtype=np.int64)
        positive_bar = np.full(n_units, -1, dtype=np.int64)
        bar = 0
        for r, pieces in enumerate(rows):
            col = 0
            for seg, (piece, tag) in enumerate(pieces, start=1):
                n = len(piece)
                tokens[r, col : col + n] = piece.tokens
                segments[r, col : col + n] = seg
                if piece.chosen is not None:
                    mlm_mask[r, col : col + n] = piece.chosen
                    originals[r, col : col + n] = piece.original
                if tag >= 0:
                    anchor_bar[tag] = bar
                elif tag <= -2:
                    positive_bar[-2 - tag] = bar
                col += n
                bar += 1
        paired = positive_bar >= 0
        return Batch(
            tokens=torch.from_numpy(tokens),
            segments=torch.from_numpy(segments),
            mlm_mask=torch.from_numpy(mlm_mask),
            mlm_targets=torch.from_numpy(originals[mlm_mask]),
            pair_anchor=torch.from_numpy(anchor_bar[paired]),
            pair_positive=torch.from_numpy(positive_bar[paired]),
        )


def pack_bars(lengths: Sequence[int], row_len: int, rows_per_batch: int) -> list[list[list[int]]]:
    """Batches of rows of bar numbers: first-fit decreasing, at most ``rows_per_batch`` rows of ``row_len``.

    For inference (evaluation, embeddings), where bars have no pair views and no stream
    state: every bar is placed once, longest first.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[list[int]]] = []
    rows: list[list[int]] = []
    free = np.zeros(0, dtype=np.int64)
    for i in order:
        n = lengths[i]
        fits = np.flatnonzero(free >= n)
        if fits.size:
            r = int(fits[0])
        elif len(rows) < rows_per_batch:
            rows.append([])
            free = np.append(free, row_len)
            r = len(rows) - 1
        else:
            batches.append(rows)
            rows, free = [[]], np.array([row_len], dtype=np.int64)
            r = 0
        rows[r].append(i)
        free[r] -= n
    if rows:
        batches.append(rows)
    return batches


def empty_batch(n_rows: int, row_len: int, pad_id: int = VOCAB.pad_id) -> Batch:
    """A batch with no bars (all ``<pad>``): what a rank whose validation share ran out yields."""
    return Packer(n_rows, row_len, pad_id=pad_id)._build([[] for _ in range(n_rows)], 0)


class _Placement:
    """The state of one :meth:`Packer._place`: rows' free room and where each piece went.

    A piece is ``(unit index, k)`` with ``k`` 0 for the anchor and 1 for the positive.
    """

    def __init__(self, pool: list[Unit], n_rows: int, row_len: int, max_age: int):
        self.pool, self.L, self.R = pool, row_len, n_rows
        self.free = np.full(n_rows, row_len, dtype=np.int64)
        self.row_of: dict[tuple[int, int], int] = {}  # (unit, 0 = anchor / 1 = positive) -> row
        self.sizes = [(len(u.anchor),) if u.positive is None else (len(u.anchor), len(u.positive)) for u in pool]
        self.n_in = [0] * len(pool)  # pieces of each unit placed so far
        self.by_size = sorted(range(len(pool)), key=lambda i: (-pool[i].size, i))
        by_age = sorted(range(len(pool)), key=lambda i: (-pool[i].age, i))
        # Pieces that must go in: those of old (oldest first) or oversized units, then partners of placed pieces.
        is_due = [u.age >= max_age or u.size > row_len for u in pool]
        self.due = [(i, k) for i in by_age if is_due[i] for k in range(len(self.sizes[i]))]
        # The units a row's subset-sum may choose from, oldest first; placed ones are dropped as rows fill.
        self.candidates = [i for i in by_age if not is_due[i]]
        self.lookahead = LOOKAHEAD_ROWS * row_len

    def put(self, i: int, k: int, r: int) -> None:
        self.row_of[(i, k)] = r
        self.n_in[i] += 1
        self.free[r] -= self.sizes[i][k]

    def take_out(self, i: int, k: int) -> None:
        self.free[self.row_of.pop((i, k))] += self.sizes[i][k]
        self.n_in[i] -= 1

    def fit_unit(self, i: int) -> bool:
        """Place every piece of unit ``i`` (best fit each), or none of them."""
        rows = []
        for k, n in enumerate(self.sizes[i]):
            r = _best_fit(self.free, n)
            if r < 0:
                for k2, r2 in enumerate(rows):
                    self.free[r2] += self.sizes[i][k2]
                return False
            self.free[r] -= n
            rows.append(r)
        for k, r in enumerate(rows):
            self.row_of[(i, k)] = r
        self.n_in[i] = len(rows)
        return True

    def offers(self, cap: int, last: bool, room_elsewhere: int) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
        """``(position in candidates, size, pieces)`` of what may go into a row with ``cap`` free tokens."""
        seen = 0
        for pos, i in enumerate(self.candidates):
            if seen >= self.lookahead:
                return
            if self.n_in[i]:  # placed, or placed in part with its other piece due
                continue
            seen += self.pool[i].size
            n = self.sizes[i]
            if len(n) == 1:
                if n[0] <= cap:
                    yield pos, n[0], [(i, 0)]
                continue
            if last and n[0] + n[1] <= cap:
                yield pos, n[0] + n[1], [(i, 0), (i, 1)]
            for k in (0, 1):
                if n[k] <= cap and (not last or n[1 - k] <= room_elsewhere):
                    yield pos, n[k], [(i, k)]

    def fill_row(self, r: int) -> None:
        """Row ``r``: the due pieces that fit, then the best subset-sum of the candidates."""
        later = []
        for i, k in self.due:
            if self.sizes[i][k] <= self.free[r]:
                self.put(i, k, r)
            else:
                later.append((i, k))
        self.due = later
        last = r == self.R - 1
        # In the last row, a piece goes alone only if its partner fits into another row's gap.
        room_elsewhere = int(np.delete(self.free, r).max()) if last and self.R > 1 else self.L
        cap = int(self.free[r])
        chosen = subset_sum(self.offers(cap, last, room_elsewhere), cap, size=itemgetter(1))
        for _, _, pieces in chosen:
            for i, k in pieces:
                self.put(i, k, r)
        for _, _, pieces in chosen:
            for i, k in pieces:
                if len(self.sizes[i]) == 2 and (i, 1 - k) not in self.row_of:
                    self.due.append((i, 1 - k))
        # Placed units leave the candidates (all of them lie before the last chosen one).
        end = max((pos + 1 for pos, _, _ in chosen), default=0)
        self.candidates[:end] = [i for i in self.candidates[:end] if not self.n_in[i]]

    def place_leftover_due(self) -> None:
        """Due pieces still without a row go where they fit best, or take their unit out."""
        for i, k in self.due:
            r = _best_fit(self.free, self.sizes[i][k])
            if r >= 0:
                self.put(i, k, r)
            elif (i, 1 - k) in self.row_of:  # take the unit out again
                self.take_out(i, 1 - k)
        # Units of which one piece found room and the other did not (both were due).
        for i, k in [key for key in self.row_of if len(self.sizes[key[0]]) == 2 and self.n_in[key[0]] == 1]:
            self.take_out(i, k)

    def fill_gaps(self) -> None:
        """Remaining gaps take any unit whose pieces fit (best fit, largest unit first)."""
        smallest = min((self.sizes[i][0] for i in range(len(self.pool)) if not self.n_in[i]), default=self.L + 1)
        gap = int(self.free.max())
        for i in self.by_size:
            if gap < smallest:
                break
            if not self.n_in[i] and max(self.sizes[i]) <= gap and self.fit_unit(i):  # a piece larger than every gap cannot fit
                gap = int(self.free.max())
