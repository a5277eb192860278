"""Textual-inversion embeddings: reading AUTOMATIC1111's and diffusers' files (`embeddings.read_embedding`), their
use in prompts as the webui matches and chunks them (`text_encoder.EmbeddingIndex`, `token_slots`,
`chunk_slots`), the contexts they give, and parity with diffusers' `load_textual_inversion`.

Files are written by scripts/make_tiny_adapters.py in the real layouts; the text encoder is the tiny model's
(width 32).
"""
from __future__ import annotations

import copy

import pytest
import torch
from make_tiny_adapters import EMBEDDING_LAYOUTS, write_embedding
from safetensors.torch import save_file

from controlnet_canny.adapter_files import AdapterError
from controlnet_canny.embeddings import Embedding, read_embedding
from controlnet_canny.text_encoder import (
    EMBEDDING_SLOT_ID, END_ID, START_ID, EmbeddingIndex, _encode, chunk_ids, chunk_slots, embeddings_used,
    is_truncated, token_count, token_slots, tokenize,
)

WIDTH = 32
CAT, COMMA, DOG = _encode("cat")[0], _encode(",")[0], _encode("dog")[0]
SUFFIXES = {"a1111-pt": ".pt", "a1111-safetensors": ".safetensors", "diffusers": ".bin"}


def _embedding(vectors: int, seed: int) -> Embedding:
    return Embedding(torch.randn(vectors, WIDTH, generator=torch.Generator().manual_seed(seed)))


@pytest.fixture(scope="module")
def text_encoder(tiny_pipeline):
    return tiny_pipeline.model.cond_stage_model


# --- reading -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("vectors", [1, 3])
@pytest.mark.parametrize("layout, suffix", [*SUFFIXES.items(), ("diffusers", ".safetensors")])
def test_each_layout_reads_the_vectors_written(tmp_path, layout, suffix, vectors):
    path = tmp_path / f"style{suffix}"
    written = write_embedding(path, WIDTH, vectors, layout, seed=vectors)
    embedding = read_embedding(path, WIDTH)
    assert embedding.vectors.dtype == torch.float32 and embedding.vectors.device.type == "cpu"
    assert embedding.length == vectors and torch.equal(embedding.vectors, written)
    assert not embedding.vectors.requires_grad  # the webui's file holds the trained leaf


def test_a1111_pt_holds_the_webuis_keys(tmp_path):
    write_embedding(tmp_path / "style.pt", WIDTH, 2, "a1111-pt")
    content = torch.load(tmp_path / "style.pt", weights_only=True)
    assert set(content) == {"string_to_token", "string_to_param", "name", "step", "sd_checkpoint",
                            "sd_checkpoint_name"}
    assert content["name"] == "style" and content["string_to_param"]["*"].shape == (2, WIDTH)


def test_half_precision_and_bare_tensor_files(tmp_path):
    values = torch.randn(2, WIDTH)
    save_file({"emb_params": values.half()}, tmp_path / "half.safetensors")
    torch.save(values, tmp_path / "bare.pt")  # diffusers' load_textual_inversion takes a bare tensor too
    assert torch.equal(read_embedding(tmp_path / "half.safetensors", WIDTH).vectors, values.half().float())
    assert torch.equal(read_embedding(tmp_path / "bare.pt", WIDTH).vectors, values)


class Payload:
    """Not a tensor, container, number or string: a pickle holding it must be refused."""


@pytest.mark.parametrize("content, message", [
    ({"emb_params": torch.zeros(2, 768)}, "width 768, but this model's text encoder has width 32"),
    ({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, "SDXL"),
    ({"name": "style", "step": 10}, "not a textual-inversion embedding (keys: name, step)"),
    ({"string_to_param": {"*": "vectors"}, "name": "style"}, "string_to_param holds a str, not a tensor"),
    ({"string_to_param": {"*": torch.zeros(1, WIDTH), "#": torch.zeros(1, WIDTH)}}, "holds 2"),
    ({"a": torch.zeros(WIDTH), "b": torch.zeros(WIDTH)}, "not a textual-inversion embedding (keys: a, b)"),
    ([torch.zeros(1, WIDTH)], "holds a list"),
    ({"emb_params": torch.zeros(0, WIDTH)}, "0 vectors; an embedding has 1 to 75"),
    ({"emb_params": torch.zeros(76, WIDTH)}, "76 vectors"),
    ({"emb_params": torch.zeros(1, 2, WIDTH)}, "shape (1, 2, 32)"),
    ({"emb_params": torch.zeros(1, WIDTH, dtype=torch.int64)}, "torch.int64"),
    ({"emb_params": torch.tensor([[float("nan")] * WIDTH])}, "NaN or infinite"),
    ({"emb_params": Payload()}, "refused"),
])
def test_bad_files_are_named_errors(tmp_path, content, message):
    path = tmp_path / "broken.pt"
    torch.save(content, path)
    with pytest.raises(AdapterError, match="^broken.pt: ") as err:
        read_embedding(path, WIDTH)
    assert message in str(err.value)


def test_sdxl_safetensors_refused_by_name(tmp_path):
    save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, tmp_path / "xl.safetensors")
    with pytest.raises(AdapterError, match="xl.safetensors: an SDXL embedding"):
        read_embedding(tmp_path / "xl.safetensors", 768)


def test_every_layout_is_tested(tmp_path):
    assert set(SUFFIXES) == set(EMBEDDING_LAYOUTS)
    with pytest.raises(ValueError, match="unknown embedding layout 'comfy'"):
        write_embedding(tmp_path / "style.pt", WIDTH, 1, "comfy")
    assert not (tmp_path / "style.pt").exists()


@pytest.mark.parametrize("shape", [(0, WIDTH), (76, WIDTH), (WIDTH,)])
def test_an_embedding_is_1_to_75_vectors(shape):
    with pytest.raises(ValueError, match="n from 1 to 75"):
        Embedding(torch.zeros(shape))


# --- matching ------------------------------------------------------------------------------------------------

def test_longest_name_wins_and_uses_are_in_order():
    index = EmbeddingIndex({"bad": _embedding(1, 0), "bad_hands": _embedding(3, 1), "cat": _embedding(2, 2)})
    prompt = "bad_hands, a cat and a bad dog"
    assert embeddings_used(prompt, index) == ["bad_hands", "cat", "bad"]
    slots = token_slots(prompt, embeddings=index)
    # start, bad_hands (3 slots), ",", "a", cat (2), "and", "a", bad (1), "dog", end
    assert slots.ids[:13] == [START_ID, *[EMBEDDING_SLOT_ID] * 3, COMMA, _encode("a")[0], *[EMBEDDING_SLOT_ID] * 2,
                              *_encode("and a"), EMBEDDING_SLOT_ID, DOG, END_ID]
    assert [offset for offset, _ in slots.fixes] == [1, 6, 10]
    assert all(torch.equal(v, index[name].vectors) for (_, v), name in zip(slots.fixes, ["bad_hands", "cat", "bad"]))
    assert token_count(prompt, index) == 11 and token_count(prompt) == len(_encode(prompt)) == 10


@pytest.mark.parametrize("prompt, used", [
    ("a cat", True), ("A CAT!", True), ("cat,dog", True),  # case and punctuation: the same ids
    ("cats", False), ("catdog", False), ("concatenate", False),  # a whole-word name inside a word: other ids
])
def test_one_piece_name_as_a_word(prompt, used):
    assert embeddings_used(prompt, {"cat": _embedding(1, 0)}) == (["cat"] if used else [])


def test_ids_not_text_are_matched():
    """What matching BPE ids (as the webui does) implies beyond whole words: punctuation and digits are BPE'd
    apart from letters, so spacing around them does not matter; and the end of a longer word that BPE splits
    into the name's pieces uses the name ("badhands" = bad + hands</w>, "very badhands" splits alike)."""
    embeddings = {"bad_hands": _embedding(1, 0), "badhands": _embedding(1, 1), "negative": _embedding(1, 2),
                  "easynegative": _embedding(1, 3)}
    assert embeddings_used("bad _ hands", embeddings) == ["bad_hands"]
    assert embeddings_used("verybadhands", embeddings) == ["badhands"]
    assert embeddings_used("overnegative", embeddings) == ["negative"]
    # ... unless BPE splits the longer word otherwise: "veryeasynegative" is ver ye asy negative</w>
    assert embeddings_used("veryeasynegative", embeddings) == ["negative"]


def test_same_ids_first_name_in_sorted_order():
    index = EmbeddingIndex({"Style": _embedding(1, 0), "style": _embedding(2, 1)})
    assert embeddings_used("a STYLE", index) == ["Style"]


def test_name_without_tokens_is_refused():
    with pytest.raises(AdapterError, match="' '"):
        EmbeddingIndex({" ": _embedding(1, 0)})


# --- slots, truncation and chunks ----------------------------------------------------------------------------

def test_counts_and_truncation_count_slots():
    embeddings = {"cat": _embedding(3, 0)}
    fits, cut = " ".join(["dog"] * 72) + " cat", " ".join(["dog"] * 73) + " cat"
    assert (token_count(fits), token_count(fits, embeddings)) == (73, 75)
    assert not is_truncated(fits, 77, embeddings)
    assert (token_count(cut), token_count(cut, embeddings)) == (74, 76)
    assert not is_truncated(cut) and is_truncated(cut, 77, embeddings)


def test_truncation_keeps_the_first_vectors_of_an_embedding_at_the_cut():
    embedding = _embedding(3, 0)
    slots = token_slots(" ".join(["dog"] * 73) + " cat dog", embeddings={"cat": embedding})
    assert len(slots.ids) == 77 and slots.ids[-3:] == [EMBEDDING_SLOT_ID] * 2 + [END_ID]
    [(offset, vectors)] = slots.fixes
    assert offset == 74 and torch.equal(vectors, embedding.vectors[:2])


def _chunk_tokens(slots) -> list:
    """A chunk's slots between start and end padding: ids, with "E<name-length>" for an embedding's slots."""
    assert len(slots.ids) == 77 and slots.ids[0] == START_ID
    body = slots.ids[1:]
    while body and body[-1] == END_ID:
        body = body[:-1]
    for offset, vectors in slots.fixes:
        assert body[offset - 1:offset - 1 + len(vectors)] == [EMBEDDING_SLOT_ID] * len(vectors)
        body[offset - 1:offset - 1 + len(vectors)] = [f"E{len(vectors)}"] + [None] * (len(vectors) - 1)
    return [t for t in body if t is not None]


def test_an_embedding_that_does_not_fit_starts_the_next_chunk():
    embedding = _embedding(3, 0)
    prompt = " ".join(["dog"] * 73) + " cat dog"  # 73 + 3 + 1 slots
    chunks = chunk_slots(prompt, embeddings={"cat": embedding})
    assert [_chunk_tokens(c) for c in chunks] == [[DOG] * 73, ["E3", DOG]]
    assert chunks[1].fixes[0][0] == 1 and torch.equal(chunks[1].fixes[0][1], embedding.vectors)


def test_an_embedding_that_fills_a_chunk_exactly_stays():
    chunks = chunk_slots(" ".join(["dog"] * 72) + " cat dog", embeddings={"cat": _embedding(3, 0)})
    assert [_chunk_tokens(c) for c in chunks] == [[DOG] * 72 + ["E3"], [DOG]]


def test_word_wrap_moves_an_embedding_with_its_vectors():
    """60 dogs, a comma at slot 60, 10 dogs, a 3-vector embedding at slots 71-73, one dog fill the chunk; the
    next dog wraps at the comma (15 slots back), taking the embedding's slots and its vectors along."""
    embedding = _embedding(3, 0)
    prompt = " ".join(["dog"] * 60) + ", " + " ".join(["dog"] * 10) + " cat dog dog"
    chunks = chunk_slots(prompt, embeddings={"cat": embedding})
    assert [_chunk_tokens(c) for c in chunks] == [[DOG] * 60 + [COMMA], [DOG] * 10 + ["E3", DOG, DOG]]
    assert chunks[0].fixes == () and chunks[1].fixes[0][0] == 11
    assert token_count(prompt, {"cat": embedding}) == 75 + 1


def test_a_whole_chunk_embedding():
    chunks = chunk_slots("dog cat dog", embeddings={"cat": _embedding(75, 0)})
    assert [_chunk_tokens(c) for c in chunks] == [[DOG], ["E75"], [DOG]]


@pytest.mark.parametrize("prompt", ["", "a photo of a cat, best quality", " ".join(["cat", "dog"] * 100)])
def test_no_embedding_ids_are_todays(prompt):
    unused = EmbeddingIndex({"unicorn": _embedding(2, 0)})
    assert chunk_ids(prompt, embeddings=unused) == chunk_ids(prompt) and chunk_ids(prompt)[0] == tokenize(prompt)
    assert token_slots(prompt, embeddings=unused) == token_slots(prompt) and token_slots(prompt).fixes == ()
    assert token_count(prompt, unused) == token_count(prompt)


# --- contexts ------------------------------------------------------------------------------------------------

def test_no_embedding_contexts_are_bit_identical(text_encoder):
    prompts = ["a photo of a cat", "", "a house, best quality"]
    long_prompt = " ".join(["cat", "dog"] * 60)
    with torch.inference_mode():
        plain = text_encoder.transformer.text_model(torch.tensor([tokenize(p) for p in prompts]))
        chunked = text_encoder.encode_chunked(long_prompt)
        for embeddings in (None, {}, {"unicorn": _embedding(2, 0)}):
            assert torch.equal(text_encoder(prompts, embeddings), plain)
            assert torch.equal(text_encoder.encode_chunked(long_prompt, embeddings), chunked)


def test_vectors_replace_the_token_embeddings_of_their_slots(text_encoder):
    embedding = _embedding(3, 0)
    slots = token_slots("a cat on a mat", embeddings={"cat": embedding})
    layer = text_encoder.transformer.text_model.embeddings
    with torch.inference_mode():
        ids = torch.tensor([slots.ids])
        inputs = layer(ids, [slots.fixes])
        plain = layer(ids)
    position = layer.position_embedding.weight[:77]
    assert torch.equal(inputs[0, 2:5], embedding.vectors + position[2:5])
    assert torch.equal(inputs[0, :2], plain[0, :2]) and torch.equal(inputs[0, 5:], plain[0, 5:])


def test_contexts_with_embeddings(text_encoder):
    embeddings = EmbeddingIndex({"cat": _embedding(3, 0), "bad_hands": _embedding(1, 1)})
    with torch.inference_mode():
        one, other = text_encoder(["a cat", "bad_hands, a dog"], embeddings)[:, None]
        assert torch.equal(one, text_encoder(["a cat"], embeddings))
        assert torch.equal(other, text_encoder(["bad_hands, a dog"], embeddings))
        assert not torch.allclose(one, text_encoder(["a cat"]))
        # a short prompt's chunked context is its plain one
        assert torch.equal(text_encoder.encode_chunked("a cat", embeddings), one)


def test_chunked_context_is_each_chunk_encoded_alone(text_encoder):
    """Each chunk, embedding slots included, is the context of a prompt made of its own text."""
    embeddings = {"cat": _embedding(3, 0)}
    first = ", ".join(["dog"] * 35)  # 69 slots with its commas
    prompt = first + ", dog dog cat dog"  # the comma at slot 69 wraps "dog dog cat dog" (6 slots) to chunk 2
    with torch.inference_mode():
        context = text_encoder.encode_chunked(prompt, embeddings)
        assert context.shape == (1, 154, WIDTH)
        assert torch.equal(context[:, :77], text_encoder([first + ","], embeddings))
        assert torch.equal(context[:, 77:], text_encoder(["dog dog cat dog"], embeddings))


def test_model_dtype_vectors_cast(text_encoder):
    half = copy.deepcopy(text_encoder).to(torch.bfloat16)
    with torch.inference_mode():
        context = half(["a cat"], {"cat": _embedding(2, 0)})
    assert context.dtype == torch.bfloat16 and torch.isfinite(context).all()


# --- parity with diffusers' load_textual_inversion ----------------------------------------------------------

diffusers = pytest.importorskip("diffusers")
from test_parity_diffusers import hf_text_encoder, original_state  # noqa: E402,F401
from test_tokenizer import hf_tokenizer  # noqa: E402,F401

PARITY_FILES = {"tinyone": ("diffusers", ".bin", 1), "tinythree": ("a1111-pt", ".pt", 3),
                "tinytwo": ("a1111-safetensors", ".safetensors", 2)}


class TextualInversionHost(diffusers.loaders.TextualInversionLoaderMixin):
    """The parts of a StableDiffusionPipeline that `load_textual_inversion` and `maybe_convert_prompt` use."""

    hf_device_map = None

    def __init__(self, tokenizer, text_encoder):
        self.tokenizer, self.text_encoder = tokenizer, text_encoder

    @property
    def components(self) -> dict:
        return {"tokenizer": self.tokenizer, "text_encoder": self.text_encoder}


@pytest.fixture(scope="module")
def with_diffusers(tmp_path_factory, hf_tokenizer, hf_text_encoder):  # noqa: F811
    """Our embeddings and a diffusers host that loaded the same files with `load_textual_inversion`."""
    out = tmp_path_factory.mktemp("embeddings")
    host = TextualInversionHost(copy.deepcopy(hf_tokenizer), copy.deepcopy(hf_text_encoder))
    ours = {}
    for seed, (name, (layout, suffix, vectors)) in enumerate(PARITY_FILES.items()):
        path = out / f"{name}{suffix}"
        write_embedding(path, WIDTH, vectors, layout, seed=seed)
        host.load_textual_inversion(str(path), token=name)
        ours[name] = read_embedding(path, WIDTH)
    return host, EmbeddingIndex(ours)


@pytest.mark.parametrize("prompt", [
    "a photo of tinyone",
    "tinythree, a house in the style of tinyone, best quality",
    "tinytwo tinythree tinyone tinythree",
    " ".join(["dog"] * 73) + " tinythree cat",  # the 3-vector embedding straddles the 75-slot cut
    "a photo of a cat",
])
def test_context_matches_diffusers_load_textual_inversion(text_encoder, with_diffusers, prompt):
    host, embeddings = with_diffusers
    expanded = host.maybe_convert_prompt(prompt, host.tokenizer)
    ids = host.tokenizer(expanded, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.inference_mode():
        theirs = host.text_encoder(input_ids=ids).last_hidden_state
        ours = text_encoder([prompt], embeddings)
    assert (ours - theirs).abs().max().item() <= 1e-5
    used = [name for name in PARITY_FILES if name in prompt]
    assert sorted(embeddings_used(prompt, embeddings)) == sorted(used)
    if used:  # the embeddings changed the context: the comparison is not of two plain encodings
        assert not torch.allclose(ours, text_encoder([prompt]))
