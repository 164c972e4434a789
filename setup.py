"""Duet's packages; the C++/CUDA extension (csrc/) is built when a compiler and torch are available."""
from setuptools import find_packages, setup

setup(
    name="duet",
    version="0.1.0",
    description="Disaggregated prefill/decode LLM inference engine",
    python_requires=">=3.10",
    packages=find_packages(include=["engine*", "kernels*", "transfer*", "bench*"]),
    package_data={"engine.tools": ["data/*.txt"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "transformers>=4.45",
        "tokenizers",
        "safetensors",
        "tqdm",
        "jinja2",
        "msgpack>=1.0",
        "pyzmq>=25",
        "aiohttp>=3.9",
    ],
    extras_require={
        "nixl": ["nixl-cu13==1.5.1"],
        "test": [
            "pytest",
            "pytest-timeout",
            "openai>=1.0",
            "matplotlib",
            "triton",
            "nixl-cu13==1.5.1",
        ],
        "bench": ["matplotlib"],
    },
)
