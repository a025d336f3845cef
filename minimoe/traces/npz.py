"""Reading an .npz archive safely: no pickles, and no trust in its headers.

``numpy.load`` takes an archive's word for how large each array is. A damaged or forged file can claim
gigabytes, or hold object arrays that unpickle code. :func:`read_npz` checks every member before it reads any
data: the .npy version, no object dtype, a declared size that equals the bytes actually stored, and an
expansion that deflate can really produce (at most about 1032x). Traces (``minimoe.traces.format``), load
traces (``minimoe.traces.loads``) and the load files ``minimoe export`` reads all go through it.
"""
from __future__ import annotations

import math
import os
import zipfile

import numpy as np


def file_label(path) -> str:
    """How messages name a file: its path in quotes, or <file object>."""
    return repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else "<file object>"


MAX_DEFLATE_RATIO = 1100  # deflate cannot expand data by more than ~1032x: a larger claim is a forged size


def read_npz(path) -> dict[str, np.ndarray]:
    """Every member of an .npz archive (a path or a file object) as {name: array}, read without pickles; each
    member's header is checked against its real size before any data is read, so a forged header cannot make us
    allocate or inflate gigabytes. Raises ValueError naming the file (and the member) for a damaged, forged or
    object archive; FileNotFoundError as it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            arrays = {}
            for info in archive.infolist():
                name = info.filename[:-4]
                if not info.filename.endswith(".npy") or name in arrays:
                    raise ValueError(f"member {info.filename!r} is not a .npy array or appears twice")
                if info.file_size > MAX_DEFLATE_RATIO * info.compress_size + 4096:
                    raise ValueError(f"member {info.filename!r} claims {info.file_size} bytes from "
                                     f"{info.compress_size} compressed bytes, more than deflate can produce")
                with archive.open(info) as member:
                    version = np.lib.format.read_magic(member)
                    if version not in ((1, 0), (2, 0)):
                        raise ValueError(f"member {info.filename!r} has .npy version {version}, expected 1.0/2.0")
                    read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0)
                    shape, _, dtype = read_header(member)
                    if dtype.hasobject:
                        raise ValueError(f"member {info.filename!r} is an object array; pickles are refused")
                    declared = math.prod(shape) * dtype.itemsize
                    if declared != info.file_size - member.tell():
                        raise ValueError(f"member {info.filename!r} declares {declared} bytes of data for shape "
                                         f"{shape}, but holds {info.file_size - member.tell()}")
                with archive.open(info) as member:
                    arrays[name] = np.lib.format.read_array(member, allow_pickle=False)
            return arrays
    except ValueError as error:
        raise ValueError(f"trace file {file_label(path)}: {error}") from error
    except FileNotFoundError:
        raise
    except Exception as error:  # BadZipFile, EOFError, zlib.error, ...: whatever a damaged archive raises
        hint = ""
        if isinstance(path, (str, os.PathLike)) and not os.fspath(path).lower().endswith(".npz"):
            hint = "; a serving engine's log, capture or load dump becomes a trace with minimoe import FILE --out trace.npz"
        raise ValueError(f"trace file {file_label(path)} is neither Parquet nor a readable .npz trace ({type(error).__name__}: "
                         f"{error}){hint}") from error
