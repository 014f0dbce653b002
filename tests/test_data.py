"""The SMS data: all rows, the book's balance and split, user files, bad files, the real download path."""

import http.server
import threading
import zipfile
from functools import partial

import pandas as pd
import pytest
import torch

from lora_dist import UserError
from lora_dist.config import DataConfig
from lora_dist.data import (
    Collate,
    SpamDataset,
    balance,
    build_datasets,
    download_sms,
    label_order,
    load_frame,
    prepare_splits,
    read_sms,
    read_table,
    shipped_sms_path,
    sms_path,
    split,
    split_labels,
)
from lora_dist.train.loaders import ShardedSampler


def test_all_rows_read_with_quoting_off():
    frame = read_sms(shipped_sms_path())
    assert len(frame) == 5574
    assert frame["label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}
    # A line with a stray quote character survives intact instead of swallowing the next lines.
    assert frame["text"].str.contains('"').sum() > 0


def test_book_balance_and_split():
    splits = prepare_splits(DataConfig(download=False))
    assert {k: len(v) for k, v in splits.items()} == {"train": 1045, "validation": 149, "test": 300}
    full = balance(read_sms(shipped_sms_path()), seed=123)
    assert full["label"].value_counts().to_dict() == {"ham": 747, "spam": 747}
    # Same seed, same rows: the split is a pure function of the data and the seed.
    again = prepare_splits(DataConfig(download=False))
    assert again["test"]["text"].tolist() == splits["test"]["text"].tolist()
    other = prepare_splits(DataConfig(download=False, seed=7))
    assert other["test"]["text"].tolist() != splits["test"]["text"].tolist()


def test_longest_padding_is_the_books_120_tokens():
    splits = prepare_splits(DataConfig(download=False))
    ds, length = build_datasets(splits, DataConfig(padding="longest"), 1024)
    assert length == 120
    assert max(ds["test"].lengths) <= 120
    batch = Collate(50256, length)([ds["train"][i] for i in range(4)])
    assert batch.ids.shape == (4, 120)
    assert (batch.ids[torch.arange(4), batch.last] != 50256).all()


def test_truncation_to_the_context():
    splits = prepare_splits(DataConfig(download=False))
    ds, _ = build_datasets(splits, DataConfig(padding="batch"), 16)
    assert max(ds["train"].lengths) == 16


def test_user_csv_and_tsv(tmp_path):
    rows = [
        ("hello there", "ham"),
        ("WIN cash now, text 80082", "spam"),
        ("see you, at 5", "ham"),
        ("FREE prize", "spam"),
    ]
    csv_file = tmp_path / "mine.csv"
    csv_file.write_text("text,label\n" + "".join(f'"{t}",{label}\n' for t, label in rows))
    tsv_file = tmp_path / "mine.tsv"
    tsv_file.write_text("label\ttext\n" + "".join(f"{1 if label == 'spam' else 0}\t{t}\n" for t, label in rows))
    assert read_table(csv_file)["label"].tolist() == [label for _, label in rows]
    assert read_table(tsv_file)["label"].tolist() == ["0", "1", "0", "1"]  # labels are data: kept as written
    for f in (csv_file, tsv_file):
        assert read_table(f)["text"].tolist() == [t for t, _ in rows]
    assert len(load_frame(str(csv_file))) == 4


def test_any_label_strings_in_sorted_or_configured_order(tmp_path):
    """Three classes with their own names: sorted (numerically for integers) unless data.labels orders
    them; balance undersamples every class to the smallest; a label the config does not name is refused."""
    rows = [(f"message {i}", label) for i, label in enumerate(["positive"] * 9 + ["negative"] * 5 + ["neutral"] * 7)]
    f = tmp_path / "sentiment.csv"
    f.write_text("text,label\n" + "".join(f"{t},{label}\n" for t, label in rows))
    cfg = DataConfig(source=str(f), train_frac=0.6, val_frac=0.2)
    splits = prepare_splits(cfg)
    assert split_labels(splits, cfg) == ("negative", "neutral", "positive")
    assert sum(len(v) for v in splits.values()) == 15  # 3 classes x the 5 of the smallest
    assert pd.concat(splits.values())["label"].value_counts().to_dict() == {"negative": 5, "neutral": 5, "positive": 5}
    ordered = DataConfig(source=str(f), labels=("positive", "neutral", "negative"), balance=False)
    assert split_labels(prepare_splits(ordered), ordered) == ("positive", "neutral", "negative")
    ds = SpamDataset(splits["train"], 16, ("positive", "neutral", "negative"))
    assert ds.labels == [("positive", "neutral", "negative").index(x) for x in splits["train"]["label"]]
    assert label_order(["10", "9", "2"]) == ("2", "9", "10")
    with pytest.raises(UserError, match="'neutral', which data.labels"):
        split_labels(splits, DataConfig(source=str(f), labels=("positive", "negative")))
    with pytest.raises(UserError, match="not one of the model's labels"):
        SpamDataset(splits["train"], 16, ("ham", "spam"))
    with pytest.raises(UserError, match="at least two classes"):
        label_order(["ham", "ham"])


@pytest.mark.parametrize(
    "content,message",
    [
        (b"", "is empty"),
        (b"message,kind\nhi,ham\n", "needs columns 'text' and 'label'"),
        (b"text,label\n", "a header but no messages"),
        (b"text,label\nhi,ham\nbuy,\n", "without a label at row 2"),
        ("text,label\ncaf\u00e9,ham\nx,spam\n".encode("latin-1"), "not UTF-8"),
    ],
)
def test_bad_files(tmp_path, content, message):
    f = tmp_path / "bad.csv"
    f.write_bytes(content)
    with pytest.raises(UserError, match=message):
        read_table(f)


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_frame(str(tmp_path / "nope.csv"))


def test_split_without_test_set_is_refused():
    with pytest.raises(UserError, match="leaves no test set"):
        DataConfig(train_frac=0.8, val_frac=0.2)


def _serve(directory):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_real_download_from_a_local_server(tmp_path):
    """The UCI zip, served over HTTP on loopback: downloaded, extracted, verified, cached."""
    site = tmp_path / "site"
    site.mkdir()
    with zipfile.ZipFile(site / "sms.zip", "w") as z:
        z.writestr("readme", "SMS Spam Collection")
        z.write(shipped_sms_path(), "SMSSpamCollection")
    server = _serve(site)
    try:
        url = f"http://127.0.0.1:{server.server_port}/sms.zip"
        got = download_sms(url, cache_dir=tmp_path / "cache")
        assert got.read_bytes() == shipped_sms_path().read_bytes()
        assert got.parent == tmp_path / "cache"
        (site / "bad.zip").write_bytes(b"not a zip")
        with pytest.raises(ValueError, match="not the UCI zip"):
            download_sms(f"http://127.0.0.1:{server.server_port}/bad.zip", cache_dir=tmp_path / "cache2")
    finally:
        server.shutdown()


def test_falls_back_to_the_shipped_copy_offline(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path))
    notes = []
    path = sms_path(DataConfig(url="http://127.0.0.1:9/sms.zip", download=True), say=notes.append)
    assert path == shipped_sms_path()
    assert notes and "shipped" in notes[0]


def test_no_network_by_default(monkeypatch, tmp_path):
    """The default config reads the shipped copy and never opens a URL; only data.download=true does."""
    import urllib.request

    opened = []

    def no_network(url, *a, **k):
        opened.append(url)
        raise OSError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    monkeypatch.setenv("LORA_DIST_CACHE", str(tmp_path))
    assert DataConfig().download is False
    notes = []
    assert sms_path(DataConfig(), say=notes.append) == shipped_sms_path() and not opened and not notes
    assert len(prepare_splits(DataConfig(), say=notes.append)["train"]) == 1045 and not opened and not notes
    assert sms_path(DataConfig(download=True), say=notes.append) == shipped_sms_path()
    assert opened == [DataConfig().url] and "shipped" in notes[0]


def test_global_batches_do_not_depend_on_world_size():
    """1, 2 or 4 ranks (with or without accumulation) see the same examples in each optimizer step."""
    ds = SpamDataset(split(read_sms(shipped_sms_path())[:203], 0.7, 0.1)["train"], 64)

    def steps(world, accum, bucket):
        micro = 8 // (world * accum)
        per_rank = []
        for r in range(world):
            s = ShardedSampler(ds, world, r, micro, accum, seed=5, lengths=ds.lengths if bucket else None)
            s.set_epoch(3)
            per_rank.append(list(s))
        n = len(per_rank[0]) // (micro * accum)
        return [sorted(i for r in per_rank for i in r[k * micro * accum : (k + 1) * micro * accum]) for k in range(n)]

    for bucket in (False, True):
        ref = steps(1, 1, bucket)
        assert len(ref) == len(ds) // 8
        assert steps(2, 1, bucket) == ref and steps(4, 1, bucket) == ref and steps(2, 2, bucket) == ref
        flat = [i for b in ref for i in b]
        assert len(flat) == len(set(flat))  # no example twice


def test_sampler_resumes_inside_an_epoch():
    ds = SpamDataset(split(read_sms(shipped_sms_path())[:120], 0.7, 0.1)["train"], 64)
    s = ShardedSampler(ds, 1, 0, 4, 1, seed=1)
    s.set_epoch(2)
    full = list(s)
    s.start_step = 3
    assert list(s) == full[12:]


def test_length_buckets_cut_padding_and_keep_batches_random():
    """transformers' group_by_length window (min(steps / 4, 50) batches): little padding, batches in random
    order, and every example still seen once per epoch."""
    cfg = DataConfig(download=False)
    train = SpamDataset(split(balance(read_sms(shipped_sms_path()), cfg.seed), 0.7, 0.1)["train"], 1024)
    lens = train.lengths

    def padding(lengths):
        s = ShardedSampler(train, 1, 0, 8, 1, seed=123, lengths=lengths)
        s.set_epoch(0)
        batches = s.global_batches()
        real = sum(lens[i] for b in batches for i in b)
        return s, batches, 1 - real / sum(8 * max(lens[i] for i in b) for b in batches)

    s, batches, bucketed = padding(lens)
    _, plain_batches, plain = padding(None)
    assert s.steps == 130 and s.bucket_window == 32
    assert bucketed < 0.08 and plain > 0.3, (bucketed, plain)
    assert sorted(i for b in batches for i in b) == sorted(i for b in plain_batches for i in b)
    widths = [max(lens[i] for i in b) for b in batches]
    assert widths != sorted(widths) and widths != sorted(widths, reverse=True)  # not long-to-short or back
