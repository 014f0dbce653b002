"""The token cache: a data set read once (CSV, TSV, JSONL, Parquet; a file, a directory of shards or a glob),
tokenized once into flat arrays on disk, and memory-mapped by every run, resume, sweep and `eval` after.

    lora-dist prepare --config configs/smoke.yaml          # ahead of a job; training does the same on its own
    python -c "from lora_dist.token_cache import *; print(open_cache(DataConfig(), 1024).manifest['rows'])"

A cache is a directory `<data.cache_dir>/tokens-<key>/` holding `ids.u16` (every message's token ids, GPT-2's
vocabulary fits 16 bits), `offsets.i64` (message i is ids[offsets[i]:offsets[i+1]]), `labels.i32` (class
indices into the manifest's labels) and `manifest.json`. The key is the SHA-256 of the source's content
fingerprint, the tokenizer, the token limit, the columns and `data.labels`, so a changed file gets a new
cache. One process per cache directory prepares (a file lock); the others wait (`data.cache_timeout_s`).
Balancing and splitting work on the label array and give index arrays, the same rows pandas gave
(`data.balance`, `data.split`): the SMS splits, batches and losses are what they were.
"""

from __future__ import annotations

import csv
import fcntl
import glob
import hashlib
import itertools
import json
import os
import queue
import re
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import tiktoken
from torch.utils.data import Dataset

from .config import DataConfig
from .data import SMS_SHA256, Example, Say, _label_key, encode, label_order, sms_path
from .errors import UserError
from .tokenizer import _ENCODER_SHA, _VOCAB_SHA

FORMAT = 1  # bump when the arrays or the manifest change meaning: older caches are rebuilt
CHUNK_ROWS = 65_536  # rows read and tokenized at a time: memory stays bounded whatever the file's size
MAX_LINE = 1 << 26  # bytes: a longer JSONL line is refused before it is read whole (as classify's text lines)
FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
FORMATS |= {".parquet": "parquet", ".pq": "parquet"}
Chunk = tuple[int, list, list]  # (first row number, texts, labels): `read_chunks`'s steps
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def default_cache_dir() -> Path:
    """$LORA_DIST_CACHE, else the platform's user cache ($XDG_CACHE_HOME or ~/.cache) / lora_dist; tokens below it."""
    base = (
        os.environ.get("LORA_DIST_CACHE")
        or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_dist"
    )
    return Path(base) / "tokens"


def cache_dir_of(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()


# ------------------------------------------------------------------------------------------ sources


def source_files(cfg: DataConfig, say: Say = print) -> list[Path]:
    """The files `data.source` names: the SMS file, one file, every data file of a directory, or a glob's matches."""
    if cfg.source == "sms":
        return [sms_path(cfg, say)]
    src = cfg.source
    if any(c in src for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(src), recursive=True) if Path(p).is_file())
        if not files:
            raise UserError(f"data.source={src} matches no file; check the pattern")
        return files
    path = Path(src).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS.keys() - {".json"})
        if not files:
            raise UserError(f"data.source={src} is a directory without data files ({', '.join(sorted(FORMATS))})")
        return files
    if not path.is_file():
        raise UserError(
            f"data file {path} not found; set data.source to 'sms', to an existing CSV/TSV/JSONL/Parquet file, "
            f"a directory of them or a glob"
        )
    return [path]


def file_format(path: Path, cfg: DataConfig) -> str:
    if cfg.source == "sms":
        return "sms"
    fmt = FORMATS.get(path.suffix.lower())
    if fmt:
        return fmt
    with open(path, "rb") as f:  # no known extension: TSV when the header holds a tab, else CSV (as before)
        return "tsv" if b"\t" in f.readline(1 << 20) else "csv"


def content_sha256(path: Path, memo_dir: Path | None) -> str:
    """The file's SHA-256, remembered under `memo_dir` by (path, size, mtime, inode): a later run hashes again
    only when the file changed."""
    st = path.stat()
    where = str(path.resolve())
    stamp = {"path": where, "size": st.st_size, "mtime_ns": st.st_mtime_ns, "ino": st.st_ino}
    memo = memo_dir / (hashlib.sha256(where.encode()).hexdigest()[:32] + ".json") if memo_dir else None
    if memo is not None:
        try:
            saved = json.loads(memo.read_text())
            if {k: saved.get(k) for k in stamp} == stamp and len(saved.get("sha256", "")) == 64:
                return saved["sha256"]
        except (OSError, ValueError):
            pass
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    sha = digest.hexdigest()
    if memo is not None:
        try:
            memo.parent.mkdir(parents=True, exist_ok=True)
            _write_atomic(memo, json.dumps(stamp | {"sha256": sha}))
        except OSError:
            pass  # a read-only cache still works, it only hashes again
    return sha


def cache_key(cfg: DataConfig, files: list[Path], limit: int, memo_dir: Path | None) -> tuple[str, dict]:
    shas = [SMS_SHA256 if cfg.source == "sms" else content_sha256(p, memo_dir) for p in files]
    parts = {
        "format": FORMAT,
        "source": [[p.name, file_format(p, cfg), s] for p, s in zip(files, shas, strict=True)],
        "columns": [cfg.text_column, cfg.label_column] if cfg.source != "sms" else ["sms"],
        "tokenizer": f"gpt2 tiktoken {tiktoken.__version__} {_VOCAB_SHA[:16]} {_ENCODER_SHA[:16]}",
        "limit": limit,
        "labels": list(cfg.labels) if cfg.labels else None,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest(), parts


# ------------------------------------------------------------------------------------------ reading


def read_chunks(
    path: Path, fmt: str, cfg: DataConfig, rows: int | None = None, texts_only: bool = False
) -> Iterator[Chunk]:
    """(first row number, texts, labels) of `rows` rows at a time; row numbers count data rows from 1. Bad rows
    raise UserError naming the file, the row or line, and the column. `texts_only` (JSONL and Parquet, for
    `classify --file`): only the text column is read and required; the labels come back empty."""
    rows = rows or CHUNK_ROWS
    if fmt == "parquet":
        yield from _parquet_chunks(path, cfg, rows, texts_only)
    elif fmt == "jsonl":
        yield from _jsonl_chunks(path, cfg, rows, texts_only)
    else:
        yield from _csv_chunks(path, fmt, cfg, rows)


def _columns(path: Path, found: list[str], cfg: DataConfig, texts_only: bool = False) -> tuple[str, str]:
    """The text and label columns' names as the file spells them (matched ignoring case and spaces); with
    `texts_only` the label's is "" and need not exist."""
    by_key = {str(c).strip().lower(): c for c in found}
    want = [cfg.text_column] if texts_only else [cfg.text_column, cfg.label_column]
    missing = [w for w in want if w.strip().lower() not in by_key]
    if missing:
        fix = (
            "pass --text-column NAME"
            if texts_only
            else "set data.text_column / data.label_column to the columns that hold the message and its label"
        )
        raise UserError(f"{path} has no column {missing[0]!r} (found {[str(c) for c in found]}); {fix}")
    return by_key[want[0].strip().lower()], "" if texts_only else by_key[want[1].strip().lower()]


def _csv_chunks(path: Path, fmt: str, cfg: DataConfig, rows: int) -> Iterator[Chunk]:
    sep = "\t" if fmt in ("tsv", "sms") else ","
    kind = "the SMS file" if fmt == "sms" else fmt.upper()
    opts: dict = {"sep": sep, "dtype": str, "keep_default_na": False, "encoding": "utf-8", "chunksize": rows}
    if fmt == "sms":
        opts |= {"header": None, "names": ["label", "text"], "quoting": csv.QUOTE_NONE}
        text_col, label_col = "text", "label"
    else:
        try:
            header = pd.read_csv(path, sep=sep, dtype=str, nrows=0, encoding="utf-8").columns.tolist()
        except pd.errors.EmptyDataError:
            raise UserError(f"{path} is empty; it needs a header row and labelled messages") from None
        except UnicodeDecodeError:
            raise _not_utf8(path) from None
        text_col, label_col = _columns(path, header, cfg)  # all columns read: a row with extra fields is an error
    start = 1
    try:
        with pd.read_csv(path, **opts) as reader:
            for frame in reader:
                texts, labels = frame[text_col].tolist(), frame[label_col].tolist()
                yield start, texts, labels
                start += len(texts)
    except pd.errors.ParserError as e:
        raise UserError(
            f"{path} is not a well-formed {kind} file after data row {start - 1} "
            f"({str(e).strip().splitlines()[-1]}); columns {cfg.text_column!r} and {cfg.label_column!r}: "
            f"quote fields that hold the separator"
        ) from e
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _not_utf8(path: Path) -> UserError:
    line = 1
    with open(path, "rb") as f:  # only on the error path: find the line, a block at a time
        for n, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError:
                line = n
                break
    return UserError(
        f"{path} is not UTF-8 (bad byte at line {line}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
    )


def _jsonl_chunks(path: Path, cfg: DataConfig, rows: int, texts_only: bool = False) -> Iterator[Chunk]:
    text_col, label_col = cfg.text_column, "" if texts_only else cfg.label_column
    texts: list = []
    labels: list = []
    start = 1
    with open(path, "rb") as f:
        for line_no, raw in enumerate(iter(lambda: f.readline(MAX_LINE + 1), b""), 1):
            if len(raw) > MAX_LINE:  # read no further: one line is one message and its label
                raise UserError(f"{path} line {line_no} is over {MAX_LINE >> 20} MiB; one JSON object per line")
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except UnicodeDecodeError:
                raise UserError(f"{path} is not UTF-8 (bad byte at line {line_no}); re-save it as UTF-8") from None
            except ValueError as e:
                raise UserError(f"{path} line {line_no} is not a JSON object ({e}); fix or remove that line") from None
            if not isinstance(obj, dict):
                raise UserError(
                    f"{path} line {line_no} is a JSON {type(obj).__name__}, not an object with {text_col!r}"
                )
            if text_col not in obj or (label_col not in obj and not texts_only):  # keys matched as in a header
                try:
                    text_col, label_col = _columns(path, list(obj), cfg, texts_only)
                except UserError:
                    want = (cfg.text_column,) if texts_only else (cfg.text_column, cfg.label_column)
                    missing = next(c for c in want if c not in obj)
                    fix = "pass --text-column NAME" if texts_only else "set data.text_column / data.label_column"
                    raise UserError(
                        f"{path} line {line_no} has no key {missing!r} (found {list(obj)[:10]}); {fix}"
                    ) from None
            text, label = obj[text_col], "" if texts_only else obj[label_col]
            if not isinstance(text, str):
                raise UserError(
                    f"{path} line {line_no}, column {text_col!r}: a message must be a string, not {json.dumps(text)[:40]}"
                )
            if isinstance(label, bool) or not isinstance(label, (str, int)):
                raise UserError(
                    f"{path} line {line_no}, column {label_col!r}: a label must be a string or an integer, "
                    f"not {json.dumps(label)[:40]}"
                )
            texts.append(text)
            labels.append(str(label))
            if len(texts) == rows:
                yield start, texts, labels
                start += len(texts)
                texts, labels = [], []
    if texts:
        yield start, texts, labels


def _parquet_chunks(path: Path, cfg: DataConfig, rows: int, texts_only: bool = False) -> Iterator[Chunk]:
    try:
        import pyarrow.parquet as pq  # the [parquet] extra
    except ImportError:
        raise UserError(
            f"{path} is Parquet, which needs pyarrow: pip install 'lora-dist[parquet]' (or pip install pyarrow)"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid and friends
        raise UserError(f"{path} is not a readable Parquet file ({e}); re-export it") from None
    text_col, label_col = _columns(path, pf.schema_arrow.names, cfg, texts_only)
    columns = [text_col] if texts_only else [text_col, label_col]
    start = 1
    for batch in pf.iter_batches(batch_size=rows, columns=columns):
        texts = batch.column(0).to_pylist()
        labels = [] if texts_only else batch.column(1).to_pylist()
        for col, values in ((text_col, texts), (label_col, labels)):
            bad = next((i for i, v in enumerate(values) if v is None or isinstance(v, (float, bytes, bool))), None)
            if bad is not None:
                raise UserError(
                    f"{path} row {start + bad}, column {col!r}: {values[bad]!r} is not text; "
                    f"fill or remove that row (the column's type: {batch.schema.field(col).type})"
                )
        yield start, texts, [str(x) for x in labels]
        start += len(texts)


def _check_rows(path: Path, start: int, texts: list, labels: list) -> list[str]:
    """Labels stripped; one error naming the rows (up to five) of empty labels, labels with a control
    character, or empty messages."""
    labels = [str(x).strip() for x in labels]

    def where(bad: list[int]) -> str:
        rows = ", ".join(str(start + i) for i in bad[:5])
        return f"row{'s' if len(bad) > 1 else ''} {rows}" + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")

    bad = [i for i, x in enumerate(labels) if not x]
    if bad:
        raise UserError(f"{path} has a message without a label at {where(bad)}; label or remove them")
    bad = [i for i, x in enumerate(labels) if _CONTROL.search(x)]
    if bad:
        raise UserError(
            f"{path} has the label {labels[bad[0]]!r} at {where(bad)}, which holds a control character (a stray "
            f"NUL or tab, as from a binary or mis-exported file); fix those rows"
        )
    bad = [i for i, t in enumerate(texts) if not t]
    if bad:
        raise UserError(f"{path} has an empty message at {where(bad)}; remove them")
    return labels


# ------------------------------------------------------------------------------------------ the cache


@dataclass
class TokenCache:
    """An opened cache: memory maps of its arrays (read-only) and its manifest."""

    path: Path
    manifest: dict
    ids: np.ndarray  # uint16, every message's tokens back to back
    offsets: np.ndarray  # int64, rows + 1
    labels: np.ndarray  # int32, class index into manifest["labels"]

    @property
    def key(self) -> str:
        return self.manifest["key"]

    @property
    def label_names(self) -> tuple[str, ...]:
        return tuple(self.manifest["labels"])

    def __len__(self) -> int:
        return len(self.labels)

    def lengths(self, rows: np.ndarray, limit: int) -> np.ndarray:
        """Tokens of each row, cut at `limit`, at least 1 (an empty message is one pad token)."""
        n = self.offsets[rows + 1] - self.offsets[rows]
        return np.clip(n, 1, limit)


def _arrays(path: Path, m: dict) -> TokenCache:
    rows, tokens = m["rows"], m["tokens"]

    def mm(name: str, dtype: type[np.generic], n: int) -> np.ndarray:
        if n == 0:
            return np.zeros(0, dtype)
        return np.memmap(path / name, dtype=dtype, mode="r", shape=(n,))

    return TokenCache(
        path,
        m,
        mm("ids.u16", np.uint16, tokens),
        mm("offsets.i64", np.int64, rows + 1),
        mm("labels.i32", np.int32, rows),
    )


def _check_cache(path: Path, key: str) -> tuple[TokenCache | None, str]:
    """(the opened cache, "") or (None, why it cannot be used: missing, outdated or corrupt)."""
    manifest = path / "manifest.json"
    if not manifest.is_file():
        return None, "missing"
    try:
        m = json.loads(manifest.read_text())
        if m.get("format") != FORMAT:
            return None, f"outdated (format {m.get('format')}, now {FORMAT})"
        if m.get("key") != key:
            return None, "corrupt (its manifest names another key)"
        sizes = {"ids.u16": m["tokens"] * 2, "offsets.i64": (m["rows"] + 1) * 8, "labels.i32": m["rows"] * 4}
        for name, size in sizes.items():
            have = (path / name).stat().st_size if (path / name).exists() else -1
            if have != size:
                return None, f"corrupt ({name} has {have} bytes, the manifest says {size})"
        cache = _arrays(path, m)
        if cache.offsets[0] != 0 or cache.offsets[-1] != m["tokens"] or _edges(path) != m["edges"]:
            return None, "corrupt (its arrays do not match the manifest's checksums)"
        return cache, ""
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"corrupt ({type(e).__name__}: {e})"


def _edges(path: Path) -> str:
    """A checksum of each array's first and last MiB: cheap at every start, and catches a cut or overwritten file."""
    digest = hashlib.sha256()
    for name in ("ids.u16", "offsets.i64", "labels.i32"):
        with open(path / name, "rb") as f:
            digest.update(f.read(1 << 20))
            f.seek(max(0, os.fstat(f.fileno()).st_size - (1 << 20)))
            digest.update(f.read(1 << 20))
    return digest.hexdigest()


def open_cache(cfg: DataConfig, limit: int, say: Say = print, progress: bool = True) -> TokenCache:
    """The token cache of `cfg`'s data, messages cut at `limit` tokens: opened, or prepared first (by one process
    per cache directory; the others wait up to data.cache_timeout_s)."""
    root = cache_dir_of(cfg)
    files = source_files(cfg, say)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass  # a read-only cache that holds the data still works; one that does not fails below
    memo = root / "sources"
    key, parts = cache_key(cfg, files, limit, memo)
    cache, why = _check_cache(root / f"tokens-{key[:32]}", key)
    if cache is not None:
        return cache
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = os.open(root / ".prepare.lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise UserError(
            f"cannot write the token cache in {root} ({e.strerror}); set data.cache_dir to a writable directory"
        ) from e
    try:
        _acquire(lock, root, cfg.cache_timeout_s, say)
        key, parts = cache_key(cfg, files, limit, memo)  # under the lock: the files may have changed meanwhile
        final = root / f"tokens-{key[:32]}"
        cache, why = _check_cache(final, key)
        if cache is not None:
            return cache  # another process prepared it while this one waited
        if why != "missing":
            say(f"note: the token cache {final} is {why}; rebuilding it")
        _build(cfg, files, key, parts, limit, root, final, say, progress)
        cache, why = _check_cache(final, key)
        if cache is None:
            raise UserError(f"the token cache {final} just written is {why}; check the disk ({root})")
        return cache
    finally:
        os.close(lock)  # releases the lock


def _acquire(fd: int, root: Path, timeout: float, say: Say) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    say(f"waiting for another process preparing the token cache in {root} (up to {timeout:g} s, data.cache_timeout_s)")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.1)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
    raise UserError(
        f"another process has held the token cache lock {root / '.prepare.lock'} for over {timeout:g} s; "
        f"wait for it (lora-dist prepare) or raise data.cache_timeout_s, or stop that process if it is stuck"
    )


def _build(
    cfg: DataConfig,
    files: list[Path],
    key: str,
    parts: dict,
    limit: int,
    root: Path,
    final: Path,
    say: Say,
    progress: bool,
) -> None:
    """Read, tokenize and write the arrays into a temporary directory, then rename it into place."""
    tmp = root / f".tmp-{key[:32]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    t0 = time.monotonic()
    try:
        rows, tokens, truncated, names = _write_arrays(cfg, files, limit, tmp, say if progress else None)
        if rows == 0:
            raise UserError(
                f"data.source={cfg.source} holds no rows (a header but no messages, or empty files); "
                f"add rows of text and label"
            )
        order = label_order(names, cfg.labels, source=f"data.source={cfg.source}")
        counts = _renumber_labels(tmp / "labels.i32", rows, names, order)
        seconds = time.monotonic() - t0
        manifest = {
            "format": FORMAT,
            "key": key,
            "parts": parts,
            "source": cfg.source,
            "files": [str(p) for p in files],
            "rows": rows,
            "tokens": tokens,
            "limit": limit,
            "truncated": truncated,
            "labels": list(order),
            "label_counts": {x: int(counts[names[x]]) for x in order if x in names},
            "seconds": round(seconds, 3),
            "edges": _edges(tmp),
        }
        _write_atomic(tmp / "manifest.json", json.dumps(manifest, indent=1))
        if final.exists():  # an outdated or corrupt cache of ours: moved aside, then removed
            aside = root / f".old-{key[:32]}-{os.getpid()}"
            os.replace(final, aside)
            shutil.rmtree(aside, ignore_errors=True)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    say(
        f"prepared the token cache {final}: {rows:,} messages, {tokens:,} tokens in {seconds:.1f} s "
        f"({rows / max(seconds, 1e-9):,.0f} rows/s, {tokens / max(seconds, 1e-9):,.0f} tokens/s)"
    )


def _write_arrays(
    cfg: DataConfig, files: list[Path], limit: int, tmp: Path, progress: Say | None
) -> tuple[int, int, int, dict[str, int]]:
    """Every file's rows, a chunk at a time (read ahead by a thread), appended to ids.u16, offsets.i64 and
    labels.i32 under `tmp`; labels numbered in order of appearance. Returns (rows, tokens, truncated, names)."""
    t0 = last = time.monotonic()
    rows = tokens = truncated = 0
    names: dict[str, int] = {}  # label -> its index in order of appearance; renumbered at the end
    with (
        open(tmp / "ids.u16", "wb") as f_ids,
        open(tmp / "offsets.i64", "wb") as f_off,
        open(tmp / "labels.i32", "wb") as f_lab,
    ):
        f_off.write(np.zeros(1, np.int64).tobytes())
        for path in files:
            for start, texts, labels in prefetched(read_chunks(path, file_format(path, cfg), cfg)):
                labels = _check_rows(path, start, texts, labels)
                ids, cut = encode(texts, limit)
                truncated += cut
                lens = np.fromiter((len(i) for i in ids), np.int64, len(ids))
                n = int(lens.sum())
                f_ids.write(np.fromiter(itertools.chain.from_iterable(ids), np.uint16, n).tobytes())
                f_off.write((tokens + np.cumsum(lens)).tobytes())
                f_lab.write(
                    np.fromiter((names.setdefault(x, len(names)) for x in labels), np.int32, len(labels)).tobytes()
                )
                rows += len(texts)
                tokens += n
                now = time.monotonic()
                if progress is not None and now - last >= 5:
                    last = now
                    rate = f"{rows / (now - t0):,.0f} rows/s, {tokens / (now - t0):,.0f} tokens/s"
                    progress(f"prepare: {rows:,} rows, {tokens:,} tokens ({rate})")
    return rows, tokens, truncated, names


def _renumber_labels(path: Path, rows: int, names: dict[str, int], order: tuple[str, ...]) -> np.ndarray:
    """Rewrite the label array from order of appearance to `order`'s indices, in place, 4 M rows at a time;
    returns the count of each label by its appearance index."""
    counts = np.zeros(len(names), np.int64)
    lab = np.memmap(path, dtype=np.int32, mode="r+", shape=(rows,))
    remap = np.array([order.index(x) for x in names], np.int32)  # appearance index -> final index
    for s in range(0, rows, 1 << 22):
        counts += np.bincount(lab[s : s + (1 << 22)], minlength=len(names))
        lab[s : s + (1 << 22)] = remap[lab[s : s + (1 << 22)]]
    lab.flush()
    del lab
    return counts


def prefetched(chunks: Iterator, depth: int = 2) -> Iterator:
    """`chunks`, read ahead by a thread (parsing overlaps tokenizing, which releases the GIL); its errors re-raised here."""
    q: queue.Queue = queue.Queue(depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False  # the consumer has gone

    def read() -> None:
        try:
            for c in chunks:
                if not put(("chunk", c)):
                    return
            put(("end", None))
        except BaseException as e:  # handed to the consumer
            put(("error", e))

    thread = threading.Thread(target=read, daemon=True, name="lora-dist-read")
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=5)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------ balance and split


def balance_rows(labels: np.ndarray, names: tuple[str, ...], seed: int) -> np.ndarray:
    """`data.balance` on the label array: every class undersampled to the smallest one, classes in sorted
    order, each drawn as pandas' `sample(n, random_state=seed)` draws it."""
    present = [c for c in range(len(names)) if (labels == c).any()]
    groups = [np.flatnonzero(labels == c) for c in sorted(present, key=lambda c: _label_key(names[c]))]
    n = min(len(g) for g in groups)
    return np.concatenate(
        [g if len(g) == n else g[np.random.RandomState(seed).choice(len(g), n, replace=False)] for g in groups]
    )


def split_rows(rows: np.ndarray, train_frac: float, val_frac: float, seed: int) -> dict[str, np.ndarray]:
    """`data.split` on row indices: shuffled as pandas' `sample(frac=1, random_state=seed)`, then cut."""
    rows = rows[np.random.RandomState(seed).choice(len(rows), len(rows), replace=False)]
    train_end = int(len(rows) * train_frac)
    val_end = train_end + int(len(rows) * val_frac)
    return {"train": rows[:train_end], "validation": rows[train_end:val_end], "test": rows[val_end:]}


class CachedDataset(Dataset):
    """Rows of a token cache, cut at `max_length` tokens: what `data.SpamDataset` holds, read from the memory map."""

    def __init__(self, cache: TokenCache, rows: np.ndarray, max_length: int):
        self.cache, self.rows, self.max_length = cache, rows, max_length
        self.lengths = cache.lengths(rows, max_length)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def labels(self) -> np.ndarray:
        """The class index of each row (data.balance=weight counts them)."""
        return np.asarray(self.cache.labels)[self.rows]

    def __getitem__(self, i: int) -> Example:
        r = int(self.rows[i])
        start = int(self.cache.offsets[r])
        end = min(int(self.cache.offsets[r + 1]), start + self.max_length)
        return self.cache.ids[start:end].tolist(), int(self.cache.labels[r])


# ------------------------------------------------------------------------------------------ a run's data

CACHE_LIMIT = 1024  # GPT-2's context: messages are cached cut there (or at data.max_length); a run cuts them further
SPLIT_CSV_ROWS = 100_000  # data.write_splits null: CSV copies of the splits below this many messages


def cache_limit(cfg: DataConfig, context_length: int | None = None) -> int:
    """The length messages are cached cut at: data.max_length, else GPT-2's context (or a longer model's)."""
    return cfg.max_length or max(CACHE_LIMIT, context_length or 0)


@dataclass
class RunData:
    """A run's data by reference: the cache, its labels, each split's row indices, the tokenized splits."""

    cache: TokenCache
    labels: tuple[str, ...]
    splits: dict[str, np.ndarray]
    datasets: dict[str, CachedDataset]
    length: int  # messages are cut at (and padded to, with padding longest/context) this many tokens
    fingerprint: str  # the SHA-256 of the cache's key and the splits' indices: a resume checks it


def run_data(cfg: DataConfig, context_length: int, say: Say = print, cache: TokenCache | None = None) -> RunData:
    """The splits of `cfg` as the book makes them (balance, shuffle, cut), tokenized from the cache."""
    limit = min(cfg.max_length or context_length, context_length)
    if cache is None or cache.manifest["limit"] < limit:
        cache = open_cache(cfg, cache_limit(cfg, context_length), say)
    labels = cache.label_names
    undersample = cfg.balance == "undersample"  # "weight" keeps every message and weights the loss instead
    rows = balance_rows(np.asarray(cache.labels), labels, cfg.seed) if undersample else np.arange(len(cache))
    splits = split_rows(rows, cfg.train_frac, cfg.val_frac, cfg.seed)
    for name, part in splits.items():
        if len(part) == 0:
            counts = ", ".join(f"{k} ({v})" for k, v in cache.manifest["label_counts"].items())
            raise UserError(
                f"the {name} split is empty ({len(rows)} messages, labels {counts}; train_frac={cfg.train_frac}, "
                f"val_frac={cfg.val_frac}); use more data or other fractions"
            )
    train = CachedDataset(cache, splits["train"], limit)
    # The book pads every split to the longest training message, truncating longer ones to it.
    length = int(train.lengths.max()) if cfg.padding == "longest" else limit
    datasets = {"train": train} | {k: CachedDataset(cache, splits[k], length) for k in ("validation", "test")}
    return RunData(cache, labels, splits, datasets, length, splits_fingerprint(cache.key, splits))


def splits_fingerprint(key: str, splits: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256(f"{key}\0".encode())
    for name in sorted(splits):
        digest.update(f"{name}\0{len(splits[name])}\0".encode())
        digest.update(np.ascontiguousarray(splits[name], np.int64).tobytes())
    return digest.hexdigest()


def write_split_record(data: RunData, cfg: DataConfig, out_dir: Path, say: Say = print) -> None:
    """splits/splits.json (the cache's key and source) and splits/index.npz (each split's row indices); and, as
    data.write_splits says, splits/{train,validation,test}.csv."""
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez(
        out_dir / "index.npz",
        train=data.splits["train"],
        validation=data.splits["validation"],
        test=data.splits["test"],
    )
    record = {
        "fingerprint": data.fingerprint,
        "cache": {"key": data.cache.key, "path": str(data.cache.path), "rows": data.cache.manifest["rows"]},
        "source": cfg.source,
        "files": data.cache.manifest["files"],
        "labels": list(data.labels),
        "splits": {k: len(v) for k, v in data.splits.items()},
        "index": "index.npz",
    }
    _write_atomic(out_dir / "splits.json", json.dumps(record, indent=1))
    wanted = cfg.write_splits if cfg.write_splits is not None else len(data.cache) < SPLIT_CSV_ROWS
    if wanted:
        texts = split_texts(data, cfg, say)
        names = data.labels
        for name, rows in data.splits.items():
            frame = pd.DataFrame({"text": texts[name], "label": [names[i] for i in data.cache.labels[rows]]})
            frame.to_csv(out_dir / f"{name}.csv", index=False)


def split_texts(data: RunData, cfg: DataConfig, say: Say = print) -> dict[str, list[str]]:
    """Each split's messages, read back from the source (holds the source's texts in memory)."""
    texts: list[str] = []
    for path in source_files(cfg, say):
        for _, chunk, _ in read_chunks(path, file_format(path, cfg), cfg):
            texts += chunk
    if len(texts) != len(data.cache):
        raise UserError(f"data.source={cfg.source} changed while the run was starting; start it again")
    return {k: [texts[i] for i in rows] for k, rows in data.splits.items()}


def read_split_record(run_dir: Path) -> tuple[dict, dict[str, np.ndarray]]:
    """A run's splits by reference: (splits.json, {split: row indices})."""
    folder = Path(run_dir) / "splits"
    try:
        record = json.loads((folder / "splits.json").read_text())
        with np.load(folder / "index.npz", allow_pickle=False) as z:
            index = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError) as e:
        raise UserError(
            f"{folder} does not hold a readable split record ({e}); pass a run written by lora-dist train"
        ) from e
    return record, index
