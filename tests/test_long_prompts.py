"""Long prompts, AUTOMATIC1111-style (`text_encoder.chunk_ids`, `encode_chunked`, `match_lengths`), and the
truncation test the API warns with. Today's truncation stays the default and is what a short prompt gets."""
from __future__ import annotations

import pytest
import torch

from controlnet_canny.text_encoder import (
    END_ID, START_ID, _encode, chunk_ids, is_truncated, match_lengths, token_count, tokenize,
)
from controlnet_canny.unet import multihead_attention

CAT, COMMA, DOG = _encode("cat")[0], _encode(",")[0], _encode("dog")[0]
SHORT = "a photo of a cat, best quality, extremely detailed"
LONG_200 = " ".join(["cat"] * 100 + ["dog"] * 100)  # 200 tokens, no comma: plain 75-token chunks


def _content(chunk: list[int]) -> list[int]:
    """A chunk's prompt tokens: between its start id and the end-id padding."""
    assert len(chunk) == 77 and chunk[0] == START_ID and chunk[-1] == END_ID
    body = chunk[1:]
    while body and body[-1] == END_ID:
        body = body[:-1]
    return body


def test_single_token_words():
    assert [len(_encode(w)) for w in ("cat", ",", "dog")] == [1, 1, 1] and COMMA == 267
    assert token_count(LONG_200) == 200


# --- chunking ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", SHORT, " ".join(["cat"] * 75)])
def test_short_prompt_is_one_chunk_equal_to_tokenize(prompt):
    assert chunk_ids(prompt) == [tokenize(prompt)]


def test_long_prompt_plain_chunks_keep_every_token():
    chunks = chunk_ids(LONG_200)
    assert len(chunks) == 3 and [len(_content(c)) for c in chunks] == [75, 75, 50]
    assert chunks[0] == tokenize(LONG_200)  # the first chunk is today's truncated encoding
    assert sum((_content(c) for c in chunks), []) == _encode(LONG_200)
    assert chunks[2] == [START_ID] + [DOG] * 50 + [END_ID] * 26


@pytest.mark.parametrize("comma_at, wraps", [(60, True), (55, True), (54, False), (50, False), (74, False)])
def test_word_wrap_at_a_comma_within_the_last_20_tokens(comma_at, wraps):
    """A chunk that fills up moves the words after its last comma to the next chunk, if that comma is one of
    its last 20 tokens (index >= 55 of 75)."""
    tokens = [CAT] * comma_at + [COMMA] + [DOG] * (90 - comma_at)  # 91 tokens
    chunks = chunk_ids(" ".join("," if t == COMMA else "cat" if t == CAT else "dog" for t in tokens))
    assert len(chunks) == 2
    first = comma_at + 1 if wraps else 75  # a comma at index 74 ends the chunk anyway: nothing to move
    assert _content(chunks[0]) == tokens[:first] and _content(chunks[1]) == tokens[first:]


def test_comma_that_starts_a_chunk_does_not_wrap():
    chunks = chunk_ids(" ".join(["cat"] * 75) + ", dog")
    assert [_content(c) for c in chunks] == [[CAT] * 75, [COMMA, DOG]]


def test_wrap_only_looks_at_the_current_chunk():
    # the comma at 60 wraps chunk 1; chunk 2 (30 dogs + 45 cats) has no comma of its own and splits plainly
    tokens = [CAT] * 60 + [COMMA] + [DOG] * 30 + [CAT] * 60
    chunks = chunk_ids(" ".join("," if t == COMMA else "cat" if t == CAT else "dog" for t in tokens))
    assert [len(_content(c)) for c in chunks] == [61, 75, 15]
    assert sum((_content(c) for c in chunks), []) == tokens


# --- truncation test for the API's warning ------------------------------------------------------------------

@pytest.mark.parametrize("prompt, truncated", [
    ("", False), (SHORT, False), (" ".join(["cat"] * 75), False), (" ".join(["cat"] * 76), True), (LONG_200, True),
])
def test_is_truncated_beyond_75_tokens(prompt, truncated):
    assert is_truncated(prompt) is truncated
    assert (tokenize(prompt)[1:1 + token_count(prompt)] != _encode(prompt)) is truncated  # tokens were lost


# --- encoding ------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def text_encoder(tiny_pipeline):
    return tiny_pipeline.model.cond_stage_model


def test_short_prompt_context_is_todays(text_encoder):
    with torch.inference_mode():
        for prompt in ("", SHORT):
            assert torch.equal(text_encoder.encode_chunked(prompt), text_encoder([prompt]))


def test_long_prompt_context_is_the_chunks_concatenated(text_encoder):
    with torch.inference_mode():
        context = text_encoder.encode_chunked(LONG_200)
        truncated = text_encoder([LONG_200])
        last = text_encoder.transformer.text_model(torch.tensor([chunk_ids(LONG_200)[2]]))
    assert context.shape == (1, 231, 32)
    assert torch.equal(context[:, :77], truncated)
    assert torch.equal(context[:, 154:], last)  # each chunk encoded alone, at positions 0-76
    assert (context[:, 77:154] - truncated).abs().max() > 1e-2  # the second chunk is its own text


# --- negative padded to the positive's chunk count ----------------------------------------------------------

def test_match_lengths_pads_the_shorter_with_empty_chunks():
    g = torch.Generator().manual_seed(0)
    cond, uncond, empty = (torch.randn(2, 77 * k, 8, generator=g) for k in (3, 1, 1))
    empty = empty[:1]
    padded_cond, padded_uncond = match_lengths(cond, uncond, empty)
    assert padded_cond is cond and padded_uncond.shape == (2, 231, 8)
    assert torch.equal(padded_uncond[:, :77], uncond)
    assert torch.equal(padded_uncond[:, 77:154], empty.expand(2, -1, -1))
    assert torch.equal(padded_uncond[:, 154:], empty.expand(2, -1, -1))
    # a negative longer than the prompt pads the prompt
    swapped_uncond, swapped_cond = match_lengths(uncond, cond, empty)
    assert swapped_cond is cond and torch.equal(swapped_uncond, padded_uncond)
    same = match_lengths(cond, cond, empty)
    assert same[0] is cond and same[1] is cond


# --- the networks attend over any number of context tokens -------------------------------------------------

def test_attention_over_231_keys_matches_plain_attention(tiny_pipeline):
    """The attention the pipeline installed (the AVX-512 kernel where the CPU has it) at 231 keys, a count
    that is not a multiple of its key tile."""
    attend = tiny_pipeline.model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn2.attend
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, tokens, 32, generator=g) for tokens in (64, 231, 231))
    ours, plain = attend(q, k, v, 8), multihead_attention(q, k, v, 8)
    assert ours.shape == (2, 64, 32) and (ours - plain).abs().max() < 1e-5


def test_unet_and_controlnet_take_a_231_token_context(tiny_pipeline):
    """Attention over a context repeated three times equals attention over it once (each key's weight is split
    in three, over three equal values), so three copies of a 77-token context must give the 77-token output;
    a different second and third chunk must not."""
    model = tiny_pipeline.model
    unet, control_model = model.model.diffusion_model, model.control_model
    g = torch.Generator().manual_seed(2)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([951, 1])
    hint = control_model.encode_hint((torch.rand(2, 3, 64, 64, generator=g) > 0.8).float())
    context, other = torch.randn(2, 77, 32, generator=g), torch.randn(2, 154, 32, generator=g)

    def eps(ctx):
        return unet(x, t, ctx, control_model(x, hint, t, ctx))

    with torch.inference_mode():
        once, thrice, mixed = eps(context), eps(context.repeat(1, 3, 1)), eps(torch.cat([context, other], dim=1))
    assert once.shape == thrice.shape == mixed.shape == (2, 4, 8, 8)
    assert (thrice - once).abs().max() < 1e-4 * max(1.0, once.abs().max().item())
    assert (mixed - once).abs().max() > 1e-2
