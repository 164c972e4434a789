"""Duet benchmarks: kernel microbenchmarks, transfer benchmarks and serving load generators.

Every benchmark writes a table, a JSON file and a PNG plot under ``bench/results/<device>/`` and measures
its baseline in the same run (see ``bench.report``).
"""
