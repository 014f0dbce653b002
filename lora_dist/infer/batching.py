"""How inference feeds messages to the model, for `Classifier` and `MultiAdapterClassifier` alike.

    ids, truncated = tokenize(["see you at 6", "WINNER!!"], [spec.max_length] * 2)
    for rows, batch in plan(ids, [spec] * len(ids), batch_size=32):
        logits[rows] = model(batch.ids, batch.last)

Messages are tokenized as in training (`data.encode`), each cut to its own adapter's max_length, and the
number cut is returned to the caller (nothing is kept between calls: the service runs requests on threads).
Rows share a padded batch when padding changes nothing (`AdapterSpec.padding_free`), else per (pad length,
pad token), and with no pad length each row runs alone (`data.batch_plan`, longest first within a group).
A shared batch's length is rounded up to a multiple of `PAD_MULTIPLE` tokens (at most the adapter's
max_length): padding changes nothing there, and a bounded set of shapes keeps the process's memory flat
over a long `classify --file` (the CPU allocator and oneDNN keep memory per shape: 60,000 messages took
1,227 MB with a shape per length, 506 MB with multiples of 16; tiny model).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from ..adapter import AdapterSpec
from ..data import Batch, Collate, batch_plan, encode

PAD_MULTIPLE = 16  # tokens; only for rows whose adapter reads them padding-free


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
        multiple = PAD_MULTIPLE if s.padding_free() and not s.pad_to else 1
        yield rows, Collate(s.pad_token_id, s.pad_to, multiple, cap=s.max_length)([(ids[i], 0) for i in rows])
