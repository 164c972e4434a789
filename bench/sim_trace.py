"""The workloads ``bench.router_sim`` replays: a seeded multi-turn chat trace (shared system prompts picked
Zipf-like, conversations starting as a bursty on/off Poisson process, each turn the previous prompt + the reply
+ new user text) or closed-loop clients; both as chained block hashes, computed once per conversation."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from duet.engine.block_hash import block_hashes

if TYPE_CHECKING:
    from duet.bench.router_sim import SimConfig


@dataclass
class Turn:
    prompt_len: int
    reply_len: int
    think_s: float


@dataclass
class Conversation:
    conv_id: int
    start_s: float
    hashes: list[int]  # chained block hashes of the whole stream; a turn's are a prefix of these
    turns: list[Turn]
    next: "Conversation | None" = None
    """Closed-loop clients: the client's next request, sent when this one finishes."""


OFF_FACTOR = 0.2


def make_client_trace(cfg: SimConfig) -> list[Conversation]:
    """Closed-loop clients: each client's first request at 0 s, each next one linked to its predecessor."""
    token_rng = np.random.default_rng(cfg.seed)
    firsts: list[Conversation] = []
    conv_id = 0
    for _ in range(cfg.num_clients):
        prev = None
        for _ in range(cfg.requests_per_client):
            tokens = token_rng.integers(0, cfg.vocab_size, cfg.client_prompt_len).tolist()
            conv = Conversation(conv_id, 0.0, block_hashes(tokens, cfg.block_size),
                                [Turn(cfg.client_prompt_len, cfg.client_output_len, 0.0)])
            conv_id += 1
            if prev is None:
                firsts.append(conv)
            else:
                prev.next = conv
            prev = conv
    return firsts


def make_trace(cfg: SimConfig) -> list[Conversation]:
    """The seeded multi-turn chat trace shared by every policy (or the closed-loop clients' requests)."""
    if cfg.num_clients:
        return make_client_trace(cfg)
    rng = random.Random(cfg.seed)
    token_rng = np.random.default_rng(cfg.seed)
    tok = lambda n: token_rng.integers(0, cfg.vocab_size, n).tolist()  # noqa: E731
    systems = [tok(rng.randint(200, 1500)) for _ in range(cfg.num_system_prompts)]
    zipf = [1.0 / (i + 1) for i in range(cfg.num_system_prompts)]
    # On/off modulated Poisson: 'on' runs at burst_factor x the mean, 'off' at OFF_FACTOR x the mean, and
    # the on share of time is set so the long-run rate is the mean. The on/off schedule has its own
    # generator, so changing the rate scales the same bursts.
    on_share = (1 - OFF_FACTOR) / (cfg.burst_factor - OFF_FACTOR)
    schedule_rng = random.Random(cfg.seed + 7)
    starts: list[float] = []
    t, on = 0.0, schedule_rng.random() < on_share
    while t < cfg.duration_s:
        end = min(t + schedule_rng.expovariate(1 / (2 * cfg.burst_period_s * (on_share if on else 1 - on_share))),
                  cfg.duration_s)
        rate = cfg.conversations_per_s * (cfg.burst_factor if on else OFF_FACTOR)
        t = t + rng.expovariate(rate)
        while t < end:
            starts.append(t)
            t += rng.expovariate(rate)
        t, on = end, not on
    conversations: list[Conversation] = []
    for t in starts:
        stream = list(rng.choices(systems, weights=zipf)[0])
        turns = []
        num_turns = 1 + int(rng.expovariate(1 / max(cfg.mean_turns - 1, 1e-9)))
        for k in range(num_turns):
            stream += tok(rng.randint(50, 800) if k == 0 else rng.randint(20, 300))
            reply = rng.randint(30, min(400, cfg.max_tokens))
            turns.append(Turn(len(stream), reply, rng.expovariate(1 / cfg.mean_think_s)))
            stream += tok(reply)
        conversations.append(Conversation(len(conversations), t, block_hashes(stream, cfg.block_size), turns))
    return conversations
