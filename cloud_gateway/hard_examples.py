"""The hard-example store: every row the cloud answered for an edge device, kept for the next training
round, its export as a training set (``edgecloud examples export``), and how often the edge's
prediction agreed with the cloud's answer (``edgecloud examples agreement``).

SQLite in WAL mode. A row's key is (device, request_id, row, input_digest): the device is who the
gateway authenticated (else who the caller said it is), so two devices that number their requests
alike keep both their rows; the digest (:func:`input_digest`) is the sha256 of the row's input, so a
case the agent replays from its spool (the same input again) is stored once, while a client that
reuses one request id for different inputs has each of them stored, counted in
``reused_request_ids`` and logged as a warning. Commits are synchronous (``synchronous=FULL``): once
the gateway has answered, the agent drops the case from its spool, so the store must already hold it
on disk. The store is bounded by a row count and an age; both are enforced as rows are added, oldest
first. One connection behind a lock serves every thread (the gateway's gRPC workers); exports from
another process read a consistent snapshot. A store file written before the key held the device
and the digest is migrated when it is opened (``SCHEMA_VERSION``, SQLite's ``user_version``). An
escalated frame is stored as the encoded bytes the device sent (docs/design.md §10), and exported as
an image file.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from cloud_gateway.coco import COCO_FILE, DetectionExport, write_coco
from edgecloud.agreement import top1
from edgecloud.errors import EdgecloudError
from edgecloud.files import atomic_open, atomic_write

log = logging.getLogger(__name__)

#: SQLite ``user_version`` of the current layout; 0 is a store keyed by (request_id, row) alone
SCHEMA_VERSION = 2
INDEX = "CREATE INDEX IF NOT EXISTS examples_created_at ON examples (created_at)"
#: a stored row whose (device, request_id, row) another input already holds
REUSED = ("SELECT 1 FROM examples WHERE device = ? AND request_id = ? AND row = ? AND input_digest <> ? "
          "LIMIT 1")
CLOUD_PREFIX = "cloud."
#: how an encoded frame begins, and the suffix its exported file gets
IMAGE_MAGIC = ((b"\xff\xd8\xff", ".jpg"), (b"\x89PNG\r\n\x1a\n", ".png"))
#: the labels file written beside a training set's image files
LABELS_FILE = "labels.csv"
#: how often age-based pruning runs while rows are added
RETENTION_CHECK_S = 60.0
DAY_S = 86400.0


@dataclass(frozen=True, slots=True)
class HardExample:
    """One row the cloud answered: its input, the edge's guess, the cloud's outputs, and provenance."""

    request_id: str
    row: int
    device: str
    edge_model_version: str
    cloud_model: str
    cloud_model_version: str
    reason: str
    deferred: bool
    edge_prediction: int | None
    edge_confidence: float | None
    inputs: Mapping[str, np.ndarray]
    cloud_outputs: Mapping[str, np.ndarray]
    created_at: float = field(default_factory=time.time)

    @property
    def key(self) -> tuple[str, str, int, str]:
        """What makes a row unique in a store and across stores: (device, request_id, row, digest)."""
        return self.device, self.request_id, int(self.row), input_digest(self.inputs)


#: the SQLite column of each field type of :class:`HardExample` (as annotated): the record is declared
#: once, and the table, its insert and its reads are made from it
_SQL_TYPES = {"str": "TEXT NOT NULL", "int": "INTEGER NOT NULL", "bool": "INTEGER NOT NULL",
              "float": "REAL NOT NULL", "int | None": "INTEGER", "float | None": "REAL",
              "Mapping[str, np.ndarray]": "BLOB NOT NULL"}
_FIELDS = {f.name: f.type for f in fields(HardExample)}
COLUMNS = tuple(_FIELDS)
#: fields stored as ``.npz`` bytes, and those stored as SQLite integers
TENSORS = frozenset(name for name, kind in _FIELDS.items() if kind.startswith("Mapping"))
_INTEGERS = frozenset(name for name, kind in _FIELDS.items() if kind in ("int", "bool"))
TABLE = "\n".join(["CREATE TABLE {name} (",
                    *(f"    {name} {_SQL_TYPES[kind]}," for name, kind in _FIELDS.items()),
                    "    input_digest TEXT NOT NULL,",
                    "    PRIMARY KEY (device, request_id, row, input_digest)",
                    ")"])
#: export keys that are not tensors; an input named like one of them cannot be exported
META_KEYS = frozenset({*(name for name in COLUMNS if name not in TENSORS), "cloud_prediction"})


def _to_row(example: HardExample) -> tuple:
    """A record's column values, in :data:`COLUMNS` order."""
    return tuple(tensors_to_bytes(value) if name in TENSORS else int(value) if name in _INTEGERS else value
                 for name, value in ((name, getattr(example, name)) for name in COLUMNS))


def _from_row(values: Sequence[object]) -> HardExample:
    """Inverse of :func:`_to_row`."""
    record = dict(zip(COLUMNS, values))
    for name in TENSORS:
        record[name] = tensors_from_bytes(record[name])  # type: ignore[arg-type]
    record.update((name, bool(record[name])) for name, kind in _FIELDS.items() if kind == "bool")
    return HardExample(**record)  # type: ignore[arg-type]


def _storable(array: np.ndarray) -> np.ndarray:
    """BYTES tensors (object arrays) as fixed-width ``S`` arrays, the form they are stored in."""
    array = np.asarray(array)
    return array.astype(np.bytes_) if array.dtype == object else array


def input_digest(inputs: Mapping[str, np.ndarray]) -> str:
    """sha256 of a row's inputs as stored (names, datatypes, shapes and bytes, by name), hex: the same
    for a replay of a case, different for another input sent under the same request id and row."""
    digest = hashlib.sha256()
    for name in sorted(inputs):
        array = np.ascontiguousarray(_storable(inputs[name]))
        digest.update(f"{name}\0{array.dtype.str}\0{array.shape}\0".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def tensors_to_bytes(arrays: Mapping[str, np.ndarray]) -> bytes:
    """Named arrays as ``.npz`` bytes, pickle-free (BYTES tensors become fixed-width ``S`` arrays)."""
    buffer = io.BytesIO()
    np.savez(buffer, **{name: _storable(a) for name, a in arrays.items()})
    return buffer.getvalue()


def tensors_from_bytes(data: bytes) -> dict[str, np.ndarray]:
    """Inverse of :func:`tensors_to_bytes`, names in their stored order."""
    with np.load(io.BytesIO(data), allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}


class HardExampleStore:
    """A SQLite file of hard examples. ``max_rows`` / ``retention_days`` of None leave it unbounded
    (the export tool opens the gateway's store without pruning it)."""

    def __init__(self, path: Path, max_rows: int | None = None, retention_days: float | None = None) -> None:
        self.path = Path(path)
        self.max_rows = max_rows
        self.retention_s = None if retention_days is None else retention_days * DAY_S
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0,
                                     isolation_level=None)
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._open_schema()
        self._count = self._conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0]
        self._next_retention = 0.0
        self._reused = 0

    def _open_schema(self) -> None:
        """Create the table, or migrate one keyed by (request_id, row) alone: its rows keep their
        device and get the digest of their stored input."""
        conn = self._conn
        if conn.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            existing = conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'examples'")
            if existing.fetchone() is None:
                conn.execute(TABLE.format(name="examples"))
            else:
                conn.create_function("stored_input_digest", 1,
                                     lambda blob: input_digest(tensors_from_bytes(blob)))
                conn.execute(TABLE.format(name="examples_migrated"))
                columns = ", ".join(COLUMNS)
                migrated = conn.execute(
                    f"INSERT INTO examples_migrated ({columns}, input_digest) "
                    f"SELECT {columns}, stored_input_digest(inputs) FROM examples").rowcount
                conn.execute("DROP TABLE examples")
                conn.execute("ALTER TABLE examples_migrated RENAME TO examples")
                log.info("event=hard_examples_migrated path=%s rows=%d schema=%d", self.path, migrated,
                         SCHEMA_VERSION)
            conn.execute(INDEX)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def add(self, examples: Iterable[HardExample]) -> int:
        """Store ``examples`` in one transaction; rows already stored (same key) are skipped. Returns
        how many were new; a new one whose request id and row another input already holds is counted
        in :attr:`reused_request_ids` and logged."""
        rows = [(_to_row(e), e.key) for e in examples]
        insert = (f"INSERT OR IGNORE INTO examples ({', '.join(COLUMNS)}, input_digest) "
                  f"VALUES ({', '.join('?' * (len(COLUMNS) + 1))})")
        added, reused = 0, []
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                for values, key in rows:
                    if self._conn.execute(insert, (*values, key[3])).rowcount:
                        added += 1
                        if self._conn.execute(REUSED, key).fetchone() is not None:
                            reused.append(key)
                self._count += added
                self._prune_locked()
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            self._reused += len(reused)
        if reused:
            device, request_id = reused[0][0], reused[0][1]
            log.warning("event=request_id_reused device=%s request_id=%s rows=%d hint='each input is kept; "
                        "give every request its own id'", device, request_id, len(reused))
        return added

    @property
    def reused_request_ids(self) -> int:
        """Rows stored since this store was opened under a (device, request_id, row) that already held
        another input: a client reusing request ids."""
        return self._reused

    def _prune_locked(self) -> None:
        pruned = 0
        if self.retention_s is not None and time.monotonic() >= self._next_retention:
            self._next_retention = time.monotonic() + RETENTION_CHECK_S
            pruned += self._conn.execute("DELETE FROM examples WHERE created_at < ?",
                                         (time.time() - self.retention_s,)).rowcount
            self._count -= pruned
        if self.max_rows is not None and self._count > self.max_rows:
            excess = self._conn.execute(
                "DELETE FROM examples WHERE rowid IN "
                "(SELECT rowid FROM examples ORDER BY created_at, rowid LIMIT ?)",
                (self._count - self.max_rows,)).rowcount
            self._count -= excess
            pruned += excess
        if pruned:
            log.info("event=hard_examples_pruned rows=%d kept=%d", pruned, self._count)

    @property
    def rows(self) -> int:
        """Rows kept, as this store's own writes and prunes left them (no query: cheap to scrape)."""
        return self._count

    def count(self) -> int:
        """Rows in the file now (another process may have written some)."""
        with self._lock:
            return self._conn.execute("SELECT COUNT(*) FROM examples").fetchone()[0]

    def examples(self, since: float | None = None, reason: str | None = None,
                 model: str | None = None) -> Iterator[HardExample]:
        """Stored rows, oldest first; ``since`` is a UNIX time, ``model`` the cloud model's name."""
        where, args = [], []
        for clause, value in (("created_at >= ?", since), ("reason = ?", reason), ("cloud_model = ?", model)):
            if value is not None:
                where.append(clause)
                args.append(value)
        sql = f"SELECT {', '.join(COLUMNS)} FROM examples"
        if where:
            sql += " WHERE " + " AND ".join(where)
        with self._lock:
            records = self._conn.execute(sql + " ORDER BY created_at, rowid", args).fetchall()
        for record in records:
            yield _from_row(record)

    def answers(self, since: float | None = None, model: str | None = None) -> Iterator[Answer]:
        """The rows the cloud answered in time (not replays: the device got no answer for those),
        oldest first, with what agreement needs and nothing else (no inputs)."""
        sql = ("SELECT device, request_id, row, input_digest, edge_model_version, reason, edge_prediction, "
               "cloud_outputs FROM examples WHERE deferred = 0")
        args: list[object] = []
        for clause, value in (("created_at >= ?", since), ("cloud_model = ?", model)):
            if value is not None:
                sql += f" AND {clause}"
                args.append(value)
        with self._lock:
            records = self._conn.execute(sql + " ORDER BY created_at, rowid", args).fetchall()
        for device, request_id, row, digest, version, reason, prediction, outputs in records:
            yield Answer((device, request_id, row, digest), version, reason, prediction,
                         tensors_from_bytes(outputs))

    def export(self, path: Path, since: float | None = None, reason: str | None = None,
               model: str | None = None, detection: DetectionExport | None = None) -> int:
        """Write the selected rows as a training set ``.npz`` (see :func:`write_training_set`)."""
        return write_training_set(list(self.examples(since, reason, model)), path, detection)

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        with self._lock:
            self._conn.close()

    def __enter__(self) -> HardExampleStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True, slots=True)
class Answer:
    """A stored row the cloud answered in time: its key, the edge's version, the reason it was sent,
    the edge's prediction (None from a detector) and the cloud's outputs."""

    key: tuple[str, str, int, str]
    edge_model_version: str
    reason: str
    edge_prediction: int | None
    cloud_outputs: Mapping[str, np.ndarray]


@dataclass(frozen=True, slots=True)
class Agreement:
    """How many of a device's stored rows, for one edge model version and reason, the cloud answered as
    the edge predicted."""

    device: str
    edge_model_version: str
    reason: str
    rows: int
    agree: int

    @property
    def share(self) -> float | None:
        return self.agree / self.rows if self.rows else None

    def to_dict(self) -> dict[str, object]:
        return {"device": self.device, "edge_model_version": self.edge_model_version, "reason": self.reason,
                "rows": self.rows, "agree": self.agree, "share": self.share}


def tally_agreement(answers: Iterable[Answer], output: str | None = None) -> tuple[list[Agreement], int]:
    """Per device, edge model version and reason: the rows with an edge prediction and those whose
    cloud top class (argmax of ``output``, default the first stored output, as the export's
    ``cloud_prediction``) is the same, as the agent counts them (docs/design.md §12); and how many rows
    had no edge prediction to compare (a detector's). A row stored twice (same key) counts once."""
    seen: set[tuple[str, str, int, str]] = set()
    counts: dict[tuple[str, str, str], list[int]] = {}
    unpredicted = 0
    for answer in answers:
        if answer.key in seen:
            continue
        seen.add(answer.key)
        if answer.edge_prediction is None:
            unpredicted += 1
            continue
        name = output or next(iter(answer.cloud_outputs))
        if name not in answer.cloud_outputs:
            raise EdgecloudError(f"--output {name!r}: not a stored cloud output; stored: "
                                 f"{sorted(answer.cloud_outputs)}")
        cloud = int(top1(np.asarray(answer.cloud_outputs[name])[None])[0])
        tally = counts.setdefault((answer.key[0], answer.edge_model_version, answer.reason), [0, 0])
        tally[0] += 1
        tally[1] += int(cloud == answer.edge_prediction)
    groups = sorted(counts, key=lambda g: (g[0], g[1].zfill(20), g[2]))  # version 10 after version 9
    return [Agreement(*group, *counts[group]) for group in groups], unpredicted


def image_suffix(value: object) -> str | None:
    """``.jpg`` or ``.png`` when ``value`` (one row of an input) is a single encoded JPEG or PNG frame."""
    array = np.asarray(value)
    if array.dtype.kind not in "SO" or array.size != 1:
        return None
    data = array.reshape(-1)[0]
    if not isinstance(data, bytes):
        return None
    return next((suffix for magic, suffix in IMAGE_MAGIC if data.startswith(magic)), None)


def frame_inputs(examples: list[HardExample]) -> list[str]:
    """The inputs whose every row is an encoded frame: exported as image files."""
    names = examples[0].inputs if examples else ()
    return [name for name in names
            if all(image_suffix(e.inputs.get(name)) is not None for e in examples)]


def training_arrays(examples: list[HardExample],
                    files: Mapping[str, list[str]] | None = None) -> dict[str, np.ndarray]:
    """Stack examples into a training set: one array per input name ([N, …]; for an input in
    ``files``, the file name of each row's image instead), every cloud output as ``cloud.<name>``,
    ``cloud_prediction`` (argmax of the cloud's first output per row), and the provenance columns of
    :data:`META_KEYS` (``edge_prediction`` -1 and ``edge_confidence`` NaN where the edge sent none)."""
    arrays: dict[str, np.ndarray] = {
        "request_id": np.array([e.request_id for e in examples], dtype=str),
        "row": np.array([e.row for e in examples], dtype=np.int64),
        "device": np.array([e.device for e in examples], dtype=str),
        "reason": np.array([e.reason for e in examples], dtype=str),
        "deferred": np.array([e.deferred for e in examples], dtype=bool),
        "edge_model_version": np.array([e.edge_model_version for e in examples], dtype=str),
        "cloud_model": np.array([e.cloud_model for e in examples], dtype=str),
        "cloud_model_version": np.array([e.cloud_model_version for e in examples], dtype=str),
        "edge_prediction": np.array([-1 if e.edge_prediction is None else e.edge_prediction
                                     for e in examples], dtype=np.int64),
        "edge_confidence": np.array([np.nan if e.edge_confidence is None else e.edge_confidence
                                     for e in examples], dtype=np.float64),
        "created_at": np.array([e.created_at for e in examples], dtype=np.float64),
    }
    if not examples:
        arrays["cloud_prediction"] = np.zeros(0, dtype=np.int64)
        return arrays
    for name in examples[0].inputs:
        if name in META_KEYS:
            raise EdgecloudError(f"input {name!r} clashes with an export column; rename it in the model")
        arrays[name] = np.array(files[name], dtype=str) if files and name in files else _stack(
            examples, "inputs", name)
    for name in examples[0].cloud_outputs:
        arrays[CLOUD_PREFIX + name] = _stack(examples, "cloud_outputs", name)
    first = arrays[CLOUD_PREFIX + next(iter(examples[0].cloud_outputs))]
    arrays["cloud_prediction"] = first.reshape(len(examples), -1).argmax(axis=1).astype(np.int64)
    return arrays


def _stack(examples: list[HardExample], kind: str, name: str) -> np.ndarray:
    try:
        return np.stack([getattr(e, kind)[name] for e in examples])
    except (KeyError, ValueError) as e:
        raise EdgecloudError(f"{kind} {name!r} differs in presence or shape between stored rows ({e}); "
                         "export one cloud model at a time (--model)") from None


def write_training_set(examples: list[HardExample], path: Path,
                       detection: DetectionExport | None = None) -> int:
    """Write ``examples`` as a training set ``.npz`` (see :func:`training_arrays`), replacing the file
    atomically; returns the number of rows. Encoded frames go beside it as image files, under
    ``<path without .npz>.frames/<input>/<row>.jpg|png``, with :data:`LABELS_FILE` there naming each
    file's cloud prediction, edge prediction and provenance. With ``detection`` (the cloud
    detector's card), :data:`COCO_FILE` there holds the cloud's boxes of every frame (``coco.py``)."""
    path = Path(path)
    folder = path.with_suffix(".frames")
    files = _write_frames(examples, folder)
    arrays = training_arrays(examples, files)
    if files:
        _write_labels(folder / LABELS_FILE, examples, files, arrays["cloud_prediction"])
    if detection is not None and examples:
        name = _detection_frames(files, detection)
        write_coco(folder / COCO_FILE, [np.asarray(e.inputs[name]).reshape(-1)[0] for e in examples],
                   files[name], [e.cloud_outputs for e in examples], detection)
    with atomic_open(path) as f:
        np.savez_compressed(f, **arrays)
    log.info("event=hard_examples_exported rows=%d path=%s", len(examples), path)
    return len(examples)


def _detection_frames(files: Mapping[str, list[str]], detection: DetectionExport) -> str:
    """The frame input a detection set's images come from: the card's frames input, else the only one."""
    if detection.preprocess is not None and detection.preprocess.frames in files:
        return detection.preprocess.frames
    if len(files) != 1:
        raise EdgecloudError(f"a detection set needs the stored frames, one input of them; frame inputs are "
                             f"{sorted(files)}")
    return next(iter(files))


def _write_frames(examples: list[HardExample], folder: Path) -> dict[str, list[str]]:
    """Each frame input's rows as image files under ``folder``; the file names, relative to
    ``folder``, per input."""
    files: dict[str, list[str]] = {}
    for name in frame_inputs(examples):
        (folder / name).mkdir(parents=True, exist_ok=True)
        files[name] = []
        for i, example in enumerate(examples):
            value = np.asarray(example.inputs[name]).reshape(-1)[0]
            relative = f"{name}/{i:06d}{image_suffix(value)}"
            atomic_write(folder / relative, value)
            files[name].append(relative)
    return files


def _write_labels(path: Path, examples: list[HardExample], files: Mapping[str, list[str]],
                  predictions: np.ndarray) -> None:
    """The labels file: per row, its image files, the cloud's and the edge's prediction, provenance."""
    names = list(files)
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow([*names, "cloud_prediction", "edge_prediction", "request_id", "row", "device", "reason"])
    for i, example in enumerate(examples):
        writer.writerow([*(files[name][i] for name in names), int(predictions[i]),
                         "" if example.edge_prediction is None else example.edge_prediction,
                         example.request_id, example.row, example.device, example.reason])
    atomic_write(path, table.getvalue().encode())
