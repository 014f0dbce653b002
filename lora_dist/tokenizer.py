"""GPT-2's BPE through tiktoken, built from the files shipped in the package (no network needed).

python -c "from lora_dist.tokenizer import get_tokenizer; print(get_tokenizer().encode('Hello, world!'))"

A message is cut (`cut`) to what its first `max_length` tokens could ever need before it is tokenized: a
1 GB line is never handed to the BPE whole (tiktoken asked for 34 GB and aborted the process).
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str  # GPT-2's pre-tokenizer pattern

EOT = 50256
# The longest GPT-2 token, in bytes (tests/test_hardening.py checks it against the vocabulary): n tokens stand
# for at most n * LONGEST_TOKEN bytes, so for at most that many characters.
LONGEST_TOKEN = 128
# What is kept past that bound: the pre-token (tiktoken's regex split) the cut falls in, and BPE merges near the
# cut, change only tokens next to it, far past the first max_length.
CUT_MARGIN = 64 * LONGEST_TOKEN
# The sha256 that tiktoken itself checks for these two files.
_VOCAB_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


@lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    assets = resources.files("lora_dist") / "assets"
    with resources.as_file(assets / "vocab.bpe") as bpe, resources.as_file(assets / "encoder.json") as enc:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(bpe),
            encoder_json_file=str(enc),
            vocab_bpe_hash=_VOCAB_SHA,
            encoder_json_hash=_ENCODER_SHA,
        )
    return tiktoken.Encoding(
        name="gpt2-lora-dist",
        explicit_n_vocab=50257,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )


def cut(text: str, max_tokens: int) -> str:
    """`text` cut to what its first `max_tokens` tokens could ever need: their tokens are those of the whole
    text. Short texts (every real message) are returned as they are."""
    limit = max_tokens * LONGEST_TOKEN + CUT_MARGIN
    return text if len(text) <= limit else text[:limit]
