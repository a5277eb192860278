"""token_merging_ratio (controlnet_canny.token_merging): the matching against tomesd's own function, and the
pipeline's promises on the tiny model: deterministic per seed, a request the same alone as batched, requests of
different ratios never sharing an evaluation, the noise's draws untouched. Parity of the whole UNet with tomesd:
test_parity_diffusers.py."""
from __future__ import annotations

import pytest
import torch

from controlnet_canny.params import GenerationParams
from controlnet_canny.token_merging import BipartiteMatching, TokenMerging, destination_mask

from conftest import clearly_differ, max_diff


def _params(**kwargs) -> GenerationParams:
    return GenerationParams(**{"prompt": "a house", "image_resolution": 64, "ddim_steps": 4, "seed": 11,
                               "token_merging_ratio": 0.5, **kwargs})


@pytest.mark.parametrize("height, width", [(8, 8), (7, 9), (6, 10)])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.75])
def test_matching_equals_tomesds_on_every_grid(height, width, ratio):
    """tomesd's bipartite_soft_matching_random2d and ours, on the same draw of places, merge and unmerge alike;
    odd sides (tokens outside the 2x2 cells stay sources) included."""
    merge = pytest.importorskip("tomesd.merge")
    rows, tokens = 2, height * width
    generator = torch.Generator().manual_seed(3)
    metric = torch.randn(rows, tokens, 16, generator=generator)
    values = torch.randn(rows, tokens, 24, generator=generator)
    merges = int(tokens * ratio)
    their_merge, their_unmerge = merge.bipartite_soft_matching_random2d(
        metric, width, height, 2, 2, merges, generator=torch.Generator().manual_seed(9))
    ours = TokenMerging(ratio, [torch.Generator().manual_seed(9)]).matching(metric, height, width)
    merged = ours.merge(values)
    assert merged.shape == (rows, tokens - merges, 24)
    # the same tokens, in an order that may differ (tomesd's argsort is not stable): compared as sorted sets
    assert torch.allclose(merged.sort(dim=1).values, their_merge(values).sort(dim=1).values, atol=1e-6)
    assert torch.allclose(ours.unmerge(merged), their_unmerge(their_merge(values)), atol=1e-6)


def test_one_destination_per_cell_at_its_drawn_place():
    places = torch.tensor([[[0, 3], [2, 1]]])  # dy * 2 + dx
    mask = destination_mask(places, 5, 4).view(5, 4)  # one row
    expected = torch.zeros(5, 4, dtype=torch.bool)
    expected[0, 0] = expected[1, 3] = expected[3, 0] = expected[2, 3] = True  # the fifth row: no cell, sources
    assert torch.equal(mask, expected)


def test_unmerge_gives_each_merged_token_its_destination():
    metric = torch.randn(1, 16, 4, generator=torch.Generator().manual_seed(1))
    matching = BipartiteMatching(metric, torch.zeros(1, 2, 2, dtype=torch.long), 4, 4, 8)
    values = torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(2))
    restored = matching.unmerge(matching.merge(values))
    kept = matching.sources.gather(1, matching.kept)[0]
    assert torch.equal(restored[0, kept], values[0, kept])  # unmerged tokens pass through exactly
    merged = matching.sources.gather(1, matching.merged)[0]
    targets = matching.destinations.gather(1, matching.partner)[0]
    assert torch.equal(restored[0, merged], restored[0, targets])
    for destination in matching.destinations[0]:  # a destination: the mean of itself and its merged sources
        members = [destination] + [s for s, t in zip(merged.tolist(), targets.tolist()) if t == destination]
        assert torch.allclose(restored[0, destination], values[0, members].mean(0), atol=1e-6)


def test_ratio_changes_the_image_and_a_seed_reproduces_it(tiny_pipeline, house_image):
    def run(**kwargs):
        return tiny_pipeline.generate([tiny_pipeline.prepare(house_image, _params(**kwargs))])[0].images[0]

    merged = run()
    assert (merged == run()).all()
    assert clearly_differ(merged, run(token_merging_ratio=0.0))
    assert clearly_differ(merged, run(seed=12))


def test_a_request_alone_equals_itself_batched_with_another_seed(tiny_pipeline, house_image):
    """Each sample draws its places from its own generator (seed + i): a request batched with another (two samples
    of other seeds, evaluated in the same rows) gets the pixels it gets alone."""
    a = tiny_pipeline.prepare(house_image, _params(seed=5))
    b = tiny_pipeline.prepare(house_image, _params(seed=900, num_samples=2, scale=4.0))
    samplings = [tiny_pipeline.start(p) for p in (a, b)]
    assert len(tiny_pipeline.groups(samplings)) == 1  # they share every evaluation
    together = tiny_pipeline.generate([a, b])
    alone_a = tiny_pipeline.generate([a])[0].images[0]
    alone_b = tiny_pipeline.generate([b])[0].images
    assert max_diff(together[0].images[0], alone_a) <= 1
    for got, expected in zip(together[1].images, alone_b, strict=True):
        assert max_diff(got, expected) <= 1
    assert clearly_differ(alone_a, alone_b[0])


def test_requests_of_different_ratios_never_share_an_evaluation(tiny_pipeline, house_image):
    samplings = [tiny_pipeline.start(tiny_pipeline.prepare(house_image, _params(token_merging_ratio=r)))
                 for r in (0.5, 0.0, 0.3, 0.5)]
    assert [[s.prepared.params.token_merging_ratio for s in g] for g in tiny_pipeline.groups(samplings)] == \
        [[0.5, 0.5], [0.0], [0.3]]


def test_places_come_from_generators_of_their_own(tiny_pipeline, house_image):
    """Sample i draws from a generator seeded seed + i, apart from its noise's: the noise (x_T and every step's) is
    the same with merging on or off; at scale 1 (the conditional half alone, tomesd's odd batch) nothing is
    drawn."""
    def first_noise(**kwargs):
        return tiny_pipeline.start(tiny_pipeline.prepare(house_image, _params(sampler="euler_a", **kwargs)))

    merged, plain = first_noise(num_samples=2), first_noise(num_samples=2, token_merging_ratio=0.0)
    assert torch.equal(merged.noise, plain.noise) and plain.merging_generators is None
    merging = merged.token_merging()
    assert [g.initial_seed() for g in merging.generators] == [11, 12]
    assert first_noise(scale=1.0).token_merging().generators is None


def test_guided_request_draws_each_evaluation_in_turn(tiny_pipeline, house_image, monkeypatch):
    """The places of the five highest-resolution blocks of every evaluation, drawn in turn from the sample's
    generator: a fresh generator of the same seed, drawing as many, lands on the same state."""
    sampling = tiny_pipeline.start(tiny_pipeline.prepare(house_image, _params(ddim_steps=3)))
    while not sampling.finished:
        tiny_pipeline.step([sampling])
    replay = torch.Generator().manual_seed(11)
    for _ in range(3 * 5):
        torch.randint(4, (4, 4, 1), generator=replay)
    (generator,) = sampling.merging_generators
    assert torch.equal(generator.get_state(), replay.get_state())
