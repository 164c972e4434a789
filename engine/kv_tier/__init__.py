"""KV beyond the device pool: a host-memory tier under each engine's prefix cache, and the records of prompt
blocks fetched from it or pulled from another server (issue 19).

- ``host_block_pool``: the host memory, its blocks by chained hash, their states, LRU and readers;
- ``block_copier``: the copies between device pool, host pool and pull slabs, off the loop thread;
- ``host_tier``: the engine's glue (write-through, lookups, loads, packing pulls, completions);
- ``kv_fetch``: one request's blocks on their way in (a host part, a peer part).
"""
