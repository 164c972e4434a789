"""Duet: a disaggregated prefill/decode LLM inference engine; ``duet`` is the one top-level name it installs.

Its packages are ``duet.engine``, ``duet.kernels``, ``duet.transfer`` and ``duet.bench``. An installed
distribution holds them in this folder (setup.py maps the repository's top-level folders there). In a source
checkout they stay the repository's top-level folders and this file adds the checkout to the package's path,
so a checkout imports without an install and ``python -m engine.serve`` still runs from it.
"""
from __future__ import annotations

import os as _os

_here = _os.path.dirname(_os.path.abspath(__file__))
_checkout = _os.path.dirname(_here)
if not _os.path.isdir(_os.path.join(_here, "engine")) and _os.path.isfile(_os.path.join(_checkout, "engine",
                                                                                          "__init__.py")):
    __path__.append(_checkout)  # noqa: F821 - a package's __path__
