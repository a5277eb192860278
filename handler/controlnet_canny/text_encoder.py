"""CLIP ViT-L/14 text tower (`cond_stage_model.transformer.text_model.*`, Hugging Face key names) and its tokenizer."""
from __future__ import annotations

import functools

import ftfy
import regex
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .config import TextEncoderConfig

START_ID = 49406
END_ID = 49407


# The reference's Hugging Face CLIPTokenizer splits text with this pattern; its special tokens are spelled
# <|startoftext|> / <|endoftext|> (open_clip's own pattern spells them <start_of_text> / <end_of_text>).
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)
_SPECIAL = {"<|startoftext|>": START_ID, "<|endoftext|>": END_ID}


@functools.cache
def _bpe():
    from open_clip.tokenizer import SimpleTokenizer  # ships the CLIP BPE vocabulary offline

    return SimpleTokenizer()


def _encode(text: str) -> list[int]:
    """BPE ids as the reference's (slow, ftfy-installed) CLIPTokenizer computes them.

    Cleaning is ftfy.fix_text, whitespace runs to one space, strip, lower case: open_clip's `encode` also
    html-unescapes twice and treats <start_of_text>/<end_of_text> as special, the reference does neither; and
    a literal <|endoftext|> in a prompt is the end id in the reference, so it is here.
    """
    bpe = _bpe()
    text = regex.sub(r"\s+", " ", ftfy.fix_text(text)).strip().lower()
    ids: list[int] = []
    for token in _PATTERN.findall(text):
        if token in _SPECIAL:
            ids.append(_SPECIAL[token])
            continue
        token = "".join(bpe.byte_encoder[b] for b in token.encode("utf-8"))
        ids.extend(bpe.encoder[piece] for piece in bpe.bpe(token).split(" "))
    return ids


def tokenize(prompt: str, context_length: int = 77) -> list[int]:
    """Ids as the reference's CLIPTokenizer gives them: start, BPE, end; truncated keeping end last; padded with end.

    open_clip's own `__call__` pads with 0, which changes the context, so only its BPE is used here.
    """
    ids = [START_ID] + _encode(prompt)[: context_length - 2] + [END_ID]
    return ids + [END_ID] * (context_length - len(ids))


class CLIPEmbeddings(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.position_embedding = nn.Embedding(cfg.context_length, cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.token_embedding(ids) + self.position_embedding.weight[: ids.shape[1]]


class CLIPAttention(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.heads = cfg.heads
        self.q_proj = nn.Linear(cfg.width, cfg.width)
        self.k_proj = nn.Linear(cfg.width, cfg.width)
        self.v_proj = nn.Linear(cfg.width, cfg.width)
        self.out_proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (rearrange(p(x), "b n (h d) -> b h n d", h=self.heads) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.out_proj(rearrange(out, "b h n d -> b n (h d)"))


class CLIPMLP(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.width, cfg.intermediate)
        self.fc2 = nn.Linear(cfg.intermediate, cfg.width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        return self.fc2(h * torch.sigmoid(1.702 * h))  # quick_gelu


class CLIPEncoderLayer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.width)
        self.self_attn = CLIPAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.width)
        self.mlp = CLIPMLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(cfg) for _ in range(cfg.layers))


class CLIPTextTransformer(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.embeddings = CLIPEmbeddings(cfg)
        self.encoder = CLIPEncoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.width)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """The last hidden state after the final LayerNorm (the reference's context; not the penultimate layer)."""
        x = self.embeddings(ids)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


class FrozenCLIPEmbedder(nn.Module):
    """`cond_stage_model`: prompts in, (batch, 77, width) context out."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.context_length = cfg.context_length
        self.transformer = CLIPTextModel(cfg)

    def forward(self, prompts: list[str]) -> torch.Tensor:
        device = self.transformer.text_model.embeddings.token_embedding.weight.device
        ids = torch.tensor([tokenize(p, self.context_length) for p in prompts], device=device)
        return self.transformer.text_model(ids)
