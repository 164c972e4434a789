"""Prometheus metrics through ``prometheus_client``: vLLM's names where Duet measures what vLLM measures,
``duet_*`` for what is Duet's own.

- ``exposition``: one registry per HTTP endpoint (process collectors included) and rendering it;
- ``request_metrics``: the OpenAI front end's per-request families (TTFT, ITL, e2e, phases, tokens, finish);
- ``server_stats``: a server's stats dict (free blocks, running, prefix hits, KV bytes, ...) as families;
  the one table that names server stats as metrics, used by servers, the colocated server and the router;
- ``server_exporter``: ``--metrics-port`` on prefill/decode servers (HTTP on a background thread).
"""
