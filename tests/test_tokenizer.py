"""`text_encoder.tokenize` against the reference's tokenizer (Hugging Face CLIPTokenizer, openai/clip-vit-large-patch14).

The cross-check builds a transformers `CLIPTokenizer` offline from open_clip's shipped BPE file, written out as
vocab.json + merges.txt exactly as CLIP defines its vocabulary, so no model hub is needed.

One documented difference of the tokenizer built here: transformers 5 only has the `tokenizers`-backed
CLIPTokenizer, which normalizes with NFC + whitespace + lower case, whereas the reference's (transformers 4.x,
slow, with ftfy installed) first runs `ftfy.fix_text` (which uncurls quotes, narrows full-width letters,
fixes mojibake, unescapes HTML entities when the text holds no '<'). The reference is therefore reproduced
as `hf(ftfy.fix_text(prompt))`; for prompts that ftfy leaves alone this is `hf(prompt)` itself.
"""
from __future__ import annotations

import gzip
import json

import pytest

from controlnet_canny.text_encoder import END_ID, START_ID, tokenize

ftfy = pytest.importorskip("ftfy")

CONTEXT = 77

PLAIN = "a photo of a cat"
LONG = "a very detailed photo of " + "a red house with a green door, " * 12
PROMPTS = [
    PLAIN,
    "",
    "   \n\t  ",
    LONG,
    "A PHOTO Of a CAT",
    "Hello, World!!! ... ;-) (masterpiece:1.2) [a|b] {x} #tag @you 100% $5.99 a/b\\c ~`^*_+=?",
    "best quality, extremely detailed, 8k, ultra-hd, f/1.8, 35mm, (((bokeh))), --ar 16:9",
    "it's don't we're I've I'm you'll he'd THEY'LL",
    "1234567890 3.14159 2x4",
    "café naïve Ünïcødé façade jalapeño",
    "東京タワー 夜景 🐱🔥 — …",
    "Ελληνικά русский العربية हिन्दी 한국어",
    "“curly quotes” and ‘single’ ones",
    "ＦＵＬＬＷＩＤＴＨ ｔｅｘｔ",
    "cafÃ© mojibake",
    "black &amp; white <b>html</b>",
    "fish &amp; chips",
    "<|endoftext|> after a literal end token",
    "a literal <start_of_text> and <end_of_text>",
    "multiple   spaces\tand\nnewlines  ",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == len(set(vocab)) == 49408
    out = tmp_path_factory.mktemp("clip_tokenizer")
    (out / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}), encoding="utf-8")
    # merges.txt starts with a version line that CLIPTokenizer skips, as CLIP skips the file's first line.
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    tokenizer = transformers.CLIPTokenizer.from_pretrained(out, pad_token="<|endoftext|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (START_ID, END_ID, END_ID)
    return tokenizer


def reference_ids(tokenizer, prompt: str) -> list[int]:
    return tokenizer(ftfy.fix_text(prompt), padding="max_length", max_length=CONTEXT, truncation=True)["input_ids"]


def test_plain():
    assert tokenize(PLAIN) == [49406, 320, 1125, 539, 320, 2368, 49407] + [49407] * 70


def test_empty_and_blank():
    expected = [START_ID] + [END_ID] * 76
    assert tokenize("") == expected
    assert tokenize("   \n\t  ") == expected


def test_long_prompt_is_truncated_keeping_the_end_id_last():
    ids = tokenize(LONG)
    untruncated = tokenize(LONG, context_length=400)
    assert untruncated.index(END_ID) > CONTEXT  # the prompt really is longer than 77 tokens
    assert len(ids) == CONTEXT and ids[0] == START_ID and ids[-1] == END_ID
    assert ids[1:-1] == untruncated[1:CONTEXT - 1] and END_ID not in ids[:-1]


def test_length_boundaries():
    cat = 2368  # "cat</w>"
    assert tokenize("cat " * 75) == [START_ID] + [cat] * 75 + [END_ID]  # exactly fits, no padding
    assert tokenize("cat " * 76) == [START_ID] + [cat] * 75 + [END_ID]  # one too many: truncated
    assert tokenize("cat " * 74) == [START_ID] + [cat] * 74 + [END_ID, END_ID]


def test_case_and_whitespace_do_not_matter():
    assert tokenize("A PHOTO Of a CAT") == tokenize(PLAIN)
    assert tokenize("  a   photo\tof\na cat  ") == tokenize(PLAIN)


def test_literal_special_tokens():
    # The reference's pattern and BPE cache make a literal <|endoftext|> (any case) the end id ...
    ids = tokenize("<|endoftext|> a")
    assert ids[:4] == [START_ID, END_ID, 320, END_ID]
    assert tokenize("<|ENDOFTEXT|> a")[:4] == ids[:4]
    # ... while open_clip's spelling <end_of_text> is ordinary text there (open_clip's own encode makes it 49407).
    assert START_ID not in tokenize("<start_of_text>")[1:] and tokenize("<end_of_text>").index(END_ID) > 2


def test_ftfy_cleaning():
    assert tokenize("cafÃ©") == tokenize("café")  # mojibake fixed
    assert tokenize("“a”") == tokenize('"a"')  # quotes uncurled
    # HTML entities: unescaped by ftfy only when the text has no '<' (the reference never unescapes again,
    # unlike open_clip's encode, which also runs html.unescape twice).
    assert tokenize("fish &amp; chips") == tokenize("fish & chips")
    assert tokenize("&amp; <b>") != tokenize("& <b>")


@pytest.mark.parametrize("prompt", PROMPTS, ids=range(len(PROMPTS)))
def test_matches_transformers_clip_tokenizer(hf_tokenizer, prompt):
    assert tokenize(prompt) == reference_ids(hf_tokenizer, prompt)


def test_cross_check_covers_prompts_ftfy_leaves_alone(hf_tokenizer):
    """For prompts that ftfy does not change, the plain transformers tokenizer agrees with no help."""
    untouched = [p for p in PROMPTS if ftfy.fix_text(p) == p]
    assert len(untouched) >= 12
    for prompt in untouched:
        direct = hf_tokenizer(prompt, padding="max_length", max_length=CONTEXT, truncation=True)["input_ids"]
        assert tokenize(prompt) == direct, prompt
