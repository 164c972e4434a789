"""``duet decode MODEL --port P`` (``python -m engine.decode``): a decode server (receives KV, generates tokens)."""
from duet.engine.server.cli import server_main

if __name__ == "__main__":
    server_main("decode")
