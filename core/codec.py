"""Codecs for flat float32 update vectors: f32, f16, q8 (int8 + per-block scale), top-k.

Every encoded buffer is self-describing: a 24-byte little-endian header, then the
payload::

    offset size  field
    0      4     magic b"FGVC"
    4      1     version (1)
    5      1     codec id (1 f32, 2 f16, 3 q8, 4 topk)
    6      2     flags: bit 0 DELTA, the other bits reserved (0)
    8      4     count: number of float32 values decoded
    12     4     param: q8 block size; topk number of kept values; else 0
    16     4     reserved (0)
    20     4     CRC32 of bytes 0..19 followed by the payload

    f32   count float32
    f16   count float16 (round to nearest even; |x| must be < 65520)
    q8    ceil(count / block) float32 scales, then count int8 codes;
          value = code * scale, scale = max|x| / 127 per block, stochastic rounding
    topk  param uint32 indices (strictly increasing, < count), then param float32 values

The DELTA flag (``encode(..., delta=True)``, :attr:`CodecHeader.delta`) says the
vector is a difference from a reference vector both sides hold (a train result:
new local parameters minus the global parameters the task carried), not the values
themselves. The codec does not interpret it; the receiver adds the reference back.

:func:`decode` trusts nothing: the buffer length must equal what the header
announces, every field must be valid, the CRC must match, top-k indices must be in
range and increasing, and the count is bounded by ``max_decoded_size`` and by what
the buffer can honestly carry. Anything else raises :class:`ProtocolError`.

>>> import numpy as np
>>> vec = np.linspace(-1, 1, 1000, dtype=np.float32)
>>> buf = encode(vec, "q8", seed=7)
>>> len(buf) < vec.nbytes // 3
True
>>> float(np.abs(decode(buf) - vec).max()) <= 1 / 127 + 1e-6
True
>>> ef = ErrorFeedback(1000)
>>> sent = decode(encode(vec, "topk", k=0.1, state=ef))
>>> bool(np.allclose(sent + ef.residual, vec))
True
"""
from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

import numpy as np
import numpy.typing as npt

from fedgate.core.errors import ProtocolError

try:
    from fedgate.core import _aggregate as _agg
    from fedgate.core import _codec as _k
except ImportError as exc:  # pragma: no cover - depends on the build
    raise ImportError(
        "fedgate.core._codec is not compiled; run "
        "`python setup.py build_ext --inplace` (or `pip install -e .`) in the source tree"
    ) from exc

__all__ = [
    "Codec",
    "CodecHeader",
    "ErrorFeedback",
    "FLAG_DELTA",
    "HEADER_SIZE",
    "MAX_DECODED_SIZE",
    "MAX_Q8_BLOCK",
    "TOPK_MIN_FRACTION",
    "decode",
    "encode",
    "read_header",
    "topk_count",
]

if sys.byteorder != "little":  # pragma: no cover
    raise ImportError("fedgate.core.codec supports little-endian hosts only")

Buffer = Union[bytes, bytearray, memoryview]

MAGIC = b"FGVC"
VERSION = 1
HEADER_SIZE = 24
_HEADER = struct.Struct("<4sBBHIII")  # everything before the CRC (20 bytes)
_CRC = struct.Struct("<I")
#: default bound on the number of decoded values (1 GiB of float32)
MAX_DECODED_SIZE = 1 << 28
_MAX_COUNT = (1 << 32) - 1
_MAX_BLOCK = 1 << 20
#: the largest q8 block (values per scale) an encoder may use and a decoder accepts
MAX_Q8_BLOCK = _MAX_BLOCK
#: top-k keeps at least count / 65536 values, so a small buffer cannot claim a huge vector
TOPK_MIN_FRACTION = 1.0 / 65536
F16_LIMIT = 65520.0  # |x| at or above this rounds to Inf in float16
#: header flag: the vector is a difference from a reference both sides hold
FLAG_DELTA = 1


class Codec(str, Enum):
    """Update encodings."""

    F32 = "f32"
    F16 = "f16"
    Q8 = "q8"
    TOPK = "topk"


_IDS = {Codec.F32: 1, Codec.F16: 2, Codec.Q8: 3, Codec.TOPK: 4}
_BY_ID = {v: k for k, v in _IDS.items()}


@dataclass(frozen=True)
class CodecHeader:
    """What a buffer's header announces (validated against its length)."""

    codec: Codec
    count: int
    param: int
    nbytes: int
    delta: bool = False  #: the DELTA flag: a difference from a reference vector


class ErrorFeedback:
    """Residual memory for lossy codecs (Stich et al. 2018; Karimireddy et al. 2019).

    ``encode(vec, codec, state=ef)`` compresses ``vec + ef.residual`` and stores what
    was not sent (``x - decode(buffer)``) back into ``ef.residual``, so over rounds the
    sent values add up to the sum of the inputs.

    Parameters
    ----------
    dim : int
        Length of the vectors it serves.

    >>> import numpy as np
    >>> ef = ErrorFeedback(4)
    >>> v = np.array([4.0, -3.0, 0.5, 0.25], dtype=np.float32)
    >>> decode(encode(v, "topk", k=0.25, state=ef)).tolist(), ef.residual.tolist()
    ([4.0, 0.0, 0.0, 0.0], [0.0, -3.0, 0.5, 0.25])
    """

    __slots__ = ("residual",)

    def __init__(self, dim: int) -> None:
        if not isinstance(dim, (int, np.integer)) or isinstance(dim, bool) or dim <= 0:
            raise ProtocolError(f"ErrorFeedback dim = {dim!r}: must be a positive int")
        self.residual: npt.NDArray[np.float32] = np.zeros(int(dim), dtype=np.float32)

    @property
    def dim(self) -> int:
        return int(self.residual.shape[0])

    def reset(self) -> None:
        self.residual.fill(0.0)

    def __repr__(self) -> str:
        return f"ErrorFeedback(dim={self.dim})"


def _codec(codec: Any) -> Codec:
    try:
        return Codec(codec)
    except ValueError:
        raise ProtocolError(f"codec = {codec!r}: one of {[c.value for c in Codec]}") from None


def topk_count(dim: int, k: float) -> int:
    """Number of values top-k keeps of ``dim``: ``ceil(k * dim)``, clamped to [1, dim]."""
    return min(dim, max(1, math.ceil(k * dim)))


def encode(
    vec: npt.ArrayLike,
    codec: Codec | str = Codec.F32,
    *,
    block: int = 256,
    seed: int = 0,
    k: float = 0.01,
    state: ErrorFeedback | None = None,
    delta: bool = False,
) -> bytes:
    """Encode a flat vector into a self-describing buffer.

    Parameters
    ----------
    vec : (dim,) float32 (float64 is converted), finite, 1 <= dim < 2**32
    codec : "f32", "f16", "q8" or "topk"
    block : q8 block size (values per scale), 1..2**20
    seed : q8 stochastic-rounding seed (same seed, same bytes), 0..2**32-1
    k : top-k fraction of values kept, in [1/65536, 1]
    state : ErrorFeedback of the same dim, or None. When given, ``vec + state.residual``
        is encoded and the residual updated (all codecs; f32 leaves it at zero).
    delta : set the header's DELTA flag (``vec`` is a difference from a reference)

    Returns
    -------
    bytes : header + payload (see the module docstring)
    """
    c = _codec(codec)
    arr = np.asarray(vec)
    if arr.dtype not in (np.float32, np.float64) or arr.ndim != 1:
        raise ProtocolError(f"vec must be a 1-D float32 array, got {arr.dtype} {arr.shape}")
    arr = np.ascontiguousarray(arr, dtype=np.float32)
    n = arr.shape[0]
    if not 1 <= n <= _MAX_COUNT:
        raise ProtocolError(f"vec has {n} values: must be 1..{_MAX_COUNT}")
    if c in (Codec.F32, Codec.TOPK):  # q8 and f16 find non-finite values in their max |x| pass
        _refuse_nonfinite(arr)
    residual = np.empty(0, dtype=np.float32)
    if state is not None:
        if not isinstance(state, ErrorFeedback) or state.dim != n:
            raise ProtocolError(f"state {state!r} does not fit a vector of {n} values")
        residual = state.residual
        if c is Codec.F32:
            arr = arr + residual
            residual.fill(0.0)
            residual = np.empty(0, dtype=np.float32)
        if _agg.first_nonfinite(state.residual) >= 0:
            raise ProtocolError("error-feedback residual is not finite")
    ef = residual if residual.shape[0] == n else None
    param = 0
    if c is Codec.Q8:
        if not isinstance(block, (int, np.integer)) or not 1 <= block <= _MAX_BLOCK:
            raise ProtocolError(f"block = {block!r}: must be an int in 1..{_MAX_BLOCK}")
        if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
            raise ProtocolError(f"seed = {seed!r}: must be an int in 0..2**32-1")
        param = int(block)
    elif c is Codec.TOPK:
        if not (isinstance(k, (int, float)) and TOPK_MIN_FRACTION <= k <= 1):
            raise ProtocolError(f"k = {k!r}: must be a fraction in [{TOPK_MIN_FRACTION}, 1]")
        param = topk_count(n, float(k))
    elif c is Codec.F16:
        peak = float(_k.max_abs(arr, ef))
        if not math.isfinite(peak):
            _refuse_nonfinite(arr)
            raise ProtocolError("vec + residual overflows float32")
        if not peak < F16_LIMIT:
            raise ProtocolError(f"f16 cannot carry |x| = {peak!r} (limit 65504); use f32 or q8")
    if c is Codec.TOPK and ef is not None and not math.isfinite(float(_k.max_abs(arr, ef))):
        raise ProtocolError("vec + residual overflows float32")
    if not isinstance(delta, (bool, np.bool_)):
        raise ProtocolError(f"delta = {delta!r}: must be a bool")
    header = _HEADER.pack(MAGIC, VERSION, _IDS[c], FLAG_DELTA if delta else 0, n, param, 0)
    if c is Codec.F32:
        return _k.encode_f32(arr, header)
    if c is Codec.F16:
        return _k.encode_f16(arr, residual, header)
    if c is Codec.Q8:
        buf = _k.encode_q8(arr, residual, param, int(seed), header)
        if buf is None:
            _refuse_nonfinite(arr)
            raise ProtocolError("vec + residual overflows float32")
        return buf
    return _k.encode_topk(arr, residual, param, header)


def _refuse_nonfinite(arr: npt.NDArray[np.float32]) -> None:
    bad = _agg.first_nonfinite(arr)
    if bad >= 0:
        raise ProtocolError(f"cannot encode a non-finite value: vec[{bad}] = {float(arr[bad])!r}")


def _as_bytes_view(buf: Any) -> memoryview:
    try:
        mv = memoryview(buf)
    except TypeError:
        raise ProtocolError(f"cannot decode a {type(buf).__name__}: need bytes, bytearray or memoryview") from None
    if not mv.c_contiguous:
        raise ProtocolError("buffer is not contiguous")
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def _payload_size(c: Codec, count: int, param: int) -> int:
    if c is Codec.F32:
        return 4 * count
    if c is Codec.F16:
        return 2 * count
    if c is Codec.Q8:
        return 4 * ((count + param - 1) // param) + count
    return 8 * param


def read_header(buf: Buffer, *, max_decoded_size: int = MAX_DECODED_SIZE) -> CodecHeader:
    """Parse and validate a buffer's header against the buffer length (no CRC check).

    Raises
    ------
    ProtocolError
        Truncated, oversized or inconsistent buffer, unknown magic/version/codec,
        invalid parameters, or a count above ``max_decoded_size``.
    """
    mv = _as_bytes_view(buf)
    size = mv.nbytes
    if size < HEADER_SIZE:
        raise ProtocolError(f"buffer of {size} bytes is shorter than the {HEADER_SIZE}-byte header")
    magic, version, cid, flags, count, param, reserved = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r})")
    if version != VERSION:
        raise ProtocolError(f"unsupported codec version {version} (this build reads {VERSION})")
    c = _BY_ID.get(cid)
    if c is None:
        raise ProtocolError(f"unknown codec id {cid}")
    if flags & ~FLAG_DELTA or reserved != 0:
        raise ProtocolError(f"reserved header fields are set (flags={flags}, reserved={reserved})")
    if count == 0:
        raise ProtocolError("header announces an empty vector")
    if count > max_decoded_size:
        raise ProtocolError(f"header announces {count} values, above max_decoded_size = {max_decoded_size}")
    if c is Codec.Q8 and not 1 <= param <= _MAX_BLOCK:
        raise ProtocolError(f"q8 block size {param} out of range 1..{_MAX_BLOCK}")
    if c is Codec.TOPK:
        if not 1 <= param <= count:
            raise ProtocolError(f"topk keeps {param} of {count} values")
        if count > param * 65536:
            raise ProtocolError(f"topk keeps {param} of {count} values, below the 1/65536 minimum")
    if c in (Codec.F32, Codec.F16) and param != 0:
        raise ProtocolError(f"{c.value} header has param = {param}, expected 0")
    expected = HEADER_SIZE + _payload_size(c, count, param)
    if size != expected:
        kind = "truncated" if size < expected else "oversized"
        raise ProtocolError(f"{kind} {c.value} buffer: {size} bytes, header announces {expected}")
    return CodecHeader(c, count, param, size, bool(flags & FLAG_DELTA))


def decode(
    buf: Buffer,
    *,
    max_decoded_size: int = MAX_DECODED_SIZE,
    out: npt.NDArray[np.float32] | None = None,
    check_crc: bool = True,
    view: bool = False,
) -> npt.NDArray[np.float32]:
    """Decode a buffer made by :func:`encode` (bytes, bytearray or memoryview; not copied).

    Parameters
    ----------
    buf : the encoded buffer, e.g. a ZeroMQ frame's memoryview
    max_decoded_size : refuse buffers announcing more values than this
    out : optional writable C-contiguous float32 array of the announced length to fill
    check_crc : verify the CRC32 (default). A caller whose transport already
        authenticates every byte (CURVE) may skip it: the CRC costs ~0.25 ms per MB.
        Lengths, header fields, q8 scales and top-k indices are checked either way,
        so a skipped CRC can never lead to an out-of-bounds access.
    view : an ``f32`` buffer (without ``out``) comes back as a read-only array over the
        buffer itself, not a copy (it keeps the buffer alive); other codecs decode as usual

    Returns
    -------
    (count,) float32, a fresh array (or ``out``, or with ``view`` a view of ``buf``)

    Raises
    ------
    ProtocolError
        On any malformed, truncated, oversized or corrupted input.
    """
    mv = _as_bytes_view(buf)
    head = read_header(mv, max_decoded_size=max_decoded_size)
    (crc,) = _CRC.unpack_from(mv, 20)
    ro = mv.toreadonly()
    if check_crc and _k.payload_crc(ro) != crc:
        raise ProtocolError(f"{head.codec.value} buffer of {head.nbytes} bytes fails its CRC32 check")
    if view and out is None and head.codec is Codec.F32:
        return np.frombuffer(ro, dtype=np.float32, count=head.count, offset=HEADER_SIZE)
    if out is None:
        out = np.zeros(head.count, dtype=np.float32) if head.codec is Codec.TOPK else np.empty(
            head.count, dtype=np.float32
        )
    else:
        if not (
            isinstance(out, np.ndarray)
            and out.dtype == np.float32
            and out.shape == (head.count,)
            and out.flags.c_contiguous
            and out.flags.writeable
        ):
            got = (f"{out.dtype} {out.shape}, c_contiguous={out.flags.c_contiguous}, writeable={out.flags.writeable}"
                   if isinstance(out, np.ndarray) else type(out).__name__)
            raise ProtocolError(
                f"out must be a writable C-contiguous float32 array of {head.count} values, got {got}"
            )
        if head.codec is Codec.TOPK:
            out.fill(0.0)
    c = head.codec
    if c is Codec.F32:
        _k.decode_f32(ro, out)
    elif c is Codec.F16:
        _k.decode_f16(ro, out)
    elif c is Codec.Q8:
        bad = _k.decode_q8(ro, head.param, out)
        if bad >= 0:
            raise ProtocolError(f"q8 block {bad} has a negative or non-finite scale")
    else:
        bad = _k.decode_topk(ro, head.param, out)
        if bad >= 0:
            raise ProtocolError(f"topk index #{bad} is out of range or not strictly increasing")
    return out
