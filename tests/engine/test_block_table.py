"""BlockTables (the runner's persistent block-table rows) against a table rebuilt from scratch each step."""
import random

import numpy as np

from duet.engine.block_table import BlockTables
from duet.engine.request import Request
from duet.engine.sampling_params import SamplingParams


def naive(requests: list[Request]) -> np.ndarray:
    width = max((len(r.block_ids) for r in requests), default=0)
    table = np.zeros((len(requests), width), dtype=np.int32)
    for i, r in enumerate(requests):
        table[i, :len(r.block_ids)] = r.block_ids
    return table


def test_matches_rebuilt_table_under_growth_preemption_and_churn():
    rng = random.Random(0)
    tables = BlockTables()
    live = [Request(f"r{i}", [1], SamplingParams()) for i in range(8)]
    next_id = 8
    for _ in range(300):
        op = rng.random()
        if op < 0.5:  # decode: some requests gain a block
            for r in live:
                if rng.random() < 0.3:
                    r.block_ids.append(rng.randrange(10_000))
        elif op < 0.6 and live:  # preemption: the block manager replaces the list, later refills it
            r = rng.choice(live)
            r.block_ids = [rng.randrange(10_000) for _ in range(rng.randrange(3))]
        elif op < 0.75 and live:  # finish
            live.remove(rng.choice(live))
        elif op < 0.9:  # admission, sometimes with a long prompt (wider than the initial capacity)
            r = Request(f"r{next_id}", [1], SamplingParams())
            next_id += 1
            r.block_ids = [rng.randrange(10_000) for _ in range(rng.choice([1, 5, 100]))]
            live.append(r)
        scheduled = [r for r in live if rng.random() < 0.8]  # some wait this step
        rng.shuffle(scheduled)
        got = tables.gather(scheduled)
        assert got.dtype == np.int32
        np.testing.assert_array_equal(got, naive(scheduled))


def test_gathered_array_is_a_copy():
    tables = BlockTables()
    r = Request("a", [1], SamplingParams())
    r.block_ids = [3, 4]
    got = tables.gather([r])
    r.block_ids.append(5)
    tables.gather([r])
    np.testing.assert_array_equal(got, [[3, 4]])
