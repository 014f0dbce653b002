"""The SMS Spam Collection (or a user's own labelled file): download, read, balance, split, batch.

Labels are data: any strings (`ham`/`spam`, `positive`/`negative`/`neutral`, `0`/`1`), ordered as
`data.labels` lists them, else sorted (numerically where they are all integers).

    python -c "from lora_dist.data import load_frame; print(load_frame('sms').label.value_counts())"

Data preparation is pure functions; `make_loaders` turns the splits into per-rank DataLoaders whose global
batches are the same whatever the world size.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import urllib.request
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from .config import DataConfig
from .errors import UserError

SMS_SHA256 = "7d039a24a6083ed9ef0f806ebad56bbb976e3aeb8de05669173bfdc4996c239d"
SMS_LABELS = ("ham", "spam")


# ------------------------------------------------------------------------------------------- reading


def shipped_sms_path() -> Path:
    path = Path(str(resources.files("lora_dist") / "assets" / "SMSSpamCollection"))
    if _sha256(path.read_bytes()) != SMS_SHA256:
        raise UserError(f"{path} does not have the SMS data's sha256; reinstall lora-dist, or set data.download=true")
    return path


def download_sms(url: str, cache_dir: Path | None = None, timeout: float = 15.0) -> Path:
    """Download the UCI zip once, extract and verify `SMSSpamCollection`; return its path.

    Raises OSError (or ValueError for a bad archive) when that cannot be done; `sms_path` falls back to
    the shipped copy then.
    """
    cache_dir = Path(cache_dir or os.environ.get("LORA_DIST_CACHE", Path.home() / ".cache" / "lora_dist"))
    target = cache_dir / "SMSSpamCollection"
    if target.is_file() and _sha256(target.read_bytes()) == SMS_SHA256:
        return target
    with urllib.request.urlopen(url, timeout=timeout) as r:
        payload = r.read()
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            content = z.read("SMSSpamCollection")
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{url} is not the UCI zip with SMSSpamCollection inside ({e})")
    if _sha256(content) != SMS_SHA256:
        raise ValueError(f"SMSSpamCollection from {url} has an unexpected sha256")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")  # several ranks may download at once
    tmp.write_bytes(content)
    os.replace(tmp, target)
    return target


def sms_path(cfg: DataConfig, say=print) -> Path:
    """The UCI file: the copy shipped in the package, verified by the same SHA-256 as a download. Only with
    `data.download: true` is it fetched from `data.url` (and cached); offline that falls back to the shipped copy."""
    if cfg.download:
        try:
            return download_sms(cfg.url)
        except (OSError, ValueError) as e:
            say(f"note: could not download the SMS data ({type(e).__name__}: {e}); using the copy shipped with lora-dist")
    return shipped_sms_path()


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def read_sms(path: str | Path) -> pd.DataFrame:
    """The UCI file: `label<TAB>text`, no header, read with quoting off so all 5,574 rows come through."""
    text = _read_utf8(Path(path))
    frame = pd.read_csv(io.StringIO(text), sep="\t", header=None, names=["label", "text"], quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False)
    return _validate(frame, Path(path))


def read_table(path: str | Path) -> pd.DataFrame:
    """A user's CSV or TSV (by extension, else sniffed) with a header holding `text` and `label`."""
    path = Path(path)
    text = _read_utf8(path)
    sep = "\t" if path.suffix.lower() in (".tsv", ".tab") or (path.suffix.lower() != ".csv" and "\t" in text.split("\n", 1)[0]) else ","
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as e:
        raise UserError(f"{path} is not a well-formed {'TSV' if sep == chr(9) else 'CSV'} file ({str(e).strip().splitlines()[-1]}); quote fields that hold the separator")
    frame.columns = [str(c).strip().lower() for c in frame.columns]
    if not {"text", "label"} <= set(frame.columns):
        raise UserError(f"{path} needs columns 'text' and 'label' in its header row; found {list(frame.columns)}")
    return _validate(frame[["label", "text"]], path)


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"data file {path} not found; set data.source to 'sms' or to an existing CSV/TSV file")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise UserError(f"{path} is not UTF-8 (bad byte at line {line}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8")
    if not text.strip():
        raise UserError(f"{path} is empty; it needs labelled messages (label and text)")
    return text


def _validate(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    frame = frame.copy()
    frame["label"] = frame["label"].astype(str).str.strip()
    if len(frame) == 0:
        raise UserError(f"{path} holds a header but no messages; add rows of text and label")
    if (frame["label"].str.len() == 0).any():
        row = int(frame.index[frame["label"].str.len() == 0][0]) + 1
        raise UserError(f"{path} has a message without a label at row {row}; label it or remove it")
    if (frame["text"].str.len() == 0).any():
        row = int(frame.index[frame["text"].str.len() == 0][0]) + 1
        raise UserError(f"{path} has an empty message at row {row}; remove it")
    return frame.reset_index(drop=True)


def load_frame(source: str, cfg: DataConfig | None = None, say=print) -> pd.DataFrame:
    cfg = cfg or DataConfig()
    if source == "sms":
        return read_sms(sms_path(cfg, say))
    return read_table(source)


# ----------------------------------------------------------------------------------------- labels


def _label_key(label: str):
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def label_order(labels, wanted: tuple[str, ...] | None = None, source: str = "the data") -> tuple[str, ...]:
    """The class labels, in order: `wanted` (data.labels), checked against the data's, or the data's
    own, sorted (numerically when they are all integers). At least two are needed."""
    found = set(labels)
    if wanted:
        unknown = sorted(found - set(wanted), key=_label_key)
        if unknown:
            raise UserError(f"{source} has label {unknown[0]!r}, which data.labels {list(wanted)} does not name; "
                            f"add it to data.labels or fix the data")
        return tuple(wanted)
    if len(found) < 2:
        raise UserError(f"{source} holds only {sorted(found) or 'no'} labels; a classifier needs at least two classes")
    return tuple(sorted(found, key=_label_key))


def split_labels(splits: dict[str, pd.DataFrame], cfg: DataConfig) -> tuple[str, ...]:
    """The class labels of a run: those of all its splits together, ordered by `label_order`."""
    return label_order(pd.concat(splits.values())["label"], cfg.labels, source=f"data.source={cfg.source}")


# ----------------------------------------------------------------------------- balancing and splits


def balance(frame: pd.DataFrame, seed: int = 123) -> pd.DataFrame:
    """Undersample every class to the size of the smallest one (the book's `create_balanced_dataset`,
    which samples ham down to the 747 spam messages), classes in sorted order."""
    groups = [frame[frame["label"] == c] for c in sorted(frame["label"].unique(), key=_label_key)]
    n = min(len(g) for g in groups)
    return pd.concat([g if len(g) == n else g.sample(n, random_state=seed) for g in groups])


def split(frame: pd.DataFrame, train_frac: float, val_frac: float, seed: int = 123) -> dict[str, pd.DataFrame]:
    """Shuffle, then cut into train/validation/test (the book's `random_split`)."""
    frame = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(frame) * train_frac)
    val_end = train_end + int(len(frame) * val_frac)
    parts = {"train": frame[:train_end], "validation": frame[train_end:val_end], "test": frame[val_end:]}
    for name, part in parts.items():
        if len(part) == 0:
            raise UserError(f"the {name} split is empty ({len(frame)} messages, train_frac={train_frac}, val_frac={val_frac}); use more data or other fractions")
    return {k: v.reset_index(drop=True) for k, v in parts.items()}


def prepare_splits(cfg: DataConfig, say=print) -> dict[str, pd.DataFrame]:
    frame = load_frame(cfg.source, cfg, say)
    if cfg.balance:
        frame = balance(frame, cfg.seed)
    return split(frame, cfg.train_frac, cfg.val_frac, cfg.seed)


# ----------------------------------------------------------------------------------------- batching


class SpamDataset(Dataset):
    """Token ids (truncated to `max_length`) and class indices into `labels`."""

    def __init__(self, frame: pd.DataFrame, tokenizer, max_length: int, labels: tuple[str, ...] = SMS_LABELS,
                 source: str = "the data"):
        self.ids = [tokenizer.encode(t, disallowed_special=())[:max_length] for t in frame["text"]]  # text, never control tokens
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted(set(frame["label"]) - set(index))
        if unknown:
            raise UserError(f"{source} has label {unknown[0]!r}, which is not one of the model's labels {list(labels)}; "
                            f"relabel the data or use a model trained on these labels")
        self.labels = [index[label] for label in frame["label"]]
        self.lengths = [max(1, len(i)) for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.ids[i], self.labels[i]


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded token ids
    last: torch.Tensor  # (B,) index of each sequence's last real token
    labels: torch.Tensor  # (B,)
    tokens: int  # real (non-pad) tokens in the batch

    def to(self, device) -> "Batch":
        nb = device.type == "cuda"
        return Batch(self.ids.to(device, non_blocking=nb), self.last.to(device, non_blocking=nb), self.labels.to(device, non_blocking=nb), self.tokens)

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so that `to(cuda)` copies asynchronously. DataLoader(pin_memory=True) calls
        this on every batch it yields; without it the batch would stay in pageable memory."""
        return Batch(self.ids.pin_memory(), self.last.pin_memory(), self.labels.pin_memory(), self.tokens)

    def __len__(self) -> int:
        return self.ids.shape[0]


class Collate:
    """Right-pads to `fixed_length` (the book's `padding: longest`) or to the batch's longest message."""

    def __init__(self, pad_id: int, fixed_length: int | None = None):
        self.pad_id, self.fixed_length = pad_id, fixed_length

    def __call__(self, items) -> Batch:
        seqs = [ids if ids else [self.pad_id] for ids, _ in items]
        T = self.fixed_length or max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        last = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return Batch(ids, last, labels, sum(len(s) for s in seqs))


class ShardedSampler(DistributedSampler):
    """A DistributedSampler whose global batches do not depend on the world size.

    Each epoch (seeded by `seed + epoch`, advanced with `set_epoch`) shuffles the dataset, drops the tail
    that does not fill a global batch, and cuts it into global batches of `world * micro * accum`
    examples. Each global batch is split into `accum` chunks and each chunk into one contiguous
    micro-batch per rank. So 1, 2 or 8 ranks see the same global batches, and no example is counted twice.
    With `lengths` given, examples are grouped by length inside windows of `bucket_window` global batches
    and the order of the global batches is shuffled again, so batches stay random but hold little padding.
    The default window is transformers' `group_by_length` rule, min(steps / 4, 50) batches: 32 for the SMS
    training split at batch 8, where 5.5% of the tokens are padding (16: 8.5%; no buckets: 44%).
    """

    def __init__(self, dataset, num_replicas: int, rank: int, micro: int, accum: int, seed: int,
                 lengths: list[int] | None = None, bucket_window: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.micro, self.accum = micro, accum
        self.global_batch = num_replicas * micro * accum
        self.steps = len(dataset) // self.global_batch
        self.lengths = lengths
        self.bucket_window = bucket_window or max(1, min(self.steps // 4, 50))
        self.start_step = 0  # resume inside an epoch: skip the steps already taken

    def global_batches(self) -> list[list[int]]:
        g = torch.Generator()
        g.manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.dataset), generator=g).tolist()[: self.steps * self.global_batch]
        G = self.global_batch
        if self.lengths is None:
            return [order[i : i + G] for i in range(0, len(order), G)]
        batches = []
        W = G * self.bucket_window
        for w in range(0, len(order), W):
            window = sorted(order[w : w + W], key=lambda i: self.lengths[i])
            batches += [window[i : i + G] for i in range(0, len(window), G)]
        perm = torch.randperm(len(batches), generator=g).tolist()
        return [batches[p] for p in perm]

    def __iter__(self):
        m, R = self.micro, self.num_replicas
        for batch in self.global_batches()[self.start_step :]:
            if self.lengths is not None:
                batch = sorted(batch, key=lambda i: self.lengths[i])  # accumulation chunks of like lengths
            for a in range(self.accum):
                chunk = batch[a * R * m : (a + 1) * R * m]
                yield from chunk[self.rank * m : (self.rank + 1) * m]

    def __len__(self) -> int:
        return (self.steps - self.start_step) * self.micro * self.accum


class ShardedEvalSampler(torch.utils.data.Sampler):
    """Rank r reads examples r, r+R, r+2R, ... of the first `limit` ones: nothing duplicated or padded."""

    def __init__(self, n: int, num_replicas: int, rank: int, limit: int | None = None):
        self.indices = list(range(rank, min(n, limit or n), num_replicas))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def micro_batch_size(global_batch: int, world: int, accum: int) -> int:
    if global_batch % (world * accum):
        raise UserError(
            f"train.batch_size={global_batch} is the global batch and must divide by world size x grad_accum "
            f"= {world} x {accum}; pick a multiple of {world * accum}"
        )
    return global_batch // (world * accum)


@dataclass
class Loaders:
    train: DataLoader
    sampler: ShardedSampler
    datasets: dict[str, SpamDataset]
    collate: Collate
    max_length: int


def build_datasets(splits: dict[str, pd.DataFrame], tokenizer, cfg: DataConfig, context_length: int,
                   labels: tuple[str, ...] = SMS_LABELS) -> tuple[dict[str, SpamDataset], int]:
    """The tokenized splits and the length messages are truncated to (and padded to, see `fixed_length`)."""
    limit = min(cfg.max_length or context_length, context_length)
    train = SpamDataset(splits["train"], tokenizer, limit, labels)
    # The book pads every split to the longest training message, truncating longer ones to it.
    length = max(train.lengths) if cfg.padding == "longest" else limit
    datasets = {"train": train} | {k: SpamDataset(splits[k], tokenizer, length, labels) for k in ("validation", "test")}
    return datasets, length


def fixed_length(cfg: DataConfig, length: int) -> int | None:
    """What every batch is padded to: `length` for padding longest/context, None (each batch's own) for batch."""
    return length if cfg.padding in ("longest", "context") else None


def make_loaders(datasets: dict[str, SpamDataset], length: int, cfg: DataConfig, micro: int, accum: int,
                 world: int, rank: int, seed: int, num_workers: int = 0, pin_memory: bool = False) -> Loaders:
    train = datasets["train"]
    steps = len(train) // (micro * accum * world)
    if steps == 0:
        raise UserError(
            f"the training split has {len(train)} examples, fewer than one global batch of {micro * accum * world}; "
            f"use a smaller train.batch_size or fewer processes"
        )
    lengths = train.lengths if (cfg.padding == "batch" and cfg.bucket) else None
    sampler = ShardedSampler(train, world, rank, micro, accum, seed, lengths)
    collate = Collate(cfg.pad_token_id, fixed_length(cfg, length))
    loader = DataLoader(train, batch_size=micro, sampler=sampler, collate_fn=collate, drop_last=False,
                        num_workers=num_workers, pin_memory=pin_memory, persistent_workers=num_workers > 0)
    return Loaders(loader, sampler, datasets, collate, length)


def eval_loader(loaders: Loaders, split_name: str, batch_size: int, world: int, rank: int, limit: int | None = None) -> DataLoader:
    ds = loaders.datasets[split_name]
    sampler = ShardedEvalSampler(len(ds), world, rank, limit)
    return DataLoader(ds, batch_size=batch_size, sampler=sampler, collate_fn=loaders.collate)


def write_splits(splits: dict[str, pd.DataFrame], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        frame[["text", "label"]].to_csv(out_dir / f"{name}.csv", index=False)


def mean_length(ds: SpamDataset) -> float:
    return sum(ds.lengths) / max(1, len(ds))

