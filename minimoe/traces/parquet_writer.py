"""Writing Parquet traces: record batches appended in row order, never the whole trace in memory.

The columns and the schema's metadata are those of ``minimoe.traces.parquet`` (which reads the files);
``ParquetTraceWriter`` appends ``TraceBatch`` objects or whole traces and buffers them into row groups of at
most ``rows_per_group`` rows (default ``ROWS_PER_GROUP``), the unit a worker reads. A writer left by an error removes its half-written file.
"""
from __future__ import annotations

import json
import os

import numpy as np

from minimoe.traces.batches import TraceBatch, batches_of
from minimoe.traces.format import Trace
from minimoe.traces.parquet import FORMAT, ROWS_PER_GROUP, import_pyarrow, is_parquet


class ParquetTraceWriter:
    """Append TraceBatch objects (or whole Traces) to a Parquet trace file, in row order.

    ``with ParquetTraceWriter(path, num_experts, top_k, num_layers, has_domain=True, has_weights=False) as w:
    w.write(batch)``. Batches are buffered and written in row groups of at most ``rows_per_group`` rows."""

    def __init__(self, path, num_experts: int, top_k: int, num_layers: int, model: str = "",
                 has_domain: bool = True, has_weights: bool = False, rows_per_group: int = ROWS_PER_GROUP,
                 notes: dict | None = None, layer_ids=None):
        pa, pq = import_pyarrow()
        self.pa, self.num_layers, self.top_k = pa, num_layers, top_k
        self.has_domain, self.has_weights, self.rows_per_group = has_domain, has_weights, rows_per_group
        fields = [pa.field("request", pa.int32()), pa.field("phase", pa.int8()), pa.field("position", pa.int32()),
                  pa.field("step", pa.int32())]
        if has_domain:
            fields.append(pa.field("domain", pa.dictionary(pa.int32(), pa.string())))
        fields += [pa.field(f"experts_{l}", pa.list_(pa.int16(), top_k)) for l in range(num_layers)]
        if has_weights:
            fields += [pa.field(f"weights_{l}", pa.list_(pa.float16(), top_k)) for l in range(num_layers)]
        meta = dict(format=FORMAT, model=model, num_experts=int(num_experts), top_k=int(top_k),
                    num_layers=int(num_layers), notes=dict(notes or {}))
        if layer_ids is not None and any(int(i) >= 0 for i in layer_ids):  # the model layer of each MoE layer
            meta["layer_ids"] = [int(i) for i in layer_ids]
        self.schema = pa.schema(fields, metadata={"minimoe": json.dumps(meta)})
        self.path = os.fspath(path)
        self.writer = pq.ParquetWriter(self.path, self.schema, compression="snappy")
        self.pending, self.pending_rows, self.rows, self.num_requests = [], 0, 0, 0

    def _table(self, batch: TraceBatch):
        pa = self.pa
        columns = [pa.array(batch.request), pa.array(batch.phase), pa.array(batch.position), pa.array(batch.step)]
        if self.has_domain:
            columns.append(pa.array(batch.domain).dictionary_encode())
        for l in range(self.num_layers):
            values = pa.array(np.ascontiguousarray(batch.experts[:, l]).ravel())
            columns.append(pa.FixedSizeListArray.from_arrays(values, self.top_k))
        if self.has_weights:
            for l in range(self.num_layers):
                values = pa.array(np.ascontiguousarray(batch.weights[:, l]).ravel())
                columns.append(pa.FixedSizeListArray.from_arrays(values, self.top_k))
        return pa.Table.from_arrays(columns, schema=self.schema)

    def append(self, trace: Trace) -> None:
        """Append whole requests: ``trace``'s requests (numbered from 0) continue after those written so far."""
        if trace.has_domain != self.has_domain or (trace.weights is not None) != self.has_weights:
            raise ValueError(f"the writer was opened with has_domain={self.has_domain}, has_weights={self.has_weights}")
        rows, requests = self.rows, np.int32(self.num_requests)
        for batch in batches_of(trace, self.rows_per_group):
            batch.start += rows
            batch.request = batch.request + requests
            self.write(batch)

    def write(self, batch: TraceBatch) -> None:
        """Append one batch; its rows must continue those written so far (``batch.start`` = rows written)."""
        if batch.start != self.rows:
            raise ValueError(f"batches must be written in row order: expected row {self.rows}, got {batch.start}")
        if (batch.weights is not None) != self.has_weights:
            raise ValueError(f"the writer was opened with has_weights={self.has_weights}")
        self.pending.append(self._table(batch))
        self.pending_rows += batch.num_tokens
        self.rows += batch.num_tokens
        self.num_requests = int(batch.request[-1]) + 1
        if self.pending_rows >= self.rows_per_group:
            self._flush()

    def _flush(self):
        if self.pending:
            table = self.pa.concat_tables(self.pending).combine_chunks()
            self.writer.write_table(table, row_group_size=self.rows_per_group)
        self.pending, self.pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        self.writer.close()

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        self.close()
        if kind is not None and os.path.exists(self.path):
            os.remove(self.path)  # never leave half a trace behind


def write_parquet(trace: Trace, path, rows_per_group: int = ROWS_PER_GROUP) -> None:
    """Write an in-memory trace as a Parquet trace file."""
    with ParquetTraceWriter(path, trace.num_experts, trace.top_k, trace.num_layers, trace.model,
                            has_domain=trace.has_domain, has_weights=trace.weights is not None,
                            rows_per_group=rows_per_group, notes=trace.notes, layer_ids=trace.layer_ids) as writer:
        for batch in batches_of(trace, rows_per_group):
            writer.write(batch)


def save_trace(trace: Trace, path) -> None:
    """Write ``trace`` as ``.parquet`` or ``.npz``, by the path's suffix."""
    write_parquet(trace, path) if is_parquet(path) else trace.save(path)
