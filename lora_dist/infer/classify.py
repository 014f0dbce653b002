"""`lora-dist classify`: label new messages with a trained adapter, from the shell.

    lora-dist classify --adapter runs/smoke "WINNER!! Claim your prize" "see you at 6"
    lora-dist classify --adapter runs/smoke --file messages.txt                 # one message per line
    lora-dist classify --adapter runs/smoke --file data.csv --text-column text --jsonl --out predictions.jsonl
    lora-dist classify --adapter runs/smoke --file data.parquet --text-column body --jsonl --out predictions.jsonl
    cat messages.txt | lora-dist classify --adapter runs/smoke -
    torchrun --nproc_per_node=8 -m lora_dist classify --adapter runs/smoke --file big.csv --out out.jsonl

Under torchrun the input is cut into rounds of `--shard-size` messages per rank; rank 0 gathers each
round and writes it, in input order, exactly once (to a temporary file renamed into place at the end).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import pandas as pd
from tqdm import tqdm

from ..config import DataConfig, DistConfig
from ..device import PRECISIONS, DistEnv, init_process_group, leave_process_group, pick_device, precision_note
from ..errors import UserError
from ..files import OutFile
from ..rank_zero import OtherRankOutput, RankZeroOutput, output_for
from ..token_cache import FORMATS, read_chunks
from .classifier import Classifier, results


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("texts", nargs="*", help='messages to classify; "-" reads them from stdin, one per line')
    p.add_argument("--adapter", required=True, help="a training run, its adapter/ directory, or a PEFT export")
    p.add_argument(
        "--file", help="a text file (one message per line), or a CSV, TSV, JSONL or Parquet file (see --text-column)"
    )
    p.add_argument(
        "--text-column", default="text", help="the CSV/TSV/JSONL/Parquet column that holds the messages (default: text)"
    )
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print a JSON list")
    fmt.add_argument("--jsonl", action="store_true", help="print one JSON object per line")
    p.add_argument("--out", help="write the output to this file instead of stdout")
    p.add_argument("--batch-size", type=int, default=32, help="messages per forward pass (default: 32)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument(
        "--precision",
        default="fp32",
        choices=PRECISIONS,
        help="fp32 (default): what transformers and the exports compute; auto: bf16 where the hardware runs it "
        "natively (faster; probabilities move by up to about 1e-2), else fp32",
    )
    p.add_argument(
        "--merge", action="store_true", help="fold LoRA into the base weights first (faster; the same outputs to ~1e-6)"
    )
    p.add_argument("--base", help="a directory holding the adapter's base weights, if not where training found them")
    p.add_argument(
        "--labels", help="names for the classes of an adapter that has none (LABEL_0, LABEL_1, ...), e.g. ham,spam"
    )
    p.add_argument("--shard-size", type=int, default=4096, help="messages per rank per round under torchrun")
    p.add_argument(
        "--timeout-s",
        type=float,
        default=DistConfig.timeout_s,
        help=f"under torchrun, how long a rank waits for the others (default: {DistConfig.timeout_s}, as dist.timeout_s)",
    )


def main(args: argparse.Namespace) -> int:
    _check_arguments(args)
    chunks = read_texts(args)
    first = next(chunks, None)  # a missing file or column fails here, before the model is loaded
    env = DistEnv.from_environ()
    device = pick_device(args.device, env.local_rank, key="--device")
    clf = Classifier.from_pretrained(
        args.adapter, device=device, precision=args.precision, merge=args.merge, base=args.base, labels=args.labels
    )
    fmt = "json" if args.json else "jsonl" if args.jsonl else "table"
    spread = env.world_size > 1
    if spread:
        init_process_group(device, args.timeout_s, env=env)
    out = output_for(env.rank)  # rank 0 prints, writes and gathers; the others compute their share
    note = precision_note(args.precision, clf.precision, clf.device)
    if note:
        out.note(note)
    sink = Writer(args.out, fmt, clf.labels, None if note is None else clf.precision) if out.speaks else None
    try:
        texts = itertools.chain([first] if first is not None else [], chunks)
        truncated, empty = _classify_rounds(clf, args, env, out, sink, texts)
        _finish(clf, args, out, sink, truncated, empty)
    finally:
        if sink is not None:
            sink.abort()
        if spread:
            leave_process_group(barrier=False)
    return 0


def _check_arguments(args: argparse.Namespace) -> None:
    if args.batch_size < 1 or args.shard_size < 1:
        raise UserError("--batch-size and --shard-size must be >= 1")
    if not (math.isfinite(args.timeout_s) and args.timeout_s > 0):
        raise UserError(f"--timeout-s must be a finite number of seconds > 0; got {args.timeout_s}")


def _classify_rounds(
    clf: Classifier,
    args: argparse.Namespace,
    env: DistEnv,
    out: RankZeroOutput | OtherRankOutput,
    sink: Writer | None,
    chunks: Iterator[list[str]],
) -> tuple[int, int]:
    """Every message of `chunks`, in rounds of world size x --shard-size (memory holds one round, whatever the
    input): each rank classifies its slice, rank 0 gathers and writes the round in input order. Returns this
    rank's count of truncated messages, and (rank 0) the count of empty ones."""
    truncated = empty = 0
    progress = Progress(enabled=out.speaks and bool(args.file))
    size = args.shard_size
    for texts in rounds(chunks, env.world_size * size):
        mine = texts[env.rank * size : (env.rank + 1) * size]
        probs = None
        if mine:
            ids, cut = clf.tokenize(mine)
            probs = clf.logits_of(ids, args.batch_size, progress=False).softmax(-1)
            truncated += cut
        parts = out.gather(probs)
        if sink is not None and parts is not None:
            done = 0
            for p in parts:  # rank order is input order: rank r holds the r-th slice of this round
                if p is not None:
                    sink.write(results(texts[done : done + len(p)], p, clf.labels))
                    done += len(p)
            empty += sum(1 for t in texts if not t.strip())
            progress.update(len(texts))
    progress.close()
    return truncated, empty


def _finish(
    clf: Classifier,
    args: argparse.Namespace,
    out: RankZeroOutput | OtherRankOutput,
    sink: Writer | None,
    truncated: int,
    empty: int,
) -> None:
    """Rank 0 commits the output and says what was truncated, empty and written (every rank takes part in the
    gathering of the truncation counts)."""
    counts = out.gather(truncated)
    if sink is None or counts is None:
        return
    sink.close()
    if sum(counts):
        out.note(
            f"note: {sum(counts)} message(s) longer than {clf.spec.max_length} tokens were truncated to it, "
            f"as in training"
        )
    if empty:
        out.note(f"note: {empty} message(s) were empty or whitespace only; they were classified as they are")
    if args.out:
        out.note(f"written: {args.out} ({sink.count} messages)")


def rounds(chunks: Iterator[list[str]], n: int) -> Iterator[list[str]]:
    """The messages of `chunks` again, cut into lists of `n` (the last may be shorter)."""
    held: list[str] = []
    for chunk in chunks:
        held += chunk
        while len(held) >= n:
            yield held[:n]
            held = held[n:]
    if held:
        yield held


class Progress:
    """Rank 0's progress on stderr for --file: a bar on a terminal, else a line every 30 s (as in a Slurm log)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled, self.count, self.t0 = enabled, 0, time.monotonic()
        self.last = self.t0
        tty = enabled and sys.stderr.isatty()
        self.bar = tqdm(unit="msg", file=sys.stderr, dynamic_ncols=True, leave=False) if tty else None

    def update(self, n: int) -> None:
        self.count += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and time.monotonic() - self.last >= 30:
            self.last = time.monotonic()
            rate = self.count / (self.last - self.t0)
            print(f"classify: {self.count:,} messages ({rate:,.0f} messages/s)", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------- input

CHUNK = 65_536  # messages read from --file at a time
BLOCK = 1 << 22  # bytes read at a time from a text --file


def read_texts(args: argparse.Namespace) -> Iterator[list[str]]:
    """The messages to classify, a chunk at a time: the arguments, stdin ("-"), then --file."""
    texts = list(args.texts)
    if not texts and not args.file:
        raise UserError('nothing to classify; give messages as arguments, --file FILE, or "-" to read stdin')
    if args.file and not Path(args.file).is_file():
        raise UserError(f"--file {args.file} not found; pass an existing text, CSV, TSV, JSONL or Parquet file")
    return _chunks(args, texts)


def _chunks(args: argparse.Namespace, texts: list[str]) -> Iterator[list[str]]:
    if "-" in texts:
        texts.remove("-")
        texts += _lines(sys.stdin.buffer.read(), "stdin")
    if texts:
        yield texts
    if args.file:
        yield from _from_file(Path(args.file), args.text_column)


def _decode(raw: bytes, source: str, line: int = 0) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line += raw[: e.start].count(b"\n") + 1
        raise UserError(
            f"{source} is not UTF-8 (bad byte at line {line}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from e


def _lines(raw: bytes, source: str) -> list[str]:
    return _decode(raw, source).splitlines()


def _from_file(path: Path, column: str) -> Iterator[list[str]]:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt in ("jsonl", "parquet"):  # read as training reads them (token_cache), the text column only
        for _, texts, _ in read_chunks(path, fmt, DataConfig(text_column=column), CHUNK, texts_only=True):
            yield texts
        return
    if path.suffix.lower() not in (".csv", ".tsv", ".tab"):
        yield from _text_lines(path)
        return
    sep = "," if path.suffix.lower() == ".csv" else "\t"
    kind = "CSV" if sep == "," else "TSV"
    try:
        with pd.read_csv(
            path, sep=sep, dtype=str, keep_default_na=False, encoding="utf-8-sig", chunksize=CHUNK
        ) as reader:
            for frame in reader:
                if column not in frame.columns:
                    raise UserError(
                        f"{path} has no column {column!r} (found {list(frame.columns)}); pass --text-column NAME"
                    )
                yield frame[column].tolist()
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
        raise UserError(
            f"{path} is not a well-formed {kind} file "
            f"({str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__}); "
            f"quote fields that hold the separator"
        ) from e
    except UnicodeDecodeError:
        line = next((n for n, raw in enumerate(open(path, "rb"), 1) if not _utf8(raw)), 1)
        raise UserError(
            f"{path} is not UTF-8 (bad byte at line {line}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from None


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _text_lines(path: Path) -> Iterator[list[str]]:
    """One message per line (as str.splitlines cuts them), read 4 MiB at a time, CHUNK lines a list."""
    with open(path, "rb") as f:
        line, tail = 0, b""
        while True:
            block = f.read(BLOCK)
            data = tail + block
            if block:
                cut = max(data.rfind(b"\n"), data.rfind(b"\r"))
                if cut == len(data) - 1 and data.endswith(b"\r"):  # perhaps the first half of a \r\n
                    cut = max(data.rfind(b"\n", 0, cut), data.rfind(b"\r", 0, cut))
                if cut == -1:
                    if len(data) > 1 << 26:
                        raise UserError(f"{path} has a line over 64 MiB after line {line}; one message per line")
                    tail = data
                    continue
                head, tail = data[: cut + 1], data[cut + 1 :]
            else:
                head, tail = data, b""
            text = _decode(head, str(path), line)
            lines = text.splitlines()
            line += head.count(b"\n")
            for s in range(0, len(lines), CHUNK):
                yield lines[s : s + CHUNK]
            if not block:
                return


# -------------------------------------------------------------------------------------------- output


class Writer:
    """Rank 0's output: a table, a JSON list or JSON lines, to stdout or to a file renamed into place. Rows
    computed below fp32 say so: `"precision": "bf16"`."""

    def __init__(self, out: str | None, fmt: str, labels: list[str], precision: str | None = None) -> None:
        self.fmt, self.labels, self.count, self.precision = fmt, labels, 0, precision
        self.out = OutFile(out) if out else None  # files.OutFile: atomic for a regular file, else written into
        self.stream: TextIO | OutFile = self.out if self.out is not None else sys.stdout
        if fmt == "json":
            self.stream.write("[")
        elif fmt == "table":
            width = max(5, *(len(x) for x in labels))
            self.width = width
            self.stream.write(f"{'#':>6}  {'label':<{width}}  {'prob':>6}  text\n")

    def write(self, rows: list[dict]) -> None:
        for r in rows:
            if self.precision is not None:
                r = {**r, "precision": self.precision}
            if self.fmt == "jsonl":
                self.stream.write(json.dumps(r, ensure_ascii=False) + "\n")
            elif self.fmt == "json":
                self.stream.write(("," if self.count else "") + "\n  " + json.dumps(r, ensure_ascii=False))
            else:
                text = " ".join(r["text"].split())
                text = text if len(text) <= 70 else text[:67] + "..."
                self.stream.write(
                    f"{self.count + 1:>6}  {r['label']:<{self.width}}  {r['probs'][r['label']]:>6.3f}  {text}\n"
                )
            self.count += 1

    def close(self) -> None:
        if self.fmt == "json":
            self.stream.write("\n]\n" if self.count else "]\n")
        self.stream.flush()
        if self.out is not None:
            self.out.commit()
            self.out = None

    def abort(self) -> None:
        """After an error: remove the partial temporary file; never touch an existing --out."""
        if self.out is not None:
            self.out.abort()
            self.out = None
