"""Duet benchmarks: kernel microbenchmarks, transfer benchmarks and serving load generators.

Every benchmark writes a table, a JSON file and a PNG plot under ``bench/runs/<device>/`` (untracked), or
under ``bench/results/<device>/`` (the recorded results) with ``--record``, and measures its baseline in the
same run (see ``bench.report``).
"""
