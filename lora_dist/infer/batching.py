"""How inference feeds messages to the model, for `Classifier` and `MultiAdapterClassifier` alike.

    ids, truncated = tokenize(["see you at 6", "WINNER!!"], [spec.max_length] * 2)
    for rows, batch in plan(ids, [spec] * len(ids), batch_size=32):
        logits[rows] = model(batch.ids, batch.last)

Messages are tokenized as in training (`data.encode`), each cut to its own adapter's max_length, and the
number cut is returned to the caller (nothing is kept between calls: the service runs requests on threads).
Rows share a padded batch when padding changes nothing (`AdapterSpec.padding_free`), else per (pad length,
pad token), and with no pad length each row runs alone (`data.batch_plan`, longest first within a group).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..adapter import AdapterSpec
from ..data import Batch, Collate, batch_plan, encode


def tokenize(texts: list[str], max_lengths: Sequence[int]) -> tuple[list[list[int]], int]:
    """(token ids, how many messages were cut): message i cut to `max_lengths[i]` tokens."""
    if isinstance(texts, str):
        raise TypeError("pass a list of messages, not one string")
    ids: list[list[int]] = [[] for _ in texts]
    cut = 0
    for m in sorted(set(max_lengths)):  # each row tokenized once, with its own limit (data.encode bounds the work)
        rows = [i for i, n in enumerate(max_lengths) if n == m]
        got, n_cut = encode([texts[i] for i in rows], m)
        cut += n_cut
        for i, row in zip(rows, got, strict=True):
            ids[i] = row
    return ids, cut


def plan(
    ids: list[list[int]], specs: Sequence[AdapterSpec], batch_size: int, order: list[int] | None = None
) -> Iterator[tuple[list[int], Batch]]:
    """(row positions, Batch) over `ids`, row i read by the adapter `specs[i]`; inside a padding group rows go
    by `order` (an adapter's number: one run of rows per adapter in a batch), then longest first."""
    groups: list = []
    for i, s in enumerate(specs):
        groups.append(() if s.padding_free() else ((s.pad_to, s.pad_token_id) if s.pad_to else ("alone", i)))
    for rows in batch_plan([len(i) for i in ids], batch_size, groups, order):
        s = specs[rows[0]]
        yield rows, Collate(s.pad_token_id, s.pad_to)([(ids[i], 0) for i in rows])
