"""dsflow: DeepSeek-Coder from a HuggingFace checkpoint to tensor-parallel MindSpore inference.

The repository keeps graphs/, export/ and runtime/ at the top level; they install as
the namespace packages dsflow.graphs, dsflow.export and dsflow.runtime.
"""
from setuptools import setup

PACKAGES = {"dsflow.graphs": "graphs", "dsflow.export": "export", "dsflow.runtime": "runtime",
            "dsflow.runtime.server": "runtime/server"}

setup(
    name="dsflow",
    version="0.1.0",
    description="DeepSeek-Coder export (per-rank prefill/decode MindIR) and a tensor-parallel "
                "MindSpore runtime",
    python_requires=">=3.9",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    install_requires=[
        "mindspore==2.10.0",
        # mindspore 2.10 is built against numpy 1.x: with numpy 2, bf16 parameters fail
        # and cluster jobs exit non-zero (docs/NOTES.md).
        "numpy>=1.25,<2",
        "tokenizers>=0.15",
        "click>=8.1",
        "jinja2>=3.0",
        # dsserve: an ASGI app on uvicorn (flow control, disconnect detection, graceful
        # drain), pydantic request models through fastapi, Prometheus text exposition
        "fastapi>=0.110",
        "uvicorn>=0.29",
        "prometheus-client>=0.19",
    ],
    extras_require={
        "test": ["pytest>=7", "torch==2.13.0", "transformers>=4.40",
                 # the server's tests: the official client against a live dsserve, and
                 # httpx for the in-process ASGI tests
                 "openai>=1.30", "httpx>=0.27"],
    },
    entry_points={"console_scripts": [
        "dsexport=dsflow.export.cli:main",
        "dsrun=dsflow.runtime.cli:main",
        "dsserve=dsflow.runtime.server.cli:main",
    ]},
)
