"""Which process speaks for a job: the one place that compares a rank with 0 (training's `train/tracking.py`
asks it too), and the output object inference gets from it.

    out = rank_zero.output_for(env.rank)
    out.note("note: ...")                 # one line on stderr, from rank 0 only
    parts = out.gather(my_part)           # every rank calls it; rank 0 gets every rank's part, the others None
    if out.speaks: ...                    # rank 0's own output (the file it writes, its progress)

A launcher's process group must be up for `gather` across ranks (`device.init_process_group`); a single
process gathers its own part.
"""

from __future__ import annotations

import sys
from typing import Any

import torch.distributed as dist


def is_rank_zero(rank: int) -> bool:
    """Whether a process of this global rank prints, writes files and talks to W&B for its job."""
    return rank == 0


class RankZeroOutput:
    """Rank 0's: it prints, and it collects what every rank computed."""

    speaks = True

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def gather(self, obj: Any) -> list[Any] | None:
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return [obj]
        parts: list[Any] = [None] * dist.get_world_size()
        dist.gather_object(obj, parts, dst=0)
        return parts


class OtherRankOutput:
    """Every other rank's: the same methods; it sends its part to rank 0 and prints nothing."""

    speaks = False

    def note(self, text: str) -> None:
        pass

    def gather(self, obj: Any) -> list[Any] | None:
        dist.gather_object(obj, None, dst=0)
        return None


def output_for(rank: int) -> RankZeroOutput | OtherRankOutput:
    return RankZeroOutput() if is_rank_zero(rank) else OtherRankOutput()
