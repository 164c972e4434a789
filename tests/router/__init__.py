"""Router tests: prefix index, scoring, and the routing simulator (CPU only, no I/O)."""
