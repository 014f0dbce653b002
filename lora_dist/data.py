"""The SMS Spam Collection (or a user's own labelled file): download, read, balance, split; and the input the
model sees, the same in training and inference: `encode`, `Collate`, `Batch`, `batch_plan`.

Labels are data: any strings (`ham`/`spam`, `positive`/`negative`/`neutral`, `0`/`1`), ordered as
`data.labels` lists them, else sorted (numerically where they are all integers).

    python -c "from lora_dist.data import load_frame; print(load_frame('sms').label.value_counts())"

Data preparation is pure functions. Training's per-rank loaders are in `train/loaders.py`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import urllib.request
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from .config import DataConfig
from .device import default_pad_multiple
from .errors import UserError
from .tokenizer import cut, get_tokenizer

Say = Callable[[str], None]  # where progress and notes go (print, or a run's rank-0 output)
Example = tuple[list[int], int]  # a message's token ids and its class index, as a data set yields it

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
    cache_dir = Path(cache_dir or os.environ.get("LORA_DIST_CACHE") or Path.home() / ".cache" / "lora_dist")
    target = cache_dir / "SMSSpamCollection"
    if target.is_file() and _sha256(target.read_bytes()) == SMS_SHA256:
        return target
    with urllib.request.urlopen(url, timeout=timeout) as r:
        payload = r.read()
    try:
        with zipfile.ZipFile(io.BytesIO(payload)) as z:
            content = z.read("SMSSpamCollection")
    except (zipfile.BadZipFile, KeyError) as e:
        raise ValueError(f"{url} is not the UCI zip with SMSSpamCollection inside ({e})") from e
    if _sha256(content) != SMS_SHA256:
        raise ValueError(f"SMSSpamCollection from {url} has an unexpected sha256")
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")  # several ranks may download at once
    tmp.write_bytes(content)
    os.replace(tmp, target)
    return target


def sms_path(cfg: DataConfig, say: Say = print) -> Path:
    """The UCI file: the copy shipped in the package, verified by the same SHA-256 as a download. Only with
    `data.download: true` is it fetched from `data.url` (and cached); offline that falls back to the shipped copy."""
    if cfg.download:
        try:
            return download_sms(cfg.url)
        except (OSError, ValueError) as e:
            say(
                f"note: could not download the SMS data ({type(e).__name__}: {e}); using the copy shipped with lora-dist"
            )
    return shipped_sms_path()


def _sha256(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def read_sms(path: str | Path) -> pd.DataFrame:
    """The UCI file: `label<TAB>text`, no header, read with quoting off so all 5,574 rows come through."""
    text = _read_utf8(Path(path))
    frame = pd.read_csv(
        io.StringIO(text),
        sep="\t",
        header=None,
        names=["label", "text"],
        quoting=csv.QUOTE_NONE,
        dtype=str,
        keep_default_na=False,
    )
    return _validate(frame, Path(path))


def read_table(path: str | Path) -> pd.DataFrame:
    """A user's CSV or TSV (by extension, else sniffed) with a header holding `text` and `label`."""
    path = Path(path)
    text = _read_utf8(path)
    sep = (
        "\t"
        if path.suffix.lower() in (".tsv", ".tab") or (path.suffix.lower() != ".csv" and "\t" in text.split("\n", 1)[0])
        else ","
    )
    try:
        frame = pd.read_csv(io.StringIO(text), sep=sep, dtype=str, keep_default_na=False)
    except pd.errors.ParserError as e:
        raise UserError(
            f"{path} is not a well-formed {'TSV' if sep == chr(9) else 'CSV'} file ({str(e).strip().splitlines()[-1]}); "
            f"quote fields that hold the separator"
        ) from e
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
        raise UserError(
            f"{path} is not UTF-8 (bad byte at line {line}); re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8"
        ) from e
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
    odd = frame["label"].str.contains(r"[\x00-\x1f\x7f]", regex=True)
    if odd.any():
        row = int(frame.index[odd][0]) + 1
        raise UserError(
            f"{path} has the label {frame['label'][odd].iloc[0]!r} at row {row}, which holds a control character "
            f"(a stray NUL or tab, as from a binary or mis-exported file); labels found: {label_counts(frame)}; "
            f"fix that row"
        )
    if (frame["text"].str.len() == 0).any():
        row = int(frame.index[frame["text"].str.len() == 0][0]) + 1
        raise UserError(f"{path} has an empty message at row {row}; remove it")
    return frame.reset_index(drop=True)


def label_counts(frame: pd.DataFrame, most: int = 6) -> str:
    """The labels of `frame` with their message counts, e.g. "ham (4825), spam (747)"."""
    counts = frame["label"].value_counts()
    shown = [
        f"{label!r} ({n})" if not str(label).isprintable() else f"{label} ({n})" for label, n in counts[:most].items()
    ]
    return ", ".join(shown) + (f" and {len(counts) - most} more" if len(counts) > most else "")


def load_frame(source: str, cfg: DataConfig | None = None, say: Say = print) -> pd.DataFrame:
    cfg = cfg or DataConfig()
    if source == "sms":
        return read_sms(sms_path(cfg, say))
    return read_table(source)


# ----------------------------------------------------------------------------------------- labels


def _label_key(label: str) -> tuple[int, int, str]:
    return (0, int(label), "") if label.lstrip("-").isdigit() else (1, 0, label)


def label_order(
    labels: Iterable[str], wanted: tuple[str, ...] | None = None, source: str = "the data"
) -> tuple[str, ...]:
    """The class labels, in order: `wanted` (data.labels), checked against the data's, or the data's
    own, sorted (numerically when they are all integers). At least two are needed."""
    found = set(labels)
    if wanted:
        unknown = sorted(found - set(wanted), key=_label_key)
        if unknown:
            raise UserError(
                f"{source} has label {unknown[0]!r}, which data.labels {list(wanted)} does not name; "
                f"add it to data.labels or fix the data"
            )
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


def inverse_frequency(labels: Sequence[int] | np.ndarray, k: int, names: Sequence[str] | None = None) -> torch.Tensor:
    """data.balance=weight: each class's loss weight, n / (k * n_c) over the training labels (class indices), as
    scikit-learn's class_weight="balanced": a weighted mean over the messages of a batch drawn at these
    frequencies is 1 per message, as without weights."""
    counts = torch.bincount(torch.as_tensor(np.asarray(labels), dtype=torch.long), minlength=k).double()
    if (counts == 0).any():
        c = int((counts == 0).nonzero()[0])
        raise UserError(
            f"data.balance=weight: the training split has no message of class {names[c] if names else c!r}, "
            f"so it has no inverse frequency; use data.balance=none, or data with every class in training"
        )
    return (counts.sum() / (k * counts)).float()


def split(frame: pd.DataFrame, train_frac: float, val_frac: float, seed: int = 123) -> dict[str, pd.DataFrame]:
    """Shuffle, then cut into train/validation/test (the book's `random_split`)."""
    frame = frame.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(frame) * train_frac)
    val_end = train_end + int(len(frame) * val_frac)
    parts = {"train": frame[:train_end], "validation": frame[train_end:val_end], "test": frame[val_end:]}
    for name, part in parts.items():
        if len(part) == 0:
            raise UserError(
                f"the {name} split is empty ({len(frame)} messages, labels {label_counts(frame)}; "
                f"train_frac={train_frac}, val_frac={val_frac}); use more data or other fractions"
            )
    return {k: v.reset_index(drop=True) for k, v in parts.items()}


def fingerprint(splits: dict[str, pd.DataFrame]) -> str:
    """The SHA-256 of the prepared splits (each message and its label, in order): the data a run trains and
    is evaluated on. A resumed run checks it against its checkpoint's."""
    digest = hashlib.sha256()
    for name in sorted(splits):
        digest.update(f"{name}\0{len(splits[name])}\0".encode())
        for text, label in zip(splits[name]["text"], splits[name]["label"], strict=True):
            digest.update(f"{label}\0{text}\0".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()


def prepare_splits(cfg: DataConfig, say: Say = print) -> dict[str, pd.DataFrame]:
    frame = load_frame(cfg.source, cfg, say)
    if cfg.balance == "undersample":  # "weight" keeps every message and weights the loss instead
        frame = balance(frame, cfg.seed)
    return split(frame, cfg.train_frac, cfg.val_frac, cfg.seed)


# ------------------------------------------------------------------------------- the model's input


def encode(texts: list[str], max_length: int | None = None) -> tuple[list[list[int]], int]:
    """(token ids, how many messages were cut): GPT-2's BPE over the text only (a message that spells a
    control token such as <|endoftext|> gets it as text), each truncated to `max_length` tokens."""
    if isinstance(texts, str):
        raise TypeError("pass a list of messages, not one string")
    if max_length is None:
        return get_tokenizer().encode_batch([str(t) for t in texts], disallowed_special=()), 0
    # each cut first to what max_length tokens could need (tokenizer.cut): the same tokens, bounded work
    ids = get_tokenizer().encode_batch([cut(str(t), max_length) for t in texts], disallowed_special=())
    return [i[:max_length] for i in ids], sum(len(i) > max_length for i in ids)


class SpamDataset(Dataset):
    """Token ids (truncated to `max_length`) and class indices into `labels`."""

    def __init__(
        self, frame: pd.DataFrame, max_length: int, labels: tuple[str, ...] = SMS_LABELS, source: str = "the data"
    ):
        self.ids, _ = encode(frame["text"].tolist(), max_length)
        index = {label: i for i, label in enumerate(labels)}
        unknown = sorted(set(frame["label"]) - set(index))
        if unknown:
            raise UserError(
                f"{source} has label {unknown[0]!r}, which is not one of the model's labels {list(labels)}; "
                f"relabel the data or use a model trained on these labels"
            )
        self.labels = [index[label] for label in frame["label"]]
        self.lengths = [max(1, len(i)) for i in self.ids]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> Example:
        return self.ids[i], self.labels[i]


@dataclass
class Batch:
    ids: torch.Tensor  # (B, T) right-padded token ids
    last: torch.Tensor  # (B,) index of each sequence's last real token
    labels: torch.Tensor  # (B,)
    tokens: int  # real (non-pad) tokens in the batch

    def to(self, device: torch.device) -> Batch:
        nb = device.type == "cuda"
        return Batch(
            self.ids.to(device, non_blocking=nb),
            self.last.to(device, non_blocking=nb),
            self.labels.to(device, non_blocking=nb),
            self.tokens,
        )

    def pin_memory(self) -> Batch:
        """Page-locked copies, so that `to(cuda)` copies asynchronously. DataLoader(pin_memory=True) calls
        this on every batch it yields; without it the batch would stay in pageable memory."""
        return Batch(self.ids.pin_memory(), self.last.pin_memory(), self.labels.pin_memory(), self.tokens)

    def __len__(self) -> int:
        return self.ids.shape[0]


class Collate:
    """Right-pads to `fixed_length` (the book's `padding: longest`), or to the batch's longest message rounded
    up to a multiple of `multiple` (at most `cap` tokens, the model's context)."""

    def __init__(self, pad_id: int, fixed_length: int | None = None, multiple: int = 1, cap: int | None = None):
        self.pad_id, self.fixed_length, self.multiple, self.cap = pad_id, fixed_length, multiple, cap

    def __call__(self, items: Sequence[Example]) -> Batch:
        seqs = [ids if ids else [self.pad_id] for ids, _ in items]
        T = self.fixed_length or self.width(max(len(s) for s in seqs))
        ids = torch.full((len(seqs), T), self.pad_id, dtype=torch.long)
        for row, s in enumerate(seqs):
            ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
        last = torch.tensor([len(s) - 1 for s in seqs], dtype=torch.long)
        labels = torch.tensor([label for _, label in items], dtype=torch.long)
        return Batch(ids, last, labels, sum(len(s) for s in seqs))

    def width(self, longest: int) -> int:
        """The padded length of a batch whose longest message has `longest` tokens."""
        T = -(-longest // self.multiple) * self.multiple
        return max(longest, min(T, self.cap)) if self.cap is not None else T


def pad_multiple(cfg: DataConfig, device_type: str, padding_free: bool, few_shapes: bool = True) -> int:
    """What `padding: batch` rounds a batch's length up to: `data.pad_multiple`, else the device's default
    (`device.default_pad_multiple`: 64 on CUDA where few shapes pay, 1 on the CPU and for eager CUDA steps).
    Always 1 where padding changes what the head reads (`padding_free` False)."""
    if cfg.padding != "batch" or not padding_free:
        return 1
    if cfg.pad_multiple is not None:
        return cfg.pad_multiple
    return default_pad_multiple(device_type, few_shapes)


def batch_plan(
    lengths: list[int], batch_size: int, groups: list | None = None, order: list[int] | None = None
) -> list[list[int]]:
    """Inference batches as row positions: rows of one group (`groups[i]`; default one group) may share a
    padded batch; inside a group rows go by `order[i]` (e.g. their adapter, so a batch holds one run of
    rows per adapter), then longest first, so that a batch holds little padding; then cut into batches of
    at most `batch_size`."""
    n = len(lengths)
    groups = groups if groups is not None else [0] * n
    order = order if order is not None else [0] * n
    members: dict = {}
    for i in range(n):
        members.setdefault(groups[i], []).append(i)
    plan = []
    for rows in members.values():
        rows.sort(key=lambda i: (order[i], -lengths[i]))
        plan += [rows[s : s + batch_size] for s in range(0, len(rows), batch_size)]
    return plan


def build_datasets(
    splits: dict[str, pd.DataFrame], cfg: DataConfig, context_length: int, labels: tuple[str, ...] = SMS_LABELS
) -> tuple[dict[str, SpamDataset], int]:
    """The tokenized splits and the length messages are truncated to (and padded to, see `fixed_length`)."""
    limit = min(cfg.max_length or context_length, context_length)
    train = SpamDataset(splits["train"], limit, labels)
    # The book pads every split to the longest training message, truncating longer ones to it.
    length = max(train.lengths) if cfg.padding == "longest" else limit
    datasets = {"train": train} | {k: SpamDataset(splits[k], length, labels) for k in ("validation", "test")}
    return datasets, length


def fixed_length(cfg: DataConfig, length: int) -> int | None:
    """What every batch is padded to: `length` for padding longest/context, None (each batch's own) for batch."""
    return length if cfg.padding in ("longest", "context") else None


def write_splits(splits: dict[str, pd.DataFrame], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, frame in splits.items():
        frame[["text", "label"]].to_csv(out_dir / f"{name}.csv", index=False)


def mean_length(ds: SpamDataset) -> float:
    return sum(ds.lengths) / max(1, len(ds))
