"""Token merging for Stable Diffusion (ToMe for SD, Bolya & Hoffman 2023: the `tomesd` package, AUTOMATIC1111's
`token_merging_ratio`): fewer tokens through the self-attention of the UNet's highest-resolution transformers.

With tomesd's defaults, the only ones served (`tomesd.apply_patch(ratio=...)`):
- only the transformers at the latent's own resolution merge (max_downsample 1), and only the input of their
  self-attention (merge_attn; the cross-attention and the feed-forward see every token);
- each transformer block splits its tokens into destinations, one per 2x2 cell of the token grid (sx = sy = 2) at a
  random place in the cell (use_rand), and sources, the rest; each source is paired with the destination its block
  input is most similar to (cosine), and the r = int(tokens * ratio) sources with the most similar pairs are averaged
  into their destinations (mean: a destination counts once, like each source merged into it);
- after the self-attention every merged source takes its destination's output (unmerge), so the residual stream
  keeps every token.

Where the places come from. tomesd draws them, once per transformer block call, from one generator that the whole
batch shares, and takes the top-left place of every cell instead (drawing nothing) when the batch is odd, where a
sample's guidance halves cannot both be in it. Here each sample draws from its own CPU generator, seeded with the
sample's seed (sample i: seed + i) and used for nothing else (its noise generator's draws stay as documented), and
both guidance halves of a sample share its places, as they share tomesd's batch: a sample is the same alone or
evaluated with other requests, and for one sample this is tomesd's with its generator seeded so. A sample evaluated
on its conditional half alone (scale 1) is tomesd's odd batch: top-left places, nothing drawn. The matching itself
is discrete (a maximum, a ranking): where two candidates are within rounding of each other, a kernel that rounds a
row differently in another batch may pick the other one.

The UNet merges, the ControlNet does not: `tomesd.apply_patch` on a diffusers ControlNet pipeline patches `pipe.unet`
only, and AUTOMATIC1111 patches the SD model's diffusion model, not sd-webui-controlnet's network. The ControlNet's
residuals are the control itself, which merging there would approximate too.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

CELL = 2  # tomesd's sx = sy: one destination per 2x2 cell of tokens
MAX_RATIO = 1 - 1 / CELL**2  # 0.75: every source merged


def _flat(index: torch.Tensor, tokens: int) -> torch.Tensor:
    """[rows, m] token indices as indices into the rows' tokens laid end to end."""
    return (index + tokens * torch.arange(index.shape[0], device=index.device)[:, None]).flatten()


def _take(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens[row, index[row, i], :] for every row: [rows, n, C] by [rows, m] to [rows, m, C]. Whole tokens copied
    by index_select: a gather along the tokens indexes every channel apart (slower on CPU, docs/benchmarks.md)."""
    rows, count, channels = tokens.shape
    return tokens.reshape(rows * count, channels).index_select(0, _flat(index, count)).view(rows, -1, channels)


class TokenMerging:
    """One model evaluation's token merging: the ratio, and where each sample's destination places come from (its
    generator; None: the top-left place of every cell, tomesd's odd batch). Rows are samples, or samples and then
    the same samples again for the other guidance half (`unet.widen`)."""

    def __init__(self, ratio: float, generators: Sequence[torch.Generator] | None):
        self.ratio = ratio
        self.generators = generators

    @staticmethod
    def rows(parts: Sequence[TokenMerging | None]) -> TokenMerging | None:
        """The token merging of requests evaluated together (equal ratios, and all with or all without their
        unconditional halves), their samples in order."""
        first = parts[0]
        if first is None or first.generators is None:
            return first
        return TokenMerging(first.ratio, [g for part in parts for g in part.generators])

    def destination_places(self, rows: int, height: int, width: int, device: torch.device) -> torch.Tensor:
        """[rows, height // CELL, width // CELL]: the destination's place in each cell (dy * CELL + dx), drawn as
        tomesd draws (one `randint` per sample and transformer block, in the order the blocks run)."""
        cells = (height // CELL, width // CELL)
        if self.generators is None:
            return torch.zeros(rows, *cells, dtype=torch.long, device=device)
        per_sample = torch.stack([torch.randint(CELL * CELL, (*cells, 1), generator=g)[..., 0]
                                  for g in self.generators])
        return per_sample.repeat(rows // len(self.generators), 1, 1).to(device)

    def matching(self, block_input: torch.Tensor, height: int, width: int) -> BipartiteMatching:
        """The matching of one transformer block's [rows, height * width, C] input, with this block's draw."""
        places = self.destination_places(block_input.shape[0], height, width, block_input.device)
        return BipartiteMatching(block_input, places, height, width, int(block_input.shape[1] * self.ratio))


def destination_mask(places: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """[rows, height * width] bool: the token at `places` in each 2x2 cell. Cells cover the grid's top-left
    (height // 2) x (width // 2) cells; a token outside them (an odd side) is a source."""
    rows, cells_y, cells_x = places.shape
    one_hot = torch.nn.functional.one_hot(places, CELL * CELL).bool()  # [rows, cy, cx, dy * CELL + dx]
    covered = one_hot.view(rows, cells_y, cells_x, CELL, CELL).transpose(2, 3).reshape(rows, cells_y * CELL,
                                                                                          cells_x * CELL)
    mask = torch.zeros(rows, height, width, dtype=torch.bool, device=places.device)
    mask[:, :cells_y * CELL, :cells_x * CELL] = covered
    return mask.flatten(1)


class BipartiteMatching:
    """Bipartite soft matching of one transformer block's tokens: which sources merge into which destinations.
    Built from the block's input (the similarity metric), applied to its self-attention's input (`merge`) and
    output (`unmerge`)."""

    def __init__(self, metric: torch.Tensor, places: torch.Tensor, height: int, width: int, merges: int):
        # destinations (one per cell) then sources, each in grid order
        order = (~destination_mask(places, height, width)).to(torch.uint8).argsort(dim=1, stable=True)
        destinations = places[0].numel()
        self.destinations, self.sources = order[:, :destinations], order[:, destinations:]
        self.merges = min(merges, self.sources.shape[1])
        unit = metric / metric.norm(dim=-1, keepdim=True)
        similarity = _take(unit, self.sources) @ _take(unit, self.destinations).transpose(-1, -2)
        best, partner = similarity.max(dim=-1)  # per source: its most similar destination
        by_similarity = best.argsort(dim=-1, descending=True)
        self.merged = by_similarity[:, :self.merges]  # positions among the sources
        self.kept = by_similarity[:, self.merges:]
        self.partner = partner.gather(1, self.merged)  # positions among the destinations

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """[rows, N, C] to [rows, N - merges, C]: the kept sources, then each destination averaged with the sources
        merged into it."""
        sources, destinations = _take(tokens, self.sources), _take(tokens, self.destinations)
        index = self.partner[..., None].expand(-1, -1, tokens.shape[-1])
        sums = destinations.scatter_add(1, index, _take(sources, self.merged))
        counts = torch.ones(destinations.shape[:2], dtype=tokens.dtype, device=tokens.device)
        counts = counts.scatter_add(1, self.partner, torch.ones_like(self.partner, dtype=tokens.dtype))
        return torch.cat([_take(sources, self.kept), sums / counts[..., None]], dim=1)

    def unmerge(self, merged: torch.Tensor) -> torch.Tensor:
        """[rows, N - merges, C] back to [rows, N, C]: every merged source takes its destination's value."""
        kept, destinations = merged[:, :self.kept.shape[1]], merged[:, self.kept.shape[1]:]
        rows, channels = merged.shape[0], merged.shape[-1]
        tokens = self.destinations.shape[1] + self.sources.shape[1]
        out = torch.empty(rows * tokens, channels, dtype=merged.dtype, device=merged.device)

        def put(index: torch.Tensor, values: torch.Tensor) -> None:
            out.index_copy_(0, _flat(index, tokens), values.reshape(-1, channels))

        put(self.destinations, destinations)
        put(self.sources.gather(1, self.kept), kept)
        put(self.sources.gather(1, self.merged), _take(destinations, self.partner))
        return out.view(rows, tokens, channels)
