"""The .npz file of a trace: writing its arrays, and checking every one of them on the way back in.

The layout is the table in ``minimoe.traces.format``: ``experts`` int16 (N, L, k), ``request`` int32 (N,),
``phase`` int8 (N,), ``domain`` unicode, ``model`` a 0-d string, ``num_experts`` and ``top_k`` 0-d integers,
and optionally ``weights`` float16 (N, L, k), ``notes`` (a 0-d string holding a JSON object of str -> str) and
``layer_ids`` int64 (L,) (written when the source named at least one model layer).
:func:`write_trace` writes exactly those arrays; :func:`trace_fields` reads a file through
``minimoe.traces.npz.read_npz`` (no pickles, no trust in headers) and checks each array's presence, dtype and
shape before ``Trace`` checks the values (id ranges, contiguous requests, one domain per request). Every error
is a ValueError naming the file.
"""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np

from minimoe.traces.npz import file_label, read_npz

REQUIRED = ("experts", "request", "phase", "domain", "model", "num_experts", "top_k")
OPTIONAL = ("weights", "notes", "layer_ids")
_DTYPES = dict(experts=np.int16, request=np.int32, phase=np.int8, weights=np.float16)


def parquet_path(path) -> bool:
    """Whether ``path`` (a path, not a file object) names a Parquet file: the other trace format."""
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(".parquet")


def write_trace(trace, path) -> None:
    """Write ``trace`` (a ``Trace``) as a compressed .npz at exactly ``path`` (or into a seekable binary file
    object): what ``np.savez_compressed`` writes, at zlib level 1 (about 7x faster, files within a few % of level
    6). Raises ValueError for a path ending in .parquet (``minimoe.traces.parquet_writer.save_trace`` writes that)."""
    if parquet_path(path):
        raise ValueError(f"{os.fspath(path)}: Trace.save writes .npz; minimoe.traces.parquet_writer.save_trace writes "
                         "Parquet")
    arrays = dict(experts=trace.experts, request=trace.request, phase=trace.phase, domain=trace.domain,
                  model=np.array(trace.model), num_experts=np.array(trace.num_experts, np.int64),
                  top_k=np.array(trace.top_k, np.int64))
    if trace.weights is not None:
        arrays["weights"] = trace.weights
    if trace.notes:
        arrays["notes"] = np.array(json.dumps(trace.notes, sort_keys=True))
    if (trace.layer_ids >= 0).any():
        arrays["layer_ids"] = trace.layer_ids
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        for name, array in arrays.items():
            with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, array, allow_pickle=False)


def trace_fields(path) -> dict:
    """The keyword arguments of ``Trace`` read from the .npz at ``path`` (a path or a binary file object), every
    array's presence, dtype and shape checked. Raises FileNotFoundError for a missing path and ValueError naming
    the file for anything else (a Parquet path included: ``minimoe.traces.parquet.load_trace`` reads those)."""
    if parquet_path(path):
        raise ValueError(f"trace file {os.fspath(path)}: Trace.load reads .npz; minimoe.traces.parquet.load_trace "
                         "reads Parquet")
    arrays, where = read_npz(path), f"trace file {file_label(path)}"
    missing = [name for name in REQUIRED if name not in arrays]
    unknown = sorted(set(arrays) - set(REQUIRED) - set(OPTIONAL))
    if missing or unknown:
        raise ValueError(f"{where}: missing arrays {missing}, unexpected arrays {unknown}; expected "
                         f"{list(REQUIRED)} and optionally {list(OPTIONAL)}")
    for name, dtype in _DTYPES.items():
        if name in arrays and arrays[name].dtype != np.dtype(dtype):
            raise ValueError(f"{where}: {name} must be {np.dtype(dtype).name}, got {arrays[name].dtype}")
    domain, model = arrays["domain"], arrays["model"]
    if domain.dtype.kind != "U":
        raise ValueError(f"{where}: domain must be a unicode array, got {domain.dtype}")
    if model.shape != () or model.dtype.kind != "U":
        raise ValueError(f"{where}: model must be a 0-d unicode array, got dtype {model.dtype} shape {model.shape}")
    fields = dict(experts=arrays["experts"], request=arrays["request"], phase=arrays["phase"], domain=domain,
                  model=str(model), weights=arrays.get("weights"))
    for name in ("num_experts", "top_k"):
        value = arrays[name]
        if value.shape != () or value.dtype.kind not in "iu":
            raise ValueError(f"{where}: {name} must be a 0-d integer array, got dtype {value.dtype} shape "
                             f"{value.shape}")
        fields[name] = int(value)
    fields["notes"] = _notes(arrays.get("notes"), where)
    layer_ids = arrays.get("layer_ids")
    if layer_ids is not None and (layer_ids.ndim != 1 or layer_ids.dtype.kind not in "iu"):
        raise ValueError(f"{where}: layer_ids must be a 1-d integer array, got dtype {layer_ids.dtype} shape "
                         f"{layer_ids.shape}")
    fields["layer_ids"] = layer_ids
    if domain.ndim > 1:
        raise ValueError(f"{where}: domain must have shape (N,), () or (0,), got {domain.shape}")
    return fields


def _notes(text: np.ndarray | None, where: str) -> dict | None:
    """The ``notes`` array (a 0-d string holding a JSON object) as a dict; None when the file has none."""
    if text is None:
        return None
    try:
        notes = json.loads(str(text)) if text.shape == () and text.dtype.kind == "U" else None
    except json.JSONDecodeError:
        notes = None
    if not isinstance(notes, dict):
        raise ValueError(f"{where}: notes must be a 0-d unicode array holding a JSON object, got dtype {text.dtype} "
                         f"shape {text.shape}")
    return notes
