"""The GPT-2 BPE tokenizer through tiktoken, built offline from the vocabulary files in the package.

tiktoken's own loader checks the files against the sha256 it expects for its "gpt2" encoding, so
the result is the same `tiktoken.Encoding` as `tiktoken.get_encoding("gpt2")`, with no download.
"""

from __future__ import annotations

import functools
from importlib import resources

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import r50k_pat_str

from babygpt.config import BabyGPTError

EOT = 50256  # <|endoftext|>
VOCAB_SIZE = 50257

# The hashes tiktoken pins for the gpt2 encoding (tiktoken_ext/openai_public.py).
_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def asset_path(*parts: str) -> str:
    return str(resources.files("babygpt").joinpath("assets", *parts))


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=asset_path("gpt2", "vocab.bpe"),
        encoder_json_file=asset_path("gpt2", "encoder.json"),
        vocab_bpe_hash=_VOCAB_BPE_SHA256,
        encoder_json_hash=_ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=VOCAB_SIZE,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": EOT},
    )


def encode_prompt(text: str) -> list[int]:
    """Encode user text; `<|endoftext|>` written literally is the document separator."""
    if not text:
        raise BabyGPTError("the prompt is empty; pass some text with --prompt")
    try:
        return get_tokenizer().encode(text, allowed_special={"<|endoftext|>"})
    except (ValueError, UnicodeEncodeError) as e:
        raise BabyGPTError(f"the tokenizer cannot encode the prompt ({e})") from None
