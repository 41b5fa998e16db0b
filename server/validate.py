"""Checks every update passes before it reaches a strategy.

An update (the agent's new local parameters) is refused when it does not decode, has
the wrong size, holds a NaN or an infinity, or moved further than
``max_update_norm`` (L2) from the global model it was trained from. Each refusal
has a reason, used as the ``reason`` label of
``fedgate_server_updates_rejected_total`` and stored in the history.

A payload whose codec header has the DELTA flag (the ``topk`` codec always has it)
carries the update new - global instead of the new parameters:
:func:`check_update` decodes it, adds the global model back
(:func:`materialize_update`) and then runs the same checks, so strategies always
receive parameters.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from fedgate.core import aggregate as agg
from fedgate.core import codec
from fedgate.core.errors import FedgateError

__all__ = ["Rejected", "UpdateValidator", "check_update", "materialize_update"]


@dataclass
class Rejected(Exception):
    """An update or result refused; ``reason`` is a short label, ``detail`` says why."""

    reason: str
    detail: str

    def __str__(self) -> str:
        return f"{self.reason}: {self.detail}"


class UpdateValidator:
    """Decodes and checks updates against the current global model (D float32 params).

    ``f32`` and ``q8`` updates are checked in place, straight from the received frame:
    one fused pass gives the first non-finite value and the distance to the global
    model, so nothing model-sized is allocated or copied per update. Other codecs are
    decoded into the array the caller provides, then checked the same way.
    """

    def __init__(self, dim: int, max_update_norm: float, block: int = 1 << 16) -> None:
        self.dim = dim
        self.max_update_norm = float(max_update_norm)
        self.block = max(1, min(block, dim))

    def distance(self, vec: np.ndarray, global_params: np.ndarray) -> float:
        """L2 norm of ``vec - global_params`` (float32 (D,) each; NaN if ``vec`` is not finite)."""
        arr = np.ascontiguousarray(vec, dtype=np.float32)
        bad, sq = agg.check_f32_update(memoryview(arr).cast("B"), 0, global_params)
        return float("nan") if bad >= 0 else float(np.sqrt(sq))

    def header(self, payload: memoryview | bytes | None) -> codec.CodecHeader:
        """The payload's codec header, checked against its length and the model size.

        Raises
        ------
        Rejected
            With reason ``decode`` (missing, malformed) or ``size``.
        """
        if payload is None:
            raise Rejected("decode", "a train result needs a payload")
        try:
            head = codec.read_header(payload)
        except FedgateError as exc:
            raise Rejected("decode", str(exc)) from None
        if head.count != self.dim:
            raise Rejected("size", f"update has {head.count} values, the model has {self.dim}")
        return head

    def _norm(self, sq: float) -> float:
        norm = float(np.sqrt(sq))
        if not norm <= self.max_update_norm:
            raise Rejected("norm", f"update norm {norm:.4g} exceeds max_update_norm {self.max_update_norm:g}")
        return norm

    def check(self, payload: memoryview | bytes | None, global_params: np.ndarray,
              out: Callable[[], np.ndarray], head: codec.CodecHeader | None = None) -> tuple[np.ndarray, float]:
        """Decode and check one update; returns ``(params, update_norm)``.

        ``params`` is float32 (D,): for the ``f32`` codec a read-only view straight on the
        received frame (no copy, see below), otherwise the array ``out()`` returns, filled
        by :func:`fedgate.core.codec.decode`. The length announced by the codec header is
        checked before anything is decoded (``head``: the header already read by
        :meth:`header`).

        The buffer's CRC32 is not recomputed here, because the transport already
        guarantees integrity (CURVE's Poly1305 tag, or TCP's checksum in insecure mode)
        and the CRC costs more than the rest of the checks together; the header is
        validated against the buffer length, and the decoders check every length, scale
        and index, so nothing is read out of bounds. Every value is still checked for
        finiteness and the norm bound.

        Raises
        ------
        Rejected
            With reason ``decode``, ``size``, ``nonfinite`` or ``norm``.
        """
        if head is None:
            head = self.header(payload)
        if head.codec is codec.Codec.F32:
            bad, sq = agg.check_f32_update(payload, codec.HEADER_SIZE, global_params)
            if bad >= 0:
                raise Rejected("nonfinite", f"update has a non-finite value at index {bad}")
            vec = np.frombuffer(payload, dtype="<f4", count=self.dim,  # type: ignore[arg-type]
                                offset=codec.HEADER_SIZE)
            return vec, self._norm(sq)
        try:
            vec = codec.decode(payload, out=out(), check_crc=False)  # type: ignore[arg-type]
        except FedgateError as exc:
            raise Rejected("decode", str(exc)) from None
        bad, sq = agg.check_f32_update(memoryview(vec).cast("B"), 0, global_params)
        if bad >= 0:
            raise Rejected("nonfinite", f"update has a non-finite value at index {bad}")
        return vec, self._norm(sq)

    def check_q8(self, payload: memoryview | bytes, head: codec.CodecHeader, global_params: np.ndarray) -> float:
        """Check a ``q8`` update in place (no decoded copy); returns its norm.

        ``head`` is the header :meth:`header` read. The strategy then folds the same
        buffer in with ``add_q8``. No CRC, as in :meth:`check`.

        Raises
        ------
        Rejected
            ``decode`` (a negative or non-finite block scale), ``nonfinite`` or ``norm``.
        """
        status, index, sq = agg.check_q8_update(payload, codec.HEADER_SIZE, head.param, global_params)
        if status == 1:
            raise Rejected("decode", f"q8 block {index} has a negative or non-finite scale")
        if status == 2:
            raise Rejected("nonfinite", f"update has a non-finite value at index {index}")
        return self._norm(sq)


def materialize_update(head: codec.CodecHeader, decoded: np.ndarray, global_params: np.ndarray) -> np.ndarray:
    """The parameters a decoded payload stands for.

    Parameters
    ----------
    head : CodecHeader
        The payload's header (:func:`fedgate.core.codec.read_header`).
    decoded : float32 (D,)
        The decoded payload; for a delta it must be writable: the global model is
        added in place and ``decoded`` returned.
    global_params : float32 (D,)
        The global model the task carried (the server's current one).

    Returns
    -------
    float32 (D,) : ``decoded + global_params`` for a delta, else ``decoded`` itself.
    """
    if head.delta:
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is found by the finiteness check
            np.add(decoded, global_params, out=decoded)
    return decoded


def check_update(validator: UpdateValidator, payload: memoryview | bytes | None, global_params: np.ndarray,
                 out: Callable[[], np.ndarray]) -> tuple[np.ndarray, float]:
    """:meth:`UpdateValidator.check` for parameters or deltas; returns ``(params, update_norm)``.

    A payload without the DELTA flag goes to ``validator.check`` unchanged. A delta is
    decoded into ``out()``, checked for size and finiteness, turned into parameters
    by :func:`materialize_update`, and checked again (finite, norm of params - global
    under ``max_update_norm``) exactly like parameters. A ``topk`` payload without the
    flag is refused: its unsent entries would read as zero parameters.

    Raises
    ------
    Rejected
        With reason ``decode``, ``size``, ``nonfinite`` or ``norm``.
    """
    head = validator.header(payload)  # decode / size
    if not head.delta:
        if head.codec is codec.Codec.TOPK:
            raise Rejected("decode", "a topk train result must carry a delta (the codec header's DELTA flag)")
        return validator.check(payload, global_params, out, head)
    try:
        vec = codec.decode(payload, out=out())  # type: ignore[arg-type]
    except FedgateError as exc:
        raise Rejected("decode", str(exc)) from None
    bad = agg.first_nonfinite(vec)
    if bad >= 0:
        raise Rejected("nonfinite", f"update has a non-finite value at index {bad}")
    params = materialize_update(head, vec, global_params)
    bad, sq = agg.check_f32_update(memoryview(params).cast("B"), 0, global_params)
    if bad >= 0:
        raise Rejected("nonfinite", f"global + update overflows at index {bad}")
    norm = float(np.sqrt(sq))
    if not norm <= validator.max_update_norm:
        raise Rejected("norm", f"update norm {norm:.4g} exceeds max_update_norm {validator.max_update_norm:g}")
    return params, norm
