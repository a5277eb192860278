"""CLIP ViT-L/14 text tower (`cond_stage_model.transformer.text_model.*`, Hugging Face key names) and its tokenizer."""
from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import ftfy
import regex
import torch
from torch import nn

from .adapter_files import AdapterError
from .config import TextEncoderConfig
from .embeddings import Embedding
from .unet import multihead_attention

START_ID = 49406
END_ID = 49407
WORD_WRAP_TOKENS = 20  # chunked long prompts: see chunk_ids
EMBEDDING_SLOT_ID = 0  # the id an embedding's slots hold (the webui's); their input embeddings are overwritten


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


class EmbeddingIndex(Mapping[str, Embedding]):
    """Textual-inversion embeddings by name, each name's BPE ids looked up once: build one per set of
    embeddings and pass it (a plain mapping given instead is indexed on every call).

    A prompt uses an embedding where the ids of its name occur among the prompt's ids, as AUTOMATIC1111's
    webui looks them up (`EmbeddingDatabase.find_embedding_at_position`): at each position the longest name
    that matches wins, and the match's ids are consumed. Matching ids rather than text implies: case and the
    tokenizer's cleaning do not matter ("EasyNegative" is "easynegative"); letters, digits and punctuation are
    BPE'd apart, so "bad_prompt" is also used by "bad _ prompt"; a word's last piece carries an end-of-word
    mark, so a name is not used by the start or middle of a longer word ("cat" by "cats" or "catdog"), but it
    is by the end of one that BPE splits into the name's pieces ("negative" by "overnegative", "badhands" by
    "verybadhands"). Two names with the same ids: the first in sorted order is used.
    """

    def __init__(self, embeddings: Mapping[str, Embedding]):
        self._embeddings = dict(embeddings)
        self._by_first_id: dict[int, list[tuple[tuple[int, ...], str]]] = {}
        for name in sorted(self._embeddings):
            ids = tuple(_encode(name))
            if not ids:
                raise AdapterError(f"embedding {name!r}: the name has no tokens a prompt could use it by")
            self._by_first_id.setdefault(ids[0], []).append((ids, name))
        for candidates in self._by_first_id.values():
            candidates.sort(key=lambda candidate: len(candidate[0]), reverse=True)  # stable: names stay sorted

    def __getitem__(self, name: str) -> Embedding:
        return self._embeddings[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._embeddings)

    def __len__(self) -> int:
        return len(self._embeddings)

    def match(self, ids: Sequence[int], position: int) -> tuple[str, int] | None:
        """The name used at `position` of `ids` and the number of ids it spans, or None."""
        for name_ids, name in self._by_first_id.get(ids[position], ()):
            if tuple(ids[position:position + len(name_ids)]) == name_ids:
                return name, len(name_ids)
        return None


Embeddings = Mapping[str, Embedding]  # an EmbeddingIndex, or a plain mapping indexed per call


@dataclass(frozen=True, eq=False)
class _Use:
    """An embedding used in a prompt: its vectors take len(vectors) token slots."""

    name: str
    vectors: torch.Tensor


def _slot_count(unit: int | _Use) -> int:
    return unit.vectors.shape[0] if isinstance(unit, _Use) else 1


def _units(prompt: str, embeddings: Embeddings | None) -> list[int | _Use]:
    """The prompt's BPE ids, with each use of an embedding's name in place of the name's ids."""
    ids = _encode(prompt)
    if not embeddings:
        return ids
    index = embeddings if isinstance(embeddings, EmbeddingIndex) else EmbeddingIndex(embeddings)
    units: list[int | _Use] = []
    position = 0
    while position < len(ids):
        found = index.match(ids, position)
        if found is None:
            units.append(ids[position])
            position += 1
        else:
            name, span = found
            units.append(_Use(name, index[name].vectors))
            position += span
    return units


@dataclass(frozen=True)
class TokenSlots:
    """One sequence of context_length token slots: the ids, and per embedding used the (offset, vectors) whose
    rows replace the token embeddings of its slots (which hold EMBEDDING_SLOT_ID)."""

    ids: list[int]
    fixes: tuple[tuple[int, torch.Tensor], ...] = ()


def _wrapped(units: Sequence[int | _Use], context_length: int) -> TokenSlots:
    """Start, the units (at most context_length - 2 slots), end, padded with end."""
    ids = [START_ID]
    fixes = []
    for unit in units:
        if isinstance(unit, _Use):
            fixes.append((len(ids), unit.vectors))
            ids.extend([EMBEDDING_SLOT_ID] * unit.vectors.shape[0])
        else:
            ids.append(unit)
    ids.append(END_ID)
    return TokenSlots(ids + [END_ID] * (context_length - len(ids)), tuple(fixes))


def token_slots(prompt: str, context_length: int = 77, embeddings: Embeddings | None = None) -> TokenSlots:
    """The reference's truncated encoding: the first context_length - 2 slots are kept, an embedding that
    straddles the cut keeping its first vectors (as diffusers' expanded `name name_1 ...` tokens are cut)."""
    kept: list[int | _Use] = []
    free = context_length - 2
    for unit in _units(prompt, embeddings):
        count = _slot_count(unit)
        if count > free:
            if isinstance(unit, _Use) and free:
                kept.append(_Use(unit.name, unit.vectors[:free]))
            break
        kept.append(unit)
        free -= count
    return _wrapped(kept, context_length)


def tokenize(prompt: str, context_length: int = 77) -> list[int]:
    """Ids as the reference's CLIPTokenizer gives them: start, BPE, end; truncated keeping end last; padded with end.

    open_clip's own `__call__` pads with 0, which changes the context, so only its BPE is used here.
    """
    return token_slots(prompt, context_length).ids


def token_count(prompt: str, embeddings: Embeddings | None = None) -> int:
    """The prompt's own token slots (start and end not counted; an embedding counts its vectors);
    `token_slots` keeps the first context_length - 2."""
    return sum(_slot_count(unit) for unit in _units(prompt, embeddings))


def is_truncated(prompt: str, context_length: int = 77, embeddings: Embeddings | None = None) -> bool:
    return token_count(prompt, embeddings) > context_length - 2


def embeddings_used(prompt: str, embeddings: Embeddings | None) -> list[str]:
    """Names of the embeddings the prompt uses, in order of first use (also those a truncated encoding cuts)."""
    return list(dict.fromkeys(unit.name for unit in _units(prompt, embeddings) if isinstance(unit, _Use)))


def chunk_slots(prompt: str, context_length: int = 77, embeddings: Embeddings | None = None) -> list[TokenSlots]:
    """A long prompt as AUTOMATIC1111's webui splits it (`sd_hijack_clip.py`, `tokenize_line`): chunks of up to
    context_length - 2 = 75 slots, each wrapped and padded as `token_slots` does a short prompt (start, slots,
    end, padded with end to 77 ids). A prompt of 75 slots or fewer is one chunk, equal to `token_slots`'s.

    Word wrap, as the webui's default `comma_padding_backtrack` = 20: when a chunk is full and the next token
    is not a comma, the slots after the chunk's last comma move to the next chunk if that comma is among the
    chunk's last 20 slots (so a phrase is not cut in two). An embedding is never split: one that does not fit
    in the rest of a chunk starts the next (the webui's rule; where the webui's word wrap moves an
    embedding's slots but leaves its vectors behind, here they move together). The webui's other prompt
    syntax is not parsed: no emphasis weights "(word:1.2)", no BREAK (the text is taken literally, as the
    reference takes a short prompt).
    """
    size = context_length - 2
    comma = _bpe().encoder[",</w>"]
    chunks: list[TokenSlots] = []
    current: list[int | _Use] = []
    filled = 0  # slots in `current`
    last_comma: tuple[int, int] | None = None  # (index in `current`, slot in the chunk)

    def close(units: list[int | _Use]) -> None:
        chunks.append(_wrapped(units, context_length))

    for unit in _units(prompt, embeddings):
        if filled == size:
            wraps = unit != comma and last_comma is not None and size - last_comma[1] <= WORD_WRAP_TOKENS
            cut, cut_slot = (last_comma[0] + 1, last_comma[1] + 1) if wraps else (len(current), size)
            close(current[:cut])
            current, filled, last_comma = current[cut:], size - cut_slot, None
        count = _slot_count(unit)
        if filled + count > size:
            close(current)
            current, filled, last_comma = [], 0, None
        if unit == comma:
            last_comma = (len(current), filled)
        current.append(unit)
        filled += count
    if current or not chunks:
        close(current)
    return chunks


def chunk_ids(prompt: str, context_length: int = 77, embeddings: Embeddings | None = None) -> list[list[int]]:
    """The ids of `chunk_slots`'s chunks."""
    return [chunk.ids for chunk in chunk_slots(prompt, context_length, embeddings)]


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

    def forward(self, ids: torch.Tensor, fixes: Sequence[Sequence[tuple[int, torch.Tensor]]] = ()) -> torch.Tensor:
        """`fixes[b]`: (offset, vectors) of row b whose rows replace the token embeddings from offset on."""
        tokens = self.token_embedding(ids)
        for row, row_fixes in enumerate(fixes):
            for offset, vectors in row_fixes:
                tokens[row, offset:offset + vectors.shape[0]] = vectors.to(tokens.device, tokens.dtype)
        return tokens + self.position_embedding.weight[: ids.shape[1]]


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

    def forward(self, ids: torch.Tensor, fixes: Sequence[Sequence[tuple[int, torch.Tensor]]] = ()) -> torch.Tensor:
        """The last hidden state after the final LayerNorm (the reference's context; not the penultimate layer);
        `fixes` put embeddings' vectors in their slots (`CLIPEmbeddings`)."""
        x = self.embeddings(ids, fixes)
        for layer in self.encoder.layers:
            x = layer(x)
        return self.final_layer_norm(x)


class CLIPTextModel(nn.Module):
    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.text_model = CLIPTextTransformer(cfg)


class FrozenCLIPEmbedder(nn.Module):
    """`cond_stage_model`: prompts in, (batch, 77, width) context out (truncated: the reference), or one long
    prompt in, (1, 77 k, width) out (`encode_chunked`). Both take the textual-inversion embeddings a prompt
    may use by name (pass an `EmbeddingIndex` to look the names up once)."""

    def __init__(self, cfg: TextEncoderConfig):
        super().__init__()
        self.context_length = cfg.context_length
        self.transformer = CLIPTextModel(cfg)

    @property
    def device(self) -> torch.device:
        return self.transformer.text_model.embeddings.token_embedding.weight.device

    def forward(self, prompts: list[str], embeddings: Embeddings | None = None) -> torch.Tensor:
        if embeddings and not isinstance(embeddings, EmbeddingIndex):
            embeddings = EmbeddingIndex(embeddings)
        return self._context([token_slots(p, self.context_length, embeddings) for p in prompts])

    def encode_chunked(self, prompt: str, embeddings: Embeddings | None = None) -> torch.Tensor:
        """(1, 77 k, width): each of `chunk_slots`'s k chunks encoded alone, as a 77-token prompt of its own, and
        the contexts concatenated along the tokens (the cross-attentions attend over all 77 k). A prompt of
        75 slots or fewer gives exactly `forward`'s context."""
        return torch.cat([self._context([chunk]) for chunk in chunk_slots(prompt, self.context_length, embeddings)],
                         dim=1)

    def _context(self, sequences: list[TokenSlots]) -> torch.Tensor:
        ids = torch.tensor([s.ids for s in sequences], device=self.device)
        fixes = [s.fixes for s in sequences] if any(s.fixes for s in sequences) else ()
        return self.transformer.text_model(ids, fixes)
