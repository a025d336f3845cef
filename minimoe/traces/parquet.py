"""Traces as Parquet files: the columnar format for traces larger than memory.

The ``.npz`` format of ``minimoe.traces.format`` stays the small-file format (one archive, loaded whole).
A Parquet trace holds the same data one row per token, written and read in record batches with pyarrow
(https://arrow.apache.org/docs/python/parquet.html), so neither side ever holds the whole trace:

| column        | Arrow type                        | meaning                                                |
|---------------|-----------------------------------|--------------------------------------------------------|
| ``request``   | int32                             | request id: 0..R-1, each request contiguous, in order  |
| ``phase``     | int8                              | 0 prefill, 1 decode, -1 unknown                        |
| ``position``  | int32                             | index of the token within its request                  |
| ``step``      | int32                             | decode step (phase 1: the request's decode tokens before |
|               |                                   | it), else -1                                           |
| ``domain``    | dictionary<int32, string>, optional | workload label, constant within a request            |
| ``experts_l`` | fixed_size_list<int16>[top_k]     | expert ids in MoE layer l (one column per layer), -1 = none |
| ``weights_l`` | fixed_size_list<float16>[top_k], optional | routing weights in MoE layer l                 |

The schema's metadata key ``minimoe`` holds JSON ``{"format": "minimoe.trace/1", "model", "num_experts",
"top_k", "num_layers", "notes"}`` (notes: the trace's provenance notes, str -> str), and ``"layer_ids"`` (the
model layer index of each MoE layer, -1 = unknown) when the source named them. Any engine that reads
Parquet (pandas, DuckDB, Spark, Dask) reads these files; ``minimoe.traces.parquet_writer`` writes them, as
``minimoe import`` and ``minimoe trace`` do when ``--out`` ends in ``.parquet`` (``minimoe import trace.npz --out
trace.parquet`` converts). This module reads them: ``ParquetTrace.batches`` yields
``minimoe.traces.batches.TraceBatch`` objects and checks each one (``check_batch``) and every join between
two (``check_join``): the strict checks of ``Trace.load``, batch by batch, errors naming the file and row.
"""
from __future__ import annotations

import json
import os

import numpy as np

from minimoe.traces.batches import Span, TraceBatch, check_batch, check_join, join_runs
from minimoe.traces.format import MAX_EXPERTS, Trace
from minimoe.traces.layer_ids import as_layer_ids, check_layer_ids

FORMAT = "minimoe.trace/1"
ROWS_PER_GROUP = 1 << 20  # rows per Parquet row group: the unit a worker reads
_BASE = ("request", "phase", "position", "step")


def import_pyarrow():
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError as error:  # pragma: no cover - pyarrow is a dependency
        raise ImportError("Parquet traces need pyarrow: pip install pyarrow") from error
    return pyarrow, pyarrow.parquet


def is_parquet(path) -> bool:
    """Whether ``path`` names a Parquet file: its suffix is .parquet, or it is a file that starts with Parquet's
    magic bytes ``PAR1`` (a .pq or unsuffixed file)."""
    if os.fspath(path).lower().endswith(".parquet"):
        return True
    if not os.path.isfile(path):
        return False
    try:
        with open(path, "rb") as file:
            return file.read(4) == b"PAR1"
    except OSError:  # unreadable: not ours to say here; the reader names the error
        return False


class ParquetTrace:
    """A Parquet trace file, read batch by batch. Opening reads and checks only the footer (schema, metadata,
    row counts: ``model``, ``num_experts``, ``top_k``, ``num_layers``, ``notes``, ``layer_ids`` int64 (L,), -1 =
    unknown); ``batches`` reads and checks the rows. Raises FileNotFoundError for a missing file and
    ValueError naming the file for anything that is not a minimoe Parquet trace."""

    def __init__(self, path):
        pa, pq = import_pyarrow()
        self.path, self.label = os.fspath(path), repr(os.fspath(path))
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"trace file {self.label}: no such file")
        try:
            self.file = pq.ParquetFile(self.path)
        except Exception as error:  # ArrowInvalid and friends: whatever a damaged file raises
            raise ValueError(f"trace file {self.label} is not a readable Parquet file ({error})") from None
        schema = self.file.schema_arrow
        try:
            meta = json.loads((schema.metadata or {})[b"minimoe"])
            assert meta["format"] == FORMAT
            self.model, self.num_experts = str(meta["model"]), int(meta["num_experts"])
            self.top_k, self.num_layers = int(meta["top_k"]), int(meta["num_layers"])
            self.notes = {str(k): str(v) for k, v in dict(meta.get("notes") or {}).items()}
        except (KeyError, ValueError, TypeError, AssertionError):
            raise ValueError(f"trace file {self.label}: no minimoe metadata ({FORMAT!r} JSON under the schema key "
                             f"'minimoe'); write it with minimoe import/trace or minimoe.traces.parquet_writer") from None
        if not (1 <= self.num_experts <= MAX_EXPERTS and 1 <= self.top_k <= self.num_experts and self.num_layers >= 1):
            raise ValueError(f"trace file {self.label}: metadata num_experts={self.num_experts}, top_k={self.top_k}, "
                             f"num_layers={self.num_layers} are out of range (expected 1 <= num_experts <= "
                             f"{MAX_EXPERTS}, 1 <= top_k <= num_experts, num_layers >= 1)")
        try:
            self.layer_ids = as_layer_ids(meta.get("layer_ids"), self.num_layers)
            check_layer_ids(self.layer_ids, self.num_layers)
        except ValueError as error:
            raise ValueError(f"trace file {self.label}: metadata {error}") from None
        expected = dict(request=pa.int32(), phase=pa.int8(), position=pa.int32(), step=pa.int32())
        expected |= {f"experts_{l}": pa.list_(pa.int16(), self.top_k) for l in range(self.num_layers)}
        optional = {f"weights_{l}": pa.list_(pa.float16(), self.top_k) for l in range(self.num_layers)}
        optional["domain"] = pa.dictionary(pa.int32(), pa.string())
        names = set(schema.names)
        missing = sorted(set(expected) - names)
        unknown = sorted(names - set(expected) - set(optional))
        if missing or unknown:
            raise ValueError(f"trace file {self.label}: missing columns {missing}, unexpected columns {unknown}")
        for name in sorted(names):
            want = expected.get(name, optional.get(name))
            found = schema.field(name).type
            if found != want and not (name == "domain" and pa.types.is_string(found)):
                raise ValueError(f"trace file {self.label}: column {name} must be {want}, got {found}")
        self.has_domain = "domain" in names
        self.has_weights = all(f"weights_{l}" in names for l in range(self.num_layers))
        if not self.has_weights and any(f"weights_{l}" in names for l in range(self.num_layers)):
            raise ValueError(f"trace file {self.label}: weights columns must cover every MoE layer or none")
        metadata = self.file.metadata
        self.row_group_rows = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
        self.row_group_starts = np.concatenate([[0], np.cumsum(self.row_group_rows)]).astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.row_group_starts[-1])

    @property
    def num_row_groups(self) -> int:
        return len(self.row_group_rows)

    @property
    def num_requests(self) -> int:
        """Requests in the file (the largest request id + 1, from the footer, else from the request column)."""
        if self.num_tokens == 0:
            return 0
        largest = self.column_max("request")
        if largest is None:
            import pyarrow.compute as pc
            import pyarrow.parquet as pq

            largest = pc.max(pq.read_table(self.path, columns=["request"]).column("request")).as_py()
        return int(largest) + 1

    def column_max(self, name: str) -> int | None:
        """Largest value of an integer column from the footer statistics (None when they are missing)."""
        metadata, index = self.file.metadata, self.file.schema_arrow.get_field_index(name)
        best = None
        for group in range(metadata.num_row_groups):
            column = metadata.row_group(group).column(index)
            if not column.is_stats_set or not column.statistics.has_min_max:
                return None
            best = column.statistics.max if best is None else max(best, column.statistics.max)
        return None if best is None else int(best)

    def batches(self, row_groups=None, batch_tokens: int = 1 << 18, weights: bool = False, check: bool = True):
        """TraceBatch objects of the given row groups (default: all), in row order, each checked with
        ``check_batch``; adjacent batches are joined with ``check_join`` into ``self.runs`` (one Span per run
        of adjacent rows), which ``check_runs`` finishes once every row has been read."""
        pa, _ = import_pyarrow()
        groups = list(range(self.num_row_groups)) if row_groups is None else list(row_groups)
        columns = list(_BASE) + (["domain"] if self.has_domain else []) + \
            [f"experts_{l}" for l in range(self.num_layers)] + \
            ([f"weights_{l}" for l in range(self.num_layers)] if weights and self.has_weights else [])
        self.runs = []
        for group in groups:
            start = int(self.row_group_starts[group])
            for record in self.records(columns, batch_tokens, [group]):
                batch = self._batch(record, start, weights and self.has_weights, pa)
                start += batch.num_tokens
                if check:
                    self.runs = join_runs(self.runs + [check_batch(batch, self.num_experts, self.top_k,
                                                                   self.num_layers, self.label)], self.label)
                yield batch

    def records(self, columns: list[str], batch_rows: int = 1 << 20, row_groups=None):
        """pyarrow RecordBatches of ``columns`` (default: every row group, in order). Raises ValueError naming
        the file and row group when a page cannot be read (a damaged file), whatever pyarrow raised."""
        groups = list(range(self.num_row_groups)) if row_groups is None else list(row_groups)
        for group in groups:
            records = self.file.iter_batches(batch_size=batch_rows, row_groups=[group], columns=columns,
                                             use_threads=False)
            while True:
                try:
                    record = next(records)
                except StopIteration:
                    break
                except Exception as error:  # ArrowInvalid, OSError (thrift): said with the file and rows
                    detail = str(error).splitlines()[0] if str(error) else ""
                    raise ValueError(f"trace file {self.label}: row group {group} (rows from "
                                     f"{int(self.row_group_starts[group])}) is not readable "
                                     f"({type(error).__name__}: {detail})") from None
                yield record

    def _batch(self, record, start: int, weights: bool, pa) -> TraceBatch:
        def ints(name, dtype):
            column = record.column(name)
            if column.null_count:
                raise ValueError(f"trace file {self.label}: row {start + _first_null(column)}: {name} is null")
            return column.to_numpy(zero_copy_only=False).astype(dtype, copy=False)

        def lists(name):
            column = record.column(name)
            values = column.flatten()
            if column.null_count or values.null_count:
                raise ValueError(f"trace file {self.label}: rows from {start}: {name} holds a null")
            return values.to_numpy(zero_copy_only=False).reshape(-1, self.top_k)

        n = record.num_rows
        experts = np.empty((n, self.num_layers, self.top_k), np.int16)
        for l in range(self.num_layers):
            experts[:, l] = lists(f"experts_{l}")
        domain = np.zeros(0, "<U1")
        if self.has_domain:
            column = record.column("domain")
            if column.null_count:
                raise ValueError(f"trace file {self.label}: row {start + _first_null(column)}: domain is null")
            if pa.types.is_dictionary(column.type):
                labels = np.array(column.dictionary.to_pylist() or [""], dtype=str)
                domain = labels[column.indices.to_numpy(zero_copy_only=False)]
            else:
                domain = np.array(column.to_pylist(), dtype=str)
        weight = None
        if weights:
            weight = np.empty((n, self.num_layers, self.top_k), np.float16)
            for l in range(self.num_layers):
                weight[:, l] = lists(f"weights_{l}")
        return TraceBatch(start, experts, ints("request", np.int32), ints("phase", np.int8),
                          ints("position", np.int32), ints("step", np.int32), domain, weight)

    def check_runs(self, runs: list[Span]) -> Span:
        """Join the Spans of every run read (by any number of readers) and check they cover the whole file
        from its first row; returns the file's Span."""
        runs = join_runs(runs, self.label)
        if len(runs) != 1 or runs[0].first_row != 0 or runs[0].last_row != self.num_tokens - 1:
            raise ValueError(f"trace file {self.label}: the rows read do not cover all {self.num_tokens} rows once")
        return check_join(None, runs[0], self.label)

    def read(self) -> Trace:
        """The whole file as an in-memory Trace (for files that fit in memory)."""
        batches = list(self.batches(weights=True))
        if self.num_tokens:
            self.check_runs(self.runs)
        cat = (lambda name: np.concatenate([getattr(b, name) for b in batches])) if batches else None
        empty = np.zeros((0, self.num_layers, self.top_k), np.int16)
        try:
            return Trace(experts=cat("experts") if batches else empty,
                         request=cat("request") if batches else np.zeros(0, np.int32),
                         phase=cat("phase") if batches else np.zeros(0, np.int8),
                         domain=cat("domain") if batches and self.has_domain else None,
                         num_experts=self.num_experts, top_k=self.top_k, model=self.model,
                         weights=cat("weights") if batches and self.has_weights else None, notes=self.notes,
                         layer_ids=self.layer_ids)
        except ValueError as error:
            raise ValueError(f"trace file {self.label}: {error}") from None


def _first_null(column) -> int:
    return int(np.flatnonzero(column.is_null().to_numpy(zero_copy_only=False))[0])


def load_trace(path) -> Trace:
    """Read a trace file of either format into memory: ``.parquet`` here, anything else as ``.npz``."""
    return ParquetTrace(path).read() if is_parquet(path) else Trace.load(path)
