"""The shipped BPE files give exactly tiktoken's own GPT-2 encoding, and what an independent tokenizer gives."""

import hashlib
import shutil
from importlib import resources

import pytest

from lora_dist.tokenizer import get_tokenizer

URLS = {
    "vocab.bpe": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
    "encoder.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
}
TEXTS = [
    "Hello, world!",
    "WINNER!! As a valued network customer you have been selected to receive a £900 prize reward!",
    "Ok lar... Joking wif u oni...",
    "  leading spaces\tand\ttabs\n\nnewlines 12345 ünïcödé 🙂",
    "<|endoftext|> is text here",
    "I'm sure you've they'll",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """tiktoken.get_encoding('gpt2') built by tiktoken itself, its download cache seeded with the same files
    (tiktoken checks their sha256), so no network is needed."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name, url in URLS.items():
        src = resources.files("lora_dist") / "assets" / name
        shutil.copy(str(src), cache / hashlib.sha1(url.encode()).hexdigest())
    import os

    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        import tiktoken.registry

        tiktoken.registry.ENCODINGS.pop("gpt2", None)
        return tiktoken.get_encoding("gpt2")
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR")
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old


def test_known_ids():
    assert get_tokenizer().encode("Hello, world!") == [15496, 11, 995, 0]
    assert get_tokenizer().n_vocab == 50257


@pytest.mark.parametrize("text", TEXTS)
def test_identical_to_tiktoken(reference, text):
    ours = get_tokenizer()
    assert ours.encode(text, disallowed_special=()) == reference.encode(text, disallowed_special=())
    assert ours.encode(text, allowed_special="all") == reference.encode(text, allowed_special="all")
    assert ours.decode(ours.encode(text, disallowed_special=())) == text


def test_identical_on_the_whole_sms_corpus(reference):
    from lora_dist.data import read_sms, shipped_sms_path

    texts = list(read_sms(shipped_sms_path())["text"])
    assert get_tokenizer().encode_batch(texts) == reference.encode_batch(texts)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    """transformers' GPT2TokenizerFast (Rust BPE, not tiktoken) from the same encoder.json and vocab.bpe, under
    the hub's names (vocab.json, merges.txt): a reference that shares none of tiktoken's code."""
    from transformers import GPT2TokenizerFast

    d = tmp_path_factory.mktemp("hf-gpt2-tokenizer")
    assets = resources.files("lora_dist") / "assets"
    shutil.copy(str(assets / "encoder.json"), d / "vocab.json")
    shutil.copy(str(assets / "vocab.bpe"), d / "merges.txt")
    return GPT2TokenizerFast.from_pretrained(str(d))


def test_identical_to_an_independent_tokenizer(hf_tokenizer):
    from lora_dist.data import read_sms, shipped_sms_path

    texts = TEXTS + list(read_sms(shipped_sms_path())["text"])
    ours = get_tokenizer().encode_batch(texts, allowed_special="all")  # <|endoftext|> is the special token, as in HF
    theirs = hf_tokenizer(texts, add_special_tokens=False)["input_ids"]
    assert ours[: len(TEXTS)] == theirs[: len(TEXTS)]
    assert [i for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) if a != b] == []
