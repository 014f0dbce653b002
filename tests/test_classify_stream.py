"""`classify --file` reads its input a chunk at a time (`infer/classify.py`): the chunks and rounds give back
every message, in order, as reading the whole file did. (Order under torchrun: tests/test_classify.py.)"""

from __future__ import annotations

import random

import pandas as pd
import pytest

from lora_dist.errors import UserError
from lora_dist.infer import classify as c


def test_text_lines_read_in_blocks_are_the_whole_files_lines(tmp_path, monkeypatch):
    """Blocks of 1-7 bytes cut \\r\\n pairs, multi-byte characters and a BOM: the lines are str.splitlines' lines."""
    rng = random.Random(1)
    path = tmp_path / "t.txt"
    for trial in range(300):
        monkeypatch.setattr(c, "CHUNK", rng.randint(1, 5))
        monkeypatch.setattr(c, "BLOCK", rng.randint(1, 7))
        parts = [
            rng.choice(["a", "bé", "", " x ", "\u2028y", "z\x0bw"]) + rng.choice(["\n", "\r\n", "\r"])
            for _ in range(rng.randint(0, 30))
        ]
        raw = ("\ufeff" if trial % 7 == 0 else "") + "".join(parts) + rng.choice(["", "tail"])
        path.write_bytes(raw.encode())
        chunks = list(c._text_lines(path))
        assert all(len(ch) <= c.CHUNK for ch in chunks)
        assert [line for ch in chunks for line in ch] == raw.encode().decode("utf-8-sig").splitlines()


def test_rounds_recut_chunks_in_order():
    chunks = [list(range(s, s + n)) for s, n in ((0, 5), (5, 0), (5, 9), (14, 1), (15, 3))]
    assert list(c.rounds(iter(chunks), 4)) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15], [16, 17]]
    assert list(c.rounds(iter([]), 4)) == []


def test_a_csv_is_read_in_chunks_and_bad_input_is_one_error(tmp_path, monkeypatch):
    monkeypatch.setattr(c, "CHUNK", 3)
    pd.DataFrame({"id": range(10), "text": [f"m {i}, with a comma" for i in range(10)]}).to_csv(
        tmp_path / "d.csv", index=False
    )
    chunks = list(c._from_file(tmp_path / "d.csv", "text"))
    assert [len(ch) for ch in chunks] == [3, 3, 3, 1] and sum(chunks, []) == [f"m {i}, with a comma" for i in range(10)]
    with pytest.raises(UserError, match=r"no column 'body' \(found \['id', 'text'\]\)"):
        list(c._from_file(tmp_path / "d.csv", "body"))
    (tmp_path / "l.txt").write_bytes("ok\nfine\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 \\(bad byte at line 3\\)"):
        list(c._from_file(tmp_path / "l.txt", "text"))
    (tmp_path / "l.csv").write_bytes("text\nok\ncaf\u00e9\n".encode("latin-1"))
    with pytest.raises(UserError, match="not UTF-8 \\(bad byte at line 3\\)"):
        list(c._from_file(tmp_path / "l.csv", "text"))


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_jsonl_and_parquet_are_read_in_chunks_by_their_text_column(tmp_path, monkeypatch, suffix):
    """As training reads them (token_cache.read_chunks), the text column only: no label column needed."""
    if suffix == ".parquet":
        pytest.importorskip("pyarrow")
    monkeypatch.setattr(c, "CHUNK", 4)
    frame = pd.DataFrame({"id": range(10), "Body": [f'm {i}, \u00e9 "q"\n2nd line' for i in range(10)]})
    path = tmp_path / f"d{suffix}"
    if suffix == ".jsonl":
        frame.to_json(path, orient="records", lines=True, force_ascii=False)
    else:
        frame.to_parquet(path, index=False)
    chunks = list(c._from_file(path, "body"))  # matched ignoring case, as a header is
    assert [len(ch) for ch in chunks] == [4, 4, 2] and sum(chunks, []) == frame["Body"].tolist()
    with pytest.raises(UserError, match=r"no (column|key) 'text' \(found \['id', 'Body'\]\); pass --text-column NAME"):
        list(c._from_file(path, "text"))


def test_a_jsonl_row_without_text_names_its_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\n{"text": 3}\n')
    with pytest.raises(UserError, match=r"d.jsonl line 4, column 'text': a message must be a string"):
        list(c._from_file(path, "text"))


def test_inference_bounds_the_cpu_kernel_caches_unless_the_user_set_them(monkeypatch):
    """oneDNN keeps a kernel (and its memory) per input shape, up to 1,024 of each cache by default; a packed
    CPU batch has a shape of its own, so a long classify grew by ~100 MB a round of 4,096 messages (1,227 MB
    at 60,000 lines, tiny model) until the caches filled. Inference bounds them; a user's setting stays."""
    import os

    from lora_dist import device

    monkeypatch.setenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "")  # recorded, so undone after the test
    monkeypatch.delenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY")
    monkeypatch.setenv("LRU_CACHE_CAPACITY", "7")
    device.bound_kernel_caches()
    assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == str(device.KERNEL_CACHE) and device.KERNEL_CACHE <= 64
    assert os.environ["LRU_CACHE_CAPACITY"] == "7"


def test_a_jsonl_line_over_the_limit_is_refused_before_it_is_read_whole(tmp_path, monkeypatch):
    """A file of one endless line must not be read into memory: token_cache reads at most MAX_LINE + 1 bytes of
    a line (training and classify alike)."""
    from lora_dist import token_cache

    monkeypatch.setattr(token_cache, "MAX_LINE", 1 << 20)
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n{"text": "' + "x" * (3 << 20) + '"}\n')
    reads: list[int] = []
    real_open = open

    class Counting:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

        def readline(self, n=-1):
            line = self.f.readline(n)
            reads.append(len(line))
            return line

    monkeypatch.setattr(token_cache, "open", lambda p, mode="r": Counting(real_open(p, mode)), raising=False)
    with pytest.raises(UserError, match=r"d.jsonl line 2 is over 1 MiB; one JSON object per line"):
        list(c._from_file(path, "text"))
    assert max(reads) <= (1 << 20) + 1
