"""The ``[backend]`` table: one ``[backend.<key>]`` section per backend, validated by its own config model.

Shared by the agent's and the gateway's configuration so that a backend's options read the same
everywhere. The table's model is made from the registry when a config is validated, with a field for
every registered backend and for each user's backend the table names by dotted path
(``[backend."package.module:Class"]``), so a new backend's section needs no edit here. Importing a
backend class to read its config model never imports its runtime.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

from pydantic import Field, PlainValidator, create_model

from edgecloud.backends import REGISTRY, backend_class
from edgecloud.config import Section
from edgecloud.errors import ModelLoadError


def section_name(key: str) -> str:
    """How the TOML names backend ``key``'s section: ``backend.onnxruntime``, ``backend."pkg.mod:Class"``."""
    return f"backend.{key}" if key.replace("_", "").replace("-", "").isalnum() else f'backend."{key}"'


def required_keys(key: str) -> tuple[str, ...]:
    """The keys backend ``key``'s section must give; none when it works from its defaults."""
    model = backend_class(key).config_model
    return tuple(name for name, field in model.model_fields.items() if field.is_required())


def options_model(user_keys: Iterable[str] = ()) -> type[Section]:
    """The ``[backend]`` table's model: a section per registered backend and per dotted ``user_keys``.

    A section left out of the config holds its defaults, or None when it has required keys
    (``[backend.remote]`` needs a target).
    """
    return _model(tuple(REGISTRY.items()), tuple(sorted(set(user_keys))))


@functools.lru_cache(maxsize=64)
def _model(registry: tuple[tuple[str, str], ...], user_keys: tuple[str, ...]) -> type[Section]:
    """One class per registry and user keys, so that equal tables compare equal."""
    fields: dict[str, Any] = {}
    for key in (*dict(registry), *user_keys):
        model = backend_class(key).config_model
        fields[key] = (model | None, None) if required_keys(key) else (model, Field(default_factory=model))
    return create_model("BackendOptions", __base__=Section, **fields)


def _validate(data: Any) -> Section:
    """Keys with a colon name a user's backend (package.module:Class); other unknown keys are refused."""
    user_keys = [k for k in data if k not in REGISTRY and ":" in k] if isinstance(data, Mapping) else []
    try:
        model = options_model(user_keys)
    except ModelLoadError as e:
        raise ValueError(str(e)) from None
    return model.model_validate(data)


#: the type of a service config's ``backend`` field: an instance of :func:`options_model`'s model,
#: whose attributes are the backend keys (``getattr(options, key)`` for a dotted one)
BackendOptions = Annotated[Any, PlainValidator(_validate), Field(default_factory=dict, validate_default=True)]
