"""Model parallelism for the native engine: tensor (heads / columns), pipeline (layers) and expert parallel.

One process per rank. Rank 0 runs the scheduler and samples; ranks > 0 are worker processes it starts, each
holding its weight shard and KV shard and running the same step. Modules: ``layout`` (which slice a rank
holds, and which sizes a checkpoint can be split into; pure arithmetic), ``comm`` (process groups and their
collectives), ``runner`` (the model runner every rank runs: step broadcast, stage hand-offs, heartbeats, KV
in and out of the engine for disaggregation), ``workers`` (starting the worker processes, their main loop,
shutdown).

The single-process path imports only ``layout`` and creates no process group.
"""
