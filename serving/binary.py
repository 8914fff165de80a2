"""The binary tensor data extension of the Open Inference Protocol (KServe V2 / Triton), both directions.

Body = JSON object, then each binary tensor's bytes in the order its tensor appears in the JSON; the
`Inference-Header-Content-Length` header gives the JSON object's length. A tensor sent this way carries
`"parameters": {"binary_data_size": n}` and no "data"; its bytes are little-endian, row-major, unpadded.
Shared by the server and the client.
"""

from __future__ import annotations

import numpy as np
import orjson

from tuneline.serving.errors import BadRequest

HEADER_LENGTH = "inference-header-content-length"  # HTTP header names are case-insensitive
OCTET_STREAM = "application/octet-stream"

# V2 datatype -> little-endian numpy dtype (BYTES, variable length, is not used by this model).
DTYPES = {"BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
          "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
          "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8")}
DATATYPE_OF = {dtype.newbyteorder("="): name for name, dtype in DTYPES.items()}


def datatype_of(array: np.ndarray) -> str:
    try:
        return DATATYPE_OF[array.dtype.newbyteorder("=")]
    except KeyError:
        raise ValueError(f"no V2 datatype for numpy {array.dtype}") from None


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, memoryview]:
    """(JSON part, binary part) of a request or response body."""
    if header_length is None:
        return body, memoryview(b"")
    try:
        n = int(header_length)
    except ValueError:
        raise BadRequest(f"Inference-Header-Content-Length {header_length!r} is not an integer") from None
    if not 0 < n <= len(body):
        raise BadRequest(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
    view = memoryview(body)
    return view[:n].tobytes(), view[n:]


def tensor_bytes(array: np.ndarray) -> bytes:
    """Little-endian, row-major bytes of a tensor."""
    dtype = DTYPES[datatype_of(array)]
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def tensor_from_bytes(data: memoryview | bytes, datatype: str, shape: list[int]) -> np.ndarray:
    """A tensor from its binary form; BadRequest if the byte count does not match shape × element size."""
    dtype = DTYPES[datatype]
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) != count * dtype.itemsize:
        raise BadRequest(f"binary data is {len(data)} bytes but shape {shape} of {datatype} needs "
                         f"{count * dtype.itemsize} ({count} × {dtype.itemsize})")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def encode_body(header: dict, buffers: list[bytes]) -> tuple[bytes, int | None]:
    """(body, JSON length) with the buffers appended; JSON length None when there are no buffers (plain JSON)."""
    head = orjson.dumps(header, option=orjson.OPT_SERIALIZE_NUMPY)
    if not buffers:
        return head, None
    return b"".join([head, *buffers]), len(head)
