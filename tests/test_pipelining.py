"""HTTP/1.1 pipelining: two requests written back to back on one connection, a slow generation first and an edge
map second. TorchServe's frontend alone answers the edge map first (under continuous batching it finishes first),
so the client would take each answer for the other's; scripts/serve.sh's edge (nginx) answers them in order."""
from __future__ import annotations

import json

import pytest

from live_server import pipelined

pytestmark = pytest.mark.server

SLOW = {"prompt": "a house", "ddim_steps": 40, "seed": 1, "output": "json"}
EDGES = {"mode": "edges", "output": "png"}


def test_two_pipelined_requests_get_their_own_answers_in_order(server):
    generation, edge_map = pipelined(server.url, server.auth(), [SLOW, EDGES])
    assert generation[0] == 200 and generation[1]["content-type"] == "application/json", generation[:2]
    assert json.loads(generation[2])["parameters"]["seeds"] == [1]
    assert edge_map[0] == 200 and edge_map[1]["content-type"] == "image/png", edge_map[:2]
    assert edge_map[2].startswith(b"\x89PNG")


def test_a_pipelined_refusal_and_a_generation_stay_in_order(server):
    """A request refused at once (400) after a generation: the refusal is still the second answer."""
    generation, refused = pipelined(server.url, server.auth(), [SLOW, {"prompt": "a house", "scale": 99}])
    assert generation[0] == 200 and json.loads(generation[2])["parameters"]["seeds"] == [1]
    assert refused[0] == 400 and json.loads(refused[2])["field"] == "scale"
