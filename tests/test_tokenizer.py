"""The tokenizer is tiktoken's GPT-2 BPE, built offline from the files in the package."""

from __future__ import annotations

import pytest

from babygpt.config import BabyGPTError
from babygpt.tokenizer import EOT, VOCAB_SIZE, encode_prompt, get_tokenizer


@pytest.mark.parametrize(
    "text, ids",
    [
        ("Hello world", [15496, 995]),  # ids from OpenAI's GPT-2 vocabulary
        ("hello", [31373]),
        (" the", [262]),
        ("\n", [198]),
    ],
)
def test_known_gpt2_ids(text, ids):
    assert get_tokenizer().encode_ordinary(text) == ids


def test_vocabulary_size_and_end_of_text():
    enc = get_tokenizer()
    assert enc.n_vocab == VOCAB_SIZE == 50257
    assert enc.eot_token == EOT == 50256
    assert enc.name == "gpt2"


@pytest.mark.parametrize(
    "text",
    ["ROMEO:\nBut soft, what light", "naïve café — 日本語 🎉", "  spaces\tand\ttabs  ", "x" * 500],
)
def test_round_trip(text):
    enc = get_tokenizer()
    assert enc.decode(enc.encode_ordinary(text)) == text


def test_prompt_encoding_allows_the_document_separator():
    assert encode_prompt("a<|endoftext|>b") == [64, EOT, 65]


def test_empty_prompt_is_a_user_error():
    with pytest.raises(BabyGPTError, match="prompt is empty"):
        encode_prompt("")
