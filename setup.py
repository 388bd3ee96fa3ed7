"""dsflow: DeepSeek-Coder from a HuggingFace checkpoint to tensor-parallel MindSpore inference.

The repository keeps graphs/, export/ and runtime/ at the top level; they install as
the namespace packages dsflow.graphs, dsflow.export and dsflow.runtime.
"""
from setuptools import setup

PACKAGES = {"dsflow.graphs": "graphs", "dsflow.export": "export", "dsflow.runtime": "runtime"}

setup(
    name="dsflow",
    version="0.1.0",
    description="DeepSeek-Coder export (per-rank prefill/decode MindIR) and a tensor-parallel "
                "MindSpore runtime",
    python_requires=">=3.9",
    packages=list(PACKAGES),
    package_dir=PACKAGES,
    # the embedded default model (export/default_model.py), installed with the code
    package_data={"dsflow.export": ["default_model_files/*"]},
    install_requires=[
        "mindspore==2.10.0",
        # mindspore 2.10 is built against numpy 1.x: with numpy 2, bf16 parameters fail
        # and cluster jobs exit non-zero (docs/NOTES.md).
        "numpy>=1.25,<2",
        "tokenizers>=0.15",
        "click>=8.1",
        "jinja2>=3.0",
    ],
    extras_require={
        "test": ["pytest>=7", "torch==2.13.0", "transformers>=4.40"],
    },
    entry_points={"console_scripts": [
        "dsexport=dsflow.export.cli:main",
        "dsrun=dsflow.runtime.cli:main",
        "dsserve=dsflow.runtime.serve_cli:main",
    ]},
)
