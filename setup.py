"""Package discovery for setuptools, kept here because pyproject.toml cannot map a directory outside the
packages into one: the demo models (``models/``) and the protos with their JSON Schemas (``protos/``)
stay where a checkout has them and ship in the wheel as package data, ``edgecloud_tools/models`` and
``edgecloud/protos`` (docs/design.md §1)."""

from setuptools import find_namespace_packages, find_packages, setup

#: data package → the checkout's directory it is made of
DATA = {"edgecloud_tools.models": "models", "edgecloud.protos": "protos"}

setup(
    packages=[*find_packages(include=["edgecloud*", "edge_agent*", "cloud_gateway*"]),
              *(f"{name}{sub}" for name, where in DATA.items()
                for sub in ["", *(f".{p}" for p in find_namespace_packages(where))])],
    package_dir=DATA,
    package_data={name: ["**/*"] for name in DATA},
)
