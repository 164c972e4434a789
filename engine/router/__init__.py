"""Duet's router: it takes each request, scores every server, and sends it to one decode server and
sometimes one prefill server.

The routing logic does no I/O, so the HTTP front end and the discrete-event simulator
(``bench/router_sim.py``) run the same code:

- ``prefix_index.PrefixIndex``: which chained block hashes (``engine.block_hash``) each server holds.
  It is kept up to date from the servers' KV events and answers "how many leading blocks of this
  prompt are already cached on each server".
- ``scoring.Scorer``: takes the servers' reported load, the prefix match and an online per-server
  prefill cost model, and returns a ``Decision``: which decode server, which prefill server (or local
  prefill), the predicted time to first token, or a rejection with a reason the caller turns into a
  queue slot, a 429 or a 400.

Keep this package import-light: importing ``engine.router`` must not pull in torch or a web framework.
"""
