"""``duet prefill MODEL --port P`` (``python -m engine.prefill``): a prefill server (computes prompts, streams KV out)."""
from duet.engine.server.cli import server_main

if __name__ == "__main__":
    server_main("prefill")
