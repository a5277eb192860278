"""Textual-inversion embeddings: reading AUTOMATIC1111's and diffusers' files (`embeddings.read_embedding`).

Files are written by scripts/make_tiny_adapters.py in the real layouts; the width is the tiny model's (32).
"""
from __future__ import annotations

import pytest
import torch
from make_tiny_adapters import EMBEDDING_LAYOUTS, write_embedding
from safetensors.torch import save_file

from controlnet_canny.adapter_files import AdapterError
from controlnet_canny.embeddings import Embedding, read_embedding

WIDTH = 32
SUFFIXES = {"a1111-pt": ".pt", "a1111-safetensors": ".safetensors", "diffusers": ".bin"}


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
