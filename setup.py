"""Package layout for dsflow; the metadata lives in pyproject.toml (PEP 621).

This file remains because the repository keeps its packages at the top level
(common/, graphs/, artifacts/, export/, runtime/, doctor/) while they install as one
namespace, dsflow.*: the `package_dir` mapping below is computed, which pyproject.toml
cannot express. Subpackages are discovered, so moving or adding one needs no edit here.
"""
from setuptools import find_packages, setup

# doctor sits above export and runtime: it builds artifacts and runs them
TOP_LEVEL = ("common", "graphs", "artifacts", "export", "runtime", "doctor")


def packages() -> list[str]:
    found = []
    for top in TOP_LEVEL:
        found.append(f"dsflow.{top}")
        found += [f"dsflow.{top}.{sub}" for sub in find_packages(top)]
    return found


setup(packages=packages(), package_dir={f"dsflow.{top}": top for top in TOP_LEVEL},
      # the embedded default model (export/pipeline/default_model.py), installed with
      # the code so a plain `pip install .` carries it
      package_data={"dsflow.export.pipeline": ["default_model_files/*"]})
