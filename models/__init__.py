"""The demo models and their cards: data, shipped in the wheel as ``edgecloud_tools.models`` (setup.py) so
that an installed ``edgecloud`` finds them without a checkout (``edgecloud_tools.toolchain.models_dir``)."""
