"""The token cache (`lora_dist/token_cache.py`): every input format and the column choice, cache hits, misses,
corrupt and outdated caches, changed sources, two processes preparing at once, the SMS splits exactly as
before, and bad input naming file, row and column."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from lora_dist import token_cache as tc
from lora_dist.config import DataConfig
from lora_dist.data import build_datasets, encode, prepare_splits, read_sms, shipped_sms_path, split_labels
from lora_dist.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def sms_frame(n: int = 60) -> pd.DataFrame:
    frame = read_sms(shipped_sms_path())
    return frame.groupby("label").head(n // 2).reset_index(drop=True)


def rows_of(cache: tc.TokenCache) -> list[tuple[list[int], str]]:
    off, names = cache.offsets, cache.label_names
    return [(cache.ids[off[r] : off[r + 1]].tolist(), names[cache.labels[r]]) for r in range(len(cache))]


def expected(frame: pd.DataFrame, limit: int = 1024) -> list[tuple[list[int], str]]:
    ids, _ = encode(frame["text"].tolist(), limit)
    return list(zip(ids, frame["label"].str.strip().tolist(), strict=True))


def quiet(*_):
    pass


# ------------------------------------------------------------------------------------------ formats


def write_as(frame: pd.DataFrame, path: Path, text: str = "text", label: str = "label") -> Path:
    renamed = frame.rename(columns={"text": text, "label": label})[[label, text]]  # columns in another order
    fmt = path.suffix
    if fmt == ".csv":
        renamed.to_csv(path, index=False)
    elif fmt == ".tsv":
        renamed.to_csv(path, sep="\t", index=False)
    elif fmt == ".jsonl":
        renamed.to_json(path, orient="records", lines=True, force_ascii=False)
    elif fmt == ".parquet":
        renamed.to_parquet(path, index=False)
    return path


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_each_format_and_column_choice_gives_the_same_ids_as_encode(tmp_path, suffix, monkeypatch):
    """Read in chunks of 7 rows (several chunks), columns picked by data.text_column / data.label_column."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    monkeypatch.setattr(tc, "CHUNK_ROWS", 7)
    frame = sms_frame(40)
    frame.loc[3, "text"] = 'quotes "here", a comma\tand a tab'
    src = write_as(frame, tmp_path / f"d{suffix}", text="Message", label="kind")
    cfg = DataConfig(source=str(src), text_column="message", label_column="kind", cache_dir=str(tmp_path / "c"))
    cache = tc.open_cache(cfg, 1024, say=quiet)
    assert rows_of(cache) == expected(frame)
    assert cache.label_names == ("ham", "spam") and cache.manifest["label_counts"] == {"ham": 20, "spam": 20}


def test_a_directory_of_shards_and_a_glob_read_in_name_order(tmp_path):
    frame = sms_frame(30)
    shards = tmp_path / "shards"
    shards.mkdir()
    write_as(frame[:10], shards / "part-0.csv")
    write_as(frame[10:22], shards / "part-1.jsonl")
    write_as(frame[22:], shards / "part-2.tsv")
    (shards / "README.txt").write_text("not data")
    d = tc.open_cache(DataConfig(source=str(shards), cache_dir=str(tmp_path / "c")), 1024, say=quiet)
    g = tc.open_cache(DataConfig(source=str(shards / "part-*"), cache_dir=str(tmp_path / "c")), 1024, say=quiet)
    assert rows_of(d) == rows_of(g) == expected(frame)
    assert d.key == g.key  # the same files, the same content: one cache


# ------------------------------------------------------------------------------------------ the cache


def test_hit_miss_changed_source_corrupt_and_outdated(tmp_path):
    src = write_as(sms_frame(20), tmp_path / "d.csv")
    cfg = DataConfig(source=str(src), cache_dir=str(tmp_path / "c"))
    said: list[str] = []
    first = tc.open_cache(cfg, 1024, say=said.append)
    assert sum("prepared the token cache" in s for s in said) == 1
    said.clear()
    again = tc.open_cache(cfg, 1024, say=said.append)
    assert again.path == first.path and not said  # a hit: nothing prepared, nothing said

    other_limit = tc.open_cache(cfg, 8, say=quiet)  # the limit is part of the key
    assert other_limit.key != first.key and max(np.diff(other_limit.offsets)) == 8

    (first.path / "ids.u16").write_bytes((first.path / "ids.u16").read_bytes()[:-2])  # cut short
    said.clear()
    rebuilt = tc.open_cache(cfg, 1024, say=said.append)
    assert any("is corrupt" in s and "rebuilding" in s for s in said), said
    assert rows_of(rebuilt) == expected(sms_frame(20))

    ids = first.path / "ids.u16"  # same size, other bytes: the edge checksum sees it
    raw = bytearray(ids.read_bytes())
    raw[0] ^= 1
    ids.write_bytes(bytes(raw))
    said.clear()
    assert rows_of(tc.open_cache(cfg, 1024, say=said.append)) == expected(sms_frame(20))
    assert any("is corrupt" in s for s in said), said

    manifest = first.path / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(m | {"format": 0}))
    said.clear()
    tc.open_cache(cfg, 1024, say=said.append)
    assert any("is outdated" in s for s in said), said

    write_as(sms_frame(22), src)  # the source changes: a new fingerprint, a new cache
    changed = tc.open_cache(cfg, 1024, say=quiet)
    assert changed.key != first.key and len(changed) == 22
    assert sorted(p.name for p in (tmp_path / "c").iterdir() if p.name.startswith("tokens-")) == sorted(
        {first.path.name, other_limit.path.name, changed.path.name}
    )


@pytest.mark.slow  # two Python processes that import torch: about 14 s on 2 loaded cores
def test_two_processes_preparing_one_cache_dir_at_once(tmp_path):
    """Real processes, started together: one prepares, the other waits for it and reads its cache."""
    frame = read_sms(shipped_sms_path())
    src = write_as(frame, tmp_path / "d.csv")
    go = tmp_path / "go"
    script = (
        "import sys, time, pathlib\n"
        "from lora_dist.config import DataConfig\n"
        "from lora_dist.token_cache import open_cache\n"
        f"while not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
        f"c = open_cache(DataConfig(source={str(src)!r}, cache_dir={str(tmp_path / 'c')!r}), 1024, say=print)\n"
        "print('rows', len(c), c.path.name)\n"
    )
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    go.touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    text = "".join(o for o, _ in outs)
    assert text.count("prepared the token cache") == 1, text
    assert len({line for line in text.splitlines() if line.startswith("rows ")}) == 1  # the same cache
    assert f"rows {len(frame)} " in text
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith((".tmp", "tokens-"))] == [
        next(line.split()[2] for line in text.splitlines() if line.startswith("rows "))
    ]


def test_a_held_lock_times_out_with_one_clear_error(tmp_path):
    src = write_as(sms_frame(10), tmp_path / "d.csv")
    (tmp_path / "c").mkdir()
    fd = os.open(tmp_path / "c" / ".prepare.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        cfg = DataConfig(source=str(src), cache_dir=str(tmp_path / "c"), cache_timeout_s=0.3)
        with pytest.raises(UserError, match="held the token cache lock .* data.cache_timeout_s"):
            tc.open_cache(cfg, 1024, say=quiet)
    finally:
        os.close(fd)
    assert len(tc.open_cache(cfg, 1024, say=quiet)) == 10  # free again: prepared


# ------------------------------------------------------------------------------------ the book, exactly


@pytest.mark.parametrize("balance", [True, False])
@pytest.mark.parametrize("padding", ["longest", "batch"])
def test_sms_splits_batches_and_lengths_are_what_pandas_gave(tmp_path, balance, padding):
    """The cached run data against the pandas path (`prepare_splits` + `build_datasets`): the same rows in the
    same order, the same padding length, and the same training batches from the same sampler."""
    from lora_dist.train.loaders import make_loaders

    cfg = DataConfig(balance=balance, padding=padding, cache_dir=str(tmp_path / "c"))
    data = tc.run_data(cfg, 1024, say=quiet)
    splits = prepare_splits(cfg)
    datasets, length = build_datasets(splits, cfg, 1024, split_labels(splits, cfg))
    assert data.labels == split_labels(splits, cfg) and data.length == length
    if balance:
        assert {k: len(v) for k, v in data.splits.items()} == {"train": 1045, "validation": 149, "test": 300}
    for k in datasets:
        assert [data.datasets[k][i] for i in range(len(datasets[k]))] == [
            datasets[k][i] for i in range(len(datasets[k]))
        ]
        assert data.datasets[k].lengths.tolist() == list(datasets[k].lengths)

    def batches(ds):
        loaders = make_loaders(ds, length, cfg, 4, 2, 1, 0, 123)
        loaders.sampler.set_epoch(1)
        return [(b.ids.tolist(), b.labels.tolist()) for b in loaders.train]

    assert batches(data.datasets) == batches(datasets)


def test_the_run_records_its_splits_by_reference(tmp_path):
    cfg = DataConfig(cache_dir=str(tmp_path / "c"), write_splits=False)
    data = tc.run_data(cfg, 1024, say=quiet)
    tc.write_split_record(data, cfg, tmp_path / "splits", quiet)
    assert sorted(p.name for p in (tmp_path / "splits").iterdir()) == ["index.npz", "splits.json"]
    record, index = tc.read_split_record(tmp_path)
    assert record["fingerprint"] == data.fingerprint and record["cache"]["key"] == data.cache.key
    assert {k: v.tolist() for k, v in index.items()} == {k: v.tolist() for k, v in data.splits.items()}
    tc.write_split_record(data, DataConfig(write_splits=True), tmp_path / "splits", quiet)  # asked for: CSV copies
    test = pd.read_csv(tmp_path / "splits" / "test.csv", keep_default_na=False)
    assert test["text"].tolist() == prepare_splits(cfg)["test"]["text"].tolist()


# ------------------------------------------------------------------------------------------ bad input


def cache_error(tmp_path, name: str, content: bytes | str, **kw) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(UserError) as e:
        tc.open_cache(DataConfig(source=str(path), cache_dir=str(tmp_path / "c"), **kw), 1024, say=quiet)
    return str(e.value)


def test_a_malformed_row_deep_in_a_file_names_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(tc, "CHUNK_ROWS", 10)
    rows = [f"message {i},ham" for i in range(95)] + ['a, b, "c",spam'] + [f"m {i},spam" for i in range(5)]
    err = cache_error(tmp_path, "bad.csv", "text,label\n" + "\n".join(rows) + "\n")
    assert "bad.csv is not a well-formed CSV file" in err and "line 97" in err and "'text'" in err, err


def test_a_missing_column_names_the_columns_found(tmp_path):
    err = cache_error(tmp_path, "d.csv", "body,label\nhi,ham\n")
    assert "has no column 'text'" in err and "['body', 'label']" in err and "data.text_column" in err, err
    err = cache_error(tmp_path, "d.jsonl", '{"text": "hi", "label": "ham"}\n{"body": "x", "label": "spam"}\n')
    assert "d.jsonl line 2 has no key 'text'" in err and "['body', 'label']" in err, err


def test_empty_texts_and_labels_are_reported_with_their_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(tc, "CHUNK_ROWS", 4)
    body = "text,label\n" + "".join(f"m{i},{'ham' if i % 2 else 'spam'}\n" for i in range(9))
    err = cache_error(tmp_path, "a.csv", body + ",ham\nok,spam\n,spam\n")
    assert "a.csv has an empty message at rows 10, 12" in err, err
    err = cache_error(tmp_path, "b.csv", body + "x,\n")
    assert "b.csv has a message without a label at row 10" in err, err


def test_bad_jsonl_and_parquet_values_name_line_row_and_column(tmp_path):
    err = cache_error(tmp_path, "d.jsonl", '{"text": "hi", "label": "ham"}\n{"text": "x", "label": "spam"\n')
    assert "d.jsonl line 2 is not a JSON object" in err, err
    err = cache_error(tmp_path, "e.jsonl", '{"text": "hi", "label": "ham"}\n{"text": 5, "label": "spam"}\n')
    assert "e.jsonl line 2, column 'text'" in err and "must be a string" in err, err
    pytest.importorskip("pyarrow")
    pd.DataFrame({"text": ["a", None, "c"], "label": ["ham", "spam", "ham"]}).to_parquet(tmp_path / "n.parquet")
    with pytest.raises(UserError, match=r"n.parquet row 2, column 'text'"):
        tc.open_cache(DataConfig(source=str(tmp_path / "n.parquet"), cache_dir=str(tmp_path / "c")), 1024, quiet)
    err = cache_error(tmp_path, "x.parquet", b"not parquet at all")
    assert "x.parquet is not a readable Parquet file" in err, err


def test_parquet_without_pyarrow_says_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    err = cache_error(tmp_path, "d.parquet", b"PAR1")
    assert "needs pyarrow" in err and "pip install 'lora-dist[parquet]'" in err, err


def test_not_utf8_and_a_glob_without_matches(tmp_path):
    err = cache_error(tmp_path, "l.csv", "text,label\nok,ham\ncaf\u00e9,spam\n".encode("latin-1"))
    assert "l.csv is not UTF-8 (bad byte at line 3)" in err, err
    with pytest.raises(UserError, match="matches no file"):
        tc.open_cache(DataConfig(source=str(tmp_path / "none-*.csv")), 1024, quiet)


def test_eval_reads_a_split_recorded_by_reference(smoke_run, tmp_path):
    """A run without CSV copies of its splits: `eval` reads the split's rows from the cache, and scores it as
    it scores the CSV copy."""
    import shutil

    from lora_dist.infer.evaluate import evaluate_run

    run = tmp_path / "run"
    shutil.copytree(smoke_run[0], run)
    from_csv = evaluate_run(run, "validation", device="cpu")
    for f in (run / "splits").glob("*.csv"):
        f.unlink()
    by_reference = evaluate_run(run, "validation", device="cpu")
    assert by_reference["count"] == from_csv["count"] == 149
    assert by_reference["confusion"] == from_csv["confusion"]
    assert by_reference["loss"] == pytest.approx(from_csv["loss"], abs=1e-6)
