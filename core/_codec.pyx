"""Compiled update codecs behind :mod:`fedgate.core.codec`.

Private module. Encoders receive a header already packed by the façade, allocate
the output ``bytes`` once and fill it in place (header, payload, CRC32).
Decoders receive a buffer whose lengths the façade has checked against the
header; they still check every value that could steer a memory access
(top-k indices) and report problems as return codes, never raising in ``nogil``.
Multi-byte values are little-endian (the only byte order fedgate builds on).
"""
from libc.stdint cimport uint8_t, int8_t, uint16_t, uint32_t, int32_t
from libc.string cimport memcpy
from libc.math cimport nextafterf
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING

import zlib

cdef extern from "Python.h":
    void* PyMem_RawMalloc(size_t n) nogil
    void PyMem_RawFree(void* p) nogil

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint32_t fg_f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
    static inline float fg_u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

    /* float32 -> float16 bits, round to nearest even; |f| must be < 65520 (no overflow).
       Normal results: rebias the exponent and round the 13 dropped mantissa bits;
       subnormal results: one float addition with 0.5 rounds to a multiple of 2^-24. */
    static inline uint16_t fg_f2h(float f) {
        uint32_t x = fg_f2u(f);
        uint32_t sign = (x >> 16) & 0x8000u;
        uint32_t a = x & 0x7fffffffu;
        uint32_t normal = (a + 0xc8000fffu + ((a >> 13) & 1u)) >> 13;
        uint32_t sub = fg_f2u(fg_u2f(a) + 0.5f) - 0x3f000000u;
        return (uint16_t)(sign | (a < 0x38800000u ? sub : normal));
    }

    /* float16 bits -> float32: exact for every pattern (subnormals, Inf and NaN too). */
    static inline float fg_h2f(uint16_t h) {
        uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
        uint32_t em = (uint32_t)h & 0x7fffu;
        uint32_t normal = (em << 13) + 0x38000000u;
        uint32_t special = 0x7f800000u | ((em & 0x3ffu) << 13);
        uint32_t sub = fg_f2u((float)em * 5.9604644775390625e-08f);
        uint32_t bits = em < 0x400u ? sub : (em >= 0x7c00u ? special : normal);
        return fg_u2f(sign | bits);
    }

    /* counter-based uniform in [0, 1): a 32-bit integer hash of (seed, index) */
    static inline float fg_uniform(uint32_t seed, uint32_t i) {
        uint32_t x = i * 0x9e3779b9u + seed;
        x ^= x >> 16; x *= 0x21f0aaadu;
        x ^= x >> 15; x *= 0x735a2d97u;
        x ^= x >> 15;
        return (float)(x >> 8) * 5.9604644775390625e-08f;
    }
    """
    uint32_t fg_f2u(float f) nogil
    float fg_u2f(uint32_t u) nogil
    uint16_t fg_f2h(float f) nogil
    float fg_h2f(uint16_t h) nogil
    float fg_uniform(uint32_t seed, uint32_t i) nogil

cdef Py_ssize_t HEADER = 24
cdef Py_ssize_t CRC_AT = 20


cdef bytes _new_buffer(const uint8_t[::1] header, Py_ssize_t payload, char** data):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HEADER + payload)
    data[0] = PyBytes_AS_STRING(out)
    memcpy(data[0], &header[0], CRC_AT)
    memcpy(data[0] + CRC_AT, b"\0\0\0\0", 4)
    return out


cdef void _seal(bytes out, char* data):
    """Write CRC32 over header[:20] + payload into header[20:24]."""
    cdef memoryview mv = memoryview(out)
    cdef uint32_t crc = zlib.crc32(mv[HEADER:], zlib.crc32(mv[:CRC_AT])) & 0xffffffff
    memcpy(data + CRC_AT, &crc, 4)


def payload_crc(const uint8_t[::1] buf):
    """CRC32 over buf[:20] + buf[24:], as written by the encoders."""
    cdef memoryview mv = memoryview(buf)
    return zlib.crc32(mv[HEADER:], zlib.crc32(mv[:CRC_AT])) & 0xffffffff


# ------------------------------------------------------------------------- helpers

cdef inline float _x(const float* v, const float* res, Py_ssize_t i) noexcept nogil:
    if res == NULL:
        return v[i]
    return v[i] + res[i]


def max_abs(const float[::1] vec, object residual):
    """max |vec + residual| (residual may be None)."""
    cdef const float* v = &vec[0]
    cdef const float* r = NULL
    cdef const float[::1] rv
    cdef Py_ssize_t i, n = vec.shape[0]
    cdef uint32_t m = 0, a
    if residual is not None:
        rv = residual
        r = &rv[0]
    with nogil:
        if r == NULL:
            for i in range(n):
                a = fg_f2u(v[i]) & 0x7fffffffu
                m = a if a > m else m
        else:
            for i in range(n):
                a = fg_f2u(v[i] + r[i]) & 0x7fffffffu
                m = a if a > m else m
    return fg_u2f(m)


# ---------------------------------------------------------------------------- f32

def encode_f32(const float[::1] vec, const uint8_t[::1] header):
    cdef Py_ssize_t n = vec.shape[0]
    cdef char* data
    cdef bytes out = _new_buffer(header, 4 * n, &data)
    with nogil:
        memcpy(data + HEADER, &vec[0], 4 * n)
    _seal(out, data)
    return out


def decode_f32(const uint8_t[::1] buf, float[::1] out):
    cdef Py_ssize_t n = out.shape[0]
    with nogil:
        memcpy(&out[0], &buf[HEADER], 4 * n)


# ---------------------------------------------------------------------------- f16

def encode_f16(const float[::1] vec, float[::1] residual, const uint8_t[::1] header):
    """residual (or an empty array) receives x - f16(x) when given."""
    cdef Py_ssize_t i, n = vec.shape[0]
    cdef bint ef = residual.shape[0] == n
    cdef char* data
    cdef bytes out = _new_buffer(header, 2 * n, &data)
    cdef uint16_t* h = <uint16_t*>(data + HEADER)
    cdef const float* v = &vec[0]
    cdef float* r
    cdef float x
    with nogil:
        if not ef:
            for i in range(n):
                h[i] = fg_f2h(v[i])
        else:
            r = &residual[0]
            for i in range(n):
                x = v[i] + r[i]
                h[i] = fg_f2h(x)
                r[i] = x - fg_h2f(h[i])
    _seal(out, data)
    return out


def decode_f16(const uint8_t[::1] buf, float[::1] out):
    cdef Py_ssize_t i, n = out.shape[0]
    cdef const uint16_t* h = <const uint16_t*>&buf[HEADER]
    with nogil:
        for i in range(n):
            out[i] = fg_h2f(h[i])


# ----------------------------------------------------------------------------- q8

def encode_q8(const float[::1] vec, float[::1] residual, Py_ssize_t block, uint32_t seed,
              const uint8_t[::1] header):
    """Per block: scale = max|x| / 127 (float32), q = floor(x / scale + u), u ~ U[0, 1).

    Layout after the header: nblocks float32 scales, then n int8 codes.
    """
    cdef Py_ssize_t n = vec.shape[0]
    cdef Py_ssize_t nb = (n + block - 1) // block
    cdef bint ef = residual.shape[0] == n
    cdef char* data
    cdef bytes out = _new_buffer(header, 4 * nb + n, &data)
    cdef float* scales = <float*>(data + HEADER)
    cdef int8_t* q = <int8_t*>(data + HEADER + 4 * nb)
    cdef const float* v = &vec[0]
    cdef float* r = &residual[0] if ef else NULL
    cdef Py_ssize_t b, i, c0, c1
    cdef uint32_t m, a
    cdef float scale, inv, t, x
    cdef int32_t qi
    cdef float lo = 1.0, hi = 255.0, mid = 128.0
    with nogil:
        for b in range(nb):
            c0 = b * block
            c1 = min(c0 + block, n)
            m = 0
            if r == NULL:
                for i in range(c0, c1):
                    a = fg_f2u(v[i]) & 0x7fffffffu
                    m = a if a > m else m
            else:
                for i in range(c0, c1):
                    a = fg_f2u(v[i] + r[i]) & 0x7fffffffu
                    m = a if a > m else m
            if m < 0x00800000u:  # all zero or subnormal: send zeros
                scale = 0.0
                inv = 0.0
            else:
                scale = fg_u2f(m) / 127.0
                if <double>scale * 127.0 > 3.4028234663852886e38:  # keep 127 * scale finite
                    scale = nextafterf(scale, 0.0)
                inv = 127.0 / fg_u2f(m)
            memcpy(&scales[b], &scale, 4)
            if r == NULL:
                for i in range(c0, c1):
                    # shifted by 128 so truncation equals floor; clamp to [-127, 127]
                    t = v[i] * inv + fg_uniform(seed, <uint32_t>i) + mid
                    t = t if t > lo else lo
                    t = t if t < hi else hi
                    q[i] = <int8_t>(<int32_t>t - 128)
            else:
                for i in range(c0, c1):
                    x = v[i] + r[i]
                    t = x * inv + fg_uniform(seed, <uint32_t>i) + mid
                    t = t if t > lo else lo
                    t = t if t < hi else hi
                    qi = <int32_t>t - 128
                    q[i] = <int8_t>qi
                    r[i] = x - <float>qi * scale
    _seal(out, data)
    return out


def decode_q8(const uint8_t[::1] buf, Py_ssize_t block, float[::1] out):
    """Returns -1, or the index of the first block whose scale is negative or not finite."""
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nb = (n + block - 1) // block
    cdef const uint8_t* p = &buf[HEADER]
    cdef const int8_t* q = <const int8_t*>(p + 4 * nb)
    cdef Py_ssize_t b, i, c0, c1, bad = -1
    cdef float scale
    cdef uint32_t bits
    with nogil:
        for b in range(nb):
            memcpy(&bits, p + 4 * b, 4)
            if bits >= 0x7f800000u:  # negative (sign bit set), Inf or NaN
                bad = b
                break
            scale = fg_u2f(bits)
            c0 = b * block
            c1 = min(c0 + block, n)
            for i in range(c0, c1):
                out[i] = <float>q[i] * scale
    return bad


# --------------------------------------------------------------------------- top-k

cdef uint32_t _radix_threshold(const float* v, const float* r, Py_ssize_t n, Py_ssize_t k,
                               Py_ssize_t* take_ties, uint32_t* cand) noexcept nogil:
    """Key (|x| bits) of the k-th largest |x|; take_ties = how many equal keys to keep.

    Three histogram passes on 11, 11 and 10 bits of the non-negative float bits
    (whose integer order is the order of the values); the second and third run
    over the candidates of the boundary bin only.
    """
    cdef uint32_t hist[2048]
    cdef Py_ssize_t i, need = k, nc = 0, b
    cdef uint32_t key, prefix
    cdef int shift, width, level
    for i in range(2048):
        hist[i] = 0
    for i in range(n):
        hist[(fg_f2u(_x(v, r, i)) & 0x7fffffffu) >> 21] += 1
    b = 2047
    while need > hist[b]:
        need -= hist[b]
        b -= 1
    prefix = <uint32_t>b << 21
    for i in range(n):
        key = fg_f2u(_x(v, r, i)) & 0x7fffffffu
        if (key >> 21) == <uint32_t>b:
            cand[nc] = key
            nc += 1
    for level in range(2):
        shift = 10 if level == 0 else 0
        width = 11 if level == 0 else 10
        for i in range(1 << width):
            hist[i] = 0
        for i in range(nc):
            key = cand[i]
            if (key >> (shift + width)) == (prefix >> (shift + width)):
                hist[(key >> shift) & ((1u << width) - 1)] += 1
        b = (1 << width) - 1
        while need > hist[b]:
            need -= hist[b]
            b -= 1
        prefix |= <uint32_t>b << shift
    take_ties[0] = need
    return prefix


def encode_topk(const float[::1] vec, float[::1] residual, Py_ssize_t k, const uint8_t[::1] header):
    """Keep the k largest |x| (ties: lowest indices), as increasing uint32 indices + float32 values."""
    cdef Py_ssize_t n = vec.shape[0]
    cdef bint ef = residual.shape[0] == n
    cdef char* data
    cdef bytes out = _new_buffer(header, 8 * k, &data)
    cdef uint32_t* idx = <uint32_t*>(data + HEADER)
    cdef float* val = <float*>(data + HEADER + 4 * k)
    cdef const float* v = &vec[0]
    cdef float* r = &residual[0] if ef else NULL
    cdef uint32_t* cand = <uint32_t*>PyMem_RawMalloc(4 * n)
    cdef uint32_t thr, key
    cdef Py_ssize_t ties, i, j = 0
    cdef float x
    if cand == NULL:
        raise MemoryError()
    with nogil:
        thr = _radix_threshold(v, r, n, k, &ties, cand)
        for i in range(n):
            x = _x(v, r, i)
            key = fg_f2u(x) & 0x7fffffffu
            if key > thr or (key == thr and ties > 0):
                if key == thr:
                    ties -= 1
                idx[j] = <uint32_t>i
                val[j] = x
                j += 1
                if r != NULL:
                    r[i] = 0.0
            elif r != NULL:
                r[i] = x
    PyMem_RawFree(cand)
    _seal(out, data)
    return out


def decode_topk(const uint8_t[::1] buf, Py_ssize_t k, float[::1] out):
    """Scatter k (index, value) pairs into a zeroed out.

    Returns -1, or the position of the first index that is out of range or not
    strictly increasing (nothing is written past that point).
    """
    cdef Py_ssize_t n = out.shape[0], i
    cdef const uint8_t* p = &buf[HEADER]
    cdef uint32_t ix
    cdef long long prev = -1
    cdef Py_ssize_t bad = -1
    cdef float x
    with nogil:
        for i in range(k):
            memcpy(&ix, p + 4 * i, 4)
            if <long long>ix <= prev or <Py_ssize_t>ix >= n:
                bad = i
                break
            prev = ix
            memcpy(&x, p + 4 * k + 4 * i, 4)
            out[ix] = x
    return bad
