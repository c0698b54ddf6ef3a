"""The model repository in Triton's layout: ``<repo>/<name>/<version>/model.onnx`` (or ``model.plan``:
each backend's ``repository_file``) with an optional ``<repo>/<name>/config.toml``; a ``platform``
there whose backend has no repository file, such as ``platform = "remote"`` (with ``[backend.remote]``),
serves a model that runs elsewhere instead, as version 1.

Every version of every model is loaded, warmed up and served at start; an empty version asks for the
highest. Dot-directories are never served: ``<repo>/.releases/`` holds edge releases for download
only. A model that fails to load stops the start-up (a gateway silently missing a model would
answer NOT_FOUND to every device that escalates to it). A model's ``preprocess`` (``[preprocess]`` in
its ``config.toml``, else its card's) lets it take encoded frames (docs/design.md §10).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cloud_gateway.batcher import Batcher
from cloud_gateway.config import ModelConfig
from edgecloud.backends import backend_class, backend_key_for, open_backend, repository_files
from edgecloud.backends.base import Backend
from edgecloud.config import build, merge, read_toml
from edgecloud.errors import ConfigError, ModelLoadError, ModelNotFound
from edgecloud.guards import InputContract
from edgecloud.modelcard import card_preprocess, input_guards, read_card
from edgecloud.preprocess import Preprocess, decode_frames
from edgecloud.protocol.codec import ModelMetadata
from edgecloud.tensors import TensorSpec

log = logging.getLogger(__name__)

CONFIG_FILE = "config.toml"


@dataclass
class ServedModel:
    """One loaded version of a model, with its batcher, or, when it runs each request alone, the
    ``concurrent_runs`` threads it runs them on."""

    name: str
    version: int
    config: ModelConfig
    backend: Backend
    #: what a request must satisfy: the model's inputs and the guards of its card
    contract: InputContract
    batcher: Batcher | None = None
    runs: ThreadPoolExecutor | None = None
    #: how encoded frames become its input (None: tensors only)
    preprocess: Preprocess | None = None

    @property
    def inputs(self) -> tuple[TensorSpec, ...]:
        return self.backend.inputs

    @property
    def served_inputs(self) -> tuple[TensorSpec, ...]:
        """The inputs ModelMetadata lists: the model's, then its frames input."""
        return self.inputs if self.preprocess is None else (*self.inputs, self.preprocess.frames_spec)

    def model_inputs(self, inputs: Mapping[str, np.ndarray]) -> Mapping[str, np.ndarray]:
        """A request's inputs as the model takes them: its frames, when it sent some, decoded into the
        input they feed (CPU work: callers run it off the event loop)."""
        spec = self.preprocess
        if spec is None or spec.frames not in inputs:
            return inputs
        fed = next(s for s in self.inputs if s.name == spec.input)
        decoded = decode_frames(inputs[spec.frames], spec, fed.datatype, self.config.max_frame_pixels)
        return {**{k: v for k, v in inputs.items() if k != spec.frames}, spec.input: decoded.tensor}

    @property
    def outputs(self) -> tuple[TensorSpec, ...]:
        return self.backend.outputs

    async def run(self, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for validated ``inputs``, merged with other callers' when batching is on; a call
        cancelled before its run starts is never run."""
        if self.batcher is not None:
            return await self.batcher.run(inputs)
        return await asyncio.get_running_loop().run_in_executor(self.runs, self.backend.infer, inputs)

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.runs is not None:
            self.runs.shutdown()
        self.backend.close()


def batchable(specs: tuple[TensorSpec, ...]) -> bool:
    """Batching concatenates along dim 0: every tensor must have a variable-size first dimension."""
    return all(len(s.shape) >= 1 and s.shape[0] < 0 for s in specs)


def load_model(name: str, version: int, path: Path, config: ModelConfig) -> ServedModel:
    """Open, warm up and (when the model allows it) give a batcher to one model version."""
    card = read_card(path)
    guards = input_guards(card, f"model card of {path}")
    preprocess = config.preprocess or card_preprocess(card, f"model card of {path}")
    key = backend_key_for(path, config.platform)
    backend = open_backend(path, key, getattr(config.backend, key, None))
    dynamic = batchable(backend.inputs + backend.outputs)
    fixed_rows = [s.shape[0] for s in backend.inputs if s.shape and s.shape[0] > 0]
    try:
        backend.warmup(fixed_rows[0] if fixed_rows else config.warmup_rows)
    except Exception as e:
        backend.close()
        raise ModelLoadError(f"model {name!r} version {version}: warm-up failed: {e}") from e
    try:
        if preprocess is not None:
            preprocess.check_fits(backend.inputs, name)
        contract = InputContract.build(name, backend.inputs, guards, frames=None if preprocess is None else
                                       (preprocess.frames, preprocess.input))
    except ModelLoadError:
        backend.close()
        raise
    served = ServedModel(name, version, config, backend, contract, preprocess=preprocess)
    if config.max_batch_size > 0 and dynamic:
        served.batcher = Batcher(f"{name}:{version}", backend.infer, config.max_batch_size,
                                 config.max_queue_delay_us, config.max_queue_size, config.concurrent_runs)
    else:
        if config.max_batch_size > 0:
            log.warning("event=batching_off model=%s version=%d reason=fixed_batch_dimension", name, version)
        served.runs = ThreadPoolExecutor(config.concurrent_runs, thread_name_prefix=f"run-{name}:{version}")
    log.info("event=model_loaded model=%s version=%d path=%s platform=%s max_batch_size=%d batching=%s",
             name, version, path, backend.platform, config.max_batch_size, served.batcher is not None)
    return served


def _model_config(model_dir: Path, defaults: ModelConfig) -> ModelConfig:
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return defaults
    return build(ModelConfig, merge(defaults.model_dump(exclude_unset=True), read_toml(path)), str(path))


def _model_files(config: ModelConfig) -> tuple[str, ...]:
    """The file names a version directory may hold for ``config``: its platform's, else any backend's."""
    if config.platform is None:
        return repository_files()
    own = backend_class(config.platform).repository_file
    return () if own is None else (own,)


def _version_files(model_dir: Path, names: tuple[str, ...]) -> dict[int, Path]:
    """``{version: model file}`` of the integer-named version directories, ``names`` preferred in order."""
    found = {}
    for vdir in sorted(model_dir.iterdir()):
        if vdir.name.startswith(".") or not vdir.is_dir():
            continue
        if not vdir.name.isdigit():
            log.warning("event=version_skipped model=%s dir=%s reason=not_an_integer", model_dir.name, vdir)
            continue
        files = [vdir / f for f in names if (vdir / f).is_file()]
        if not files:
            log.warning("event=version_skipped model=%s dir=%s reason=no_model_file expected=%s",
                        model_dir.name, vdir, "|".join(names))
            continue
        found[int(vdir.name)] = files[0]
    return found


class ModelRepository:
    """Every served model version, by name; ``get`` resolves a request's name and version."""

    def __init__(self, models: dict[str, dict[int, ServedModel]]) -> None:
        self._models = models

    @classmethod
    def load(cls, root: Path, defaults: ModelConfig) -> ModelRepository:
        """Load everything under ``root``; ConfigError for a missing or empty repository."""
        root = Path(root)
        if not root.is_dir():
            raise ConfigError(f"gateway.model_repository: {root} is not a directory")
        models: dict[str, dict[int, ServedModel]] = {}
        try:
            for model_dir in sorted(root.iterdir()):
                if model_dir.name.startswith(".") or not model_dir.is_dir():
                    continue
                config = _model_config(model_dir, defaults)
                # a model that runs elsewhere has no files here: it is served as version 1 of what runs there
                names = _model_files(config)
                versions = _version_files(model_dir, names) if names else {1: model_dir / CONFIG_FILE}
                for version, path in sorted(versions.items()):
                    models.setdefault(model_dir.name, {})[version] = load_model(
                        model_dir.name, version, path, config)
        except BaseException:
            cls(models).close()
            raise
        if not models:
            raise ConfigError(f"gateway.model_repository: {root} holds no model "
                              f"(expected <name>/<version>/{' or '.join(repository_files())})")
        return cls(models)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._models)

    def versions(self, name: str) -> tuple[int, ...]:
        return tuple(sorted(self._find(name)))

    def _find(self, name: str) -> dict[int, ServedModel]:
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(f"unknown model {name!r}; this gateway serves "
                                f"{sorted(self._models)}") from None

    def get(self, name: str, version: str = "") -> ServedModel:
        """The model ``name`` at ``version`` (empty: the highest); ModelNotFound naming what is missing."""
        versions = self._find(name)
        if not version:
            return versions[max(versions)]
        if not version.isdigit() or int(version) not in versions:
            raise ModelNotFound(f"model {name!r} has no version {version!r}; versions are "
                                f"{[str(v) for v in sorted(versions)]}")
        return versions[int(version)]

    def metadata(self, name: str, version: str = "") -> ModelMetadata:
        model = self.get(name, version)
        return ModelMetadata(name=name, versions=tuple(str(v) for v in self.versions(name)),
                             platform=model.backend.platform, inputs=model.served_inputs,
                             outputs=model.outputs)

    def close(self) -> None:
        """Stop every batcher and release every backend; safe to call twice."""
        for versions in self._models.values():
            for model in versions.values():
                model.close()
        self._models = {}
