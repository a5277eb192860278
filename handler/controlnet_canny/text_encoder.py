"""CLIP ViT-L/14 text tower (`cond_stage_model.transformer.text_model.*`, Hugging Face key names) and its tokenizer."""
from __future__ import annotations

import functools

import ftfy
import regex
import torch
from torch import nn

from .config import TextEncoderConfig
from .unet import multihead_attention

START_ID = 49406
END_ID = 49407
WORD_WRAP_TOKENS = 20  # chunked long prompts: see chunk_ids


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


def token_count(prompt: str) -> int:
    """The prompt's own tokens (start and end not counted); `tokenize` keeps the first context_length - 2."""
    return len(_encode(prompt))


def is_truncated(prompt: str, context_length: int = 77) -> bool:
    return token_count(prompt) > context_length - 2


def chunk_ids(prompt: str, context_length: int = 77) -> list[list[int]]:
    """A long prompt as AUTOMATIC1111's webui splits it (`sd_hijack_clip.py`, `tokenize_line`): chunks of up to
    context_length - 2 = 75 tokens, each wrapped and padded as `tokenize` does a short prompt (start, tokens,
    end, padded with end to 77 ids). A prompt of 75 tokens or fewer is one chunk, equal to `tokenize`'s ids.

    Word wrap, as the webui's default `comma_padding_backtrack` = 20: when a chunk is full and the next token
    is not a comma, the tokens after the chunk's last comma move to the next chunk if that comma is among the
    chunk's last 20 tokens (so a phrase is not cut in two). The webui's other prompt syntax is not parsed:
    no emphasis weights "(word:1.2)", no BREAK, no textual-inversion embeddings (the text is taken literally,
    as the reference takes a short prompt).
    """
    size = context_length - 2
    comma = _bpe().encoder[",</w>"]
    chunks: list[list[int]] = []
    current: list[int] = []
    last_comma: int | None = None  # index in `current`

    def close(tokens: list[int]) -> None:
        chunks.append([START_ID] + tokens + [END_ID] * (size + 1 - len(tokens)))

    for token in _encode(prompt):
        if len(current) == size:
            wraps = token != comma and last_comma is not None and size - last_comma <= WORD_WRAP_TOKENS
            cut = last_comma + 1 if wraps else size
            close(current[:cut])
            current, last_comma = current[cut:], None
        if token == comma:
            last_comma = len(current)
        current.append(token)
    if current or not chunks:
        close(current)
    return chunks


def match_lengths(cond: torch.Tensor, uncond: torch.Tensor, empty: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads the shorter of two chunked contexts (batch, 77 k, width) to the longer's chunk count with copies of
    `empty`, the (1, 77, width) context of the empty prompt, as the webui's `pad_cond_uncond` option does, so
    that both halves of classifier-free guidance run in one batch. Either may be the longer one."""
    missing = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]

    def padded(context: torch.Tensor, chunks: int) -> torch.Tensor:
        return torch.cat([context, empty.expand(context.shape[0], -1, -1).repeat(1, chunks, 1)], dim=1)

    if missing > 0:
        return cond, padded(uncond, missing)
    if missing < 0:
        return padded(cond, -missing), uncond
    return cond, uncond


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
        return self.out_proj(multihead_attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=True))


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
    """`cond_stage_model`: prompts in, (batch, 77, width) context out (truncated: the reference), or one long
    prompt in, (1, 77 k, width) out (`encode_chunked`)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.context_length = cfg.context_length
        self.transformer = CLIPTextModel(cfg)

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    def forward(self, prompts: list[str]) -> torch.Tensor:
        ids = torch.tensor([tokenize(p, self.context_length) for p in prompts], device=self.device)
        return self.transformer.text_model(ids)

    def encode_chunked(self, prompt: str) -> torch.Tensor:
        """(1, 77 k, width): each of `chunk_ids`'s k chunks encoded alone, as a 77-token prompt of its own, and
        the contexts concatenated along the tokens (the cross-attentions attend over all 77 k). A prompt of
        75 tokens or fewer gives exactly `forward`'s context."""
        contexts = [self.transformer.text_model(torch.tensor([ids], device=self.device))
                    for ids in chunk_ids(prompt, self.context_length)]
        return torch.cat(contexts, dim=1)
