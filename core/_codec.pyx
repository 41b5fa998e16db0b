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

from fedgate.core.crc import crc32 as _crc32  # zlib's CRC-32, faster (isal) where available

cdef extern from "Python.h":
    void* PyMem_RawMalloc(size_t n) nogil
    void PyMem_RawFree(void* p) nogil

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <math.h>
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
        uint32_t m = 0u - (uint32_t)(a < 0x38800000u);  /* bit masks, not branches: vectorises */
        return (uint16_t)(sign | (sub & m) | (normal & ~m));
    }

    /* float16 bits -> float32: exact for every pattern (subnormals, Inf and NaN too). */
    static inline float fg_h2f(uint16_t h) {
        uint32_t sign = ((uint32_t)h & 0x8000u) << 16;
        uint32_t em = (uint32_t)h & 0x7fffu;
        uint32_t normal = (em << 13) + 0x38000000u;
        uint32_t special = 0x7f800000u | ((em & 0x3ffu) << 13);
        uint32_t sub = fg_f2u((float)(int32_t)em * 5.9604644775390625e-08f);
        uint32_t ms = 0u - (uint32_t)(em < 0x400u), mi = 0u - (uint32_t)(em >= 0x7c00u);
        uint32_t bits = (sub & ms) | (special & mi & ~ms) | (normal & ~mi & ~ms);
        return fg_u2f(sign | bits);
    }

    /* counter-based uniform in [0, 1): a 32-bit integer hash of (seed, index) */
    static inline float fg_uniform(uint32_t seed, uint32_t i) {
        uint32_t x = i * 0x9e3779b9u + seed;
        x ^= x >> 16; x *= 0x21f0aaadu;
        x ^= x >> 15; x *= 0x735a2d97u;
        x ^= x >> 15;
        return (float)(int32_t)(x >> 8) * 5.9604644775390625e-08f;  /* signed: native on every SIMD level */
    }

    /* Array loops, compiled for AVX-512, AVX2 and the baseline on x86-64 Linux/GCC
       (function multi-versioning: the loader picks the best for the CPU). */
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
    #define FG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
    #else
    #define FG_CLONES
    #endif

    /* max over i of the bits of |v[i] (+ r[i])|: >= 0x7f800000 means Inf or NaN */
    FG_CLONES static uint32_t fg_maxabs_bits(const float* __restrict v, const float* __restrict r,
                                             Py_ssize_t n) {
        uint32_t m = 0;
        if (r == NULL) {
            for (Py_ssize_t i = 0; i < n; i++) { uint32_t a = fg_f2u(v[i]) & 0x7fffffffu; m = a > m ? a : m; }
        } else {
            for (Py_ssize_t i = 0; i < n; i++) { uint32_t a = fg_f2u(v[i] + r[i]) & 0x7fffffffu; m = a > m ? a : m; }
        }
        return m;
    }

    /* The whole q8 payload in one call (no per-block dispatch): per block the largest
       |x|, the float32 scale max|x| / 127 (kept so 127 * scale stays finite; zero for
       all-zero or subnormal blocks) and the codes. Returns 1 if a value is not finite. */
    FG_CLONES static int fg_q8_encode(const float* __restrict v, float* __restrict r, int8_t* __restrict q,
                                      char* scales, Py_ssize_t n, Py_ssize_t block, uint32_t seed) {
        for (Py_ssize_t c0 = 0, b = 0; c0 < n; c0 += block, b++) {
            Py_ssize_t w = n - c0 < block ? n - c0 : block;
            const float* vb = v + c0;
            float* rb = r ? r + c0 : NULL;
            int8_t* qb = q + c0;
            uint32_t m = 0, base = (uint32_t)c0;
            float scale = 0.0f, inv = 0.0f;
            if (rb == NULL) {
                for (Py_ssize_t i = 0; i < w; i++) { uint32_t a = fg_f2u(vb[i]) & 0x7fffffffu; m = a > m ? a : m; }
            } else {
                for (Py_ssize_t i = 0; i < w; i++) { uint32_t a = fg_f2u(vb[i] + rb[i]) & 0x7fffffffu; m = a > m ? a : m; }
            }
            if (m >= 0x7f800000u) return 1;
            if (m >= 0x00800000u) {
                scale = (float)((double)fg_u2f(m) / 127.0);
                if ((double)scale * 127.0 > 3.4028234663852886e38) scale = nextafterf(scale, 0.0f);
                inv = (float)(127.0 / (double)fg_u2f(m));
            }
            memcpy(scales + 4 * b, &scale, 4);
            if (rb == NULL) {
                for (Py_ssize_t i = 0; i < w; i++) {
                    float t = vb[i] * inv + fg_uniform(seed, base + (uint32_t)i) + 128.0f;
                    t = t > 1.0f ? t : 1.0f;
                    t = t < 255.0f ? t : 255.0f;
                    qb[i] = (int8_t)((int32_t)t - 128);
                }
            } else {
                for (Py_ssize_t i = 0; i < w; i++) {
                    float x = vb[i] + rb[i];
                    float t = x * inv + fg_uniform(seed, base + (uint32_t)i) + 128.0f;
                    t = t > 1.0f ? t : 1.0f;
                    t = t < 255.0f ? t : 255.0f;
                    int32_t qi = (int32_t)t - 128;
                    qb[i] = (int8_t)qi;
                    rb[i] = x - (float)qi * scale;
                }
            }
        }
        return 0;
    }

    FG_CLONES static void fg_q8_dequant(const int8_t* __restrict q, float* __restrict out, Py_ssize_t n,
                                        float scale) {
        for (Py_ssize_t i = 0; i < n; i++) out[i] = (float)q[i] * scale;
    }

    FG_CLONES static void fg_f2h_array(const float* __restrict v, float* __restrict r, uint16_t* __restrict h,
                                       Py_ssize_t n) {
        if (r == NULL) {
            for (Py_ssize_t i = 0; i < n; i++) h[i] = fg_f2h(v[i]);
        } else {
            for (Py_ssize_t i = 0; i < n; i++) {
                float x = v[i] + r[i];
                uint16_t b = fg_f2h(x);
                h[i] = b;
                r[i] = x - fg_h2f(b);
            }
        }
    }

    FG_CLONES static void fg_h2f_array(const uint16_t* __restrict h, float* __restrict out, Py_ssize_t n) {
        for (Py_ssize_t i = 0; i < n; i++) out[i] = fg_h2f(h[i]);
    }
    """
    uint32_t fg_f2u(float f) nogil
    float fg_u2f(uint32_t u) nogil
    uint16_t fg_f2h(float f) nogil
    float fg_h2f(uint16_t h) nogil
    float fg_uniform(uint32_t seed, uint32_t i) nogil
    uint32_t fg_maxabs_bits(const float* v, const float* r, Py_ssize_t n) nogil
    void fg_q8_dequant(const int8_t* q, float* out, Py_ssize_t n, float scale) nogil
    int fg_q8_encode(const float* v, float* r, int8_t* q, char* scales, Py_ssize_t n, Py_ssize_t block,
                     uint32_t seed) nogil
    void fg_f2h_array(const float* v, float* r, uint16_t* h, Py_ssize_t n) nogil
    void fg_h2f_array(const uint16_t* h, float* out, Py_ssize_t n) nogil

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
    cdef uint32_t crc = _crc32(mv[HEADER:], _crc32(mv[:CRC_AT])) & 0xffffffff
    memcpy(data + CRC_AT, &crc, 4)


def payload_crc(const uint8_t[::1] buf):
    """CRC32 over buf[:20] + buf[24:], as written by the encoders."""
    cdef memoryview mv = memoryview(buf)
    return _crc32(mv[HEADER:], _crc32(mv[:CRC_AT])) & 0xffffffff


# ------------------------------------------------------------------------- helpers

cdef inline float _x(const float* v, const float* res, Py_ssize_t i) noexcept nogil:
    if res == NULL:
        return v[i]
    return v[i] + res[i]


def max_abs(const float[::1] vec, object residual):
    """max |vec + residual| (residual may be None); Inf or NaN if any value is not finite."""
    cdef const float* r = NULL
    cdef const float[::1] rv
    cdef uint32_t m
    if residual is not None:
        rv = residual
        r = &rv[0]
    with nogil:
        m = fg_maxabs_bits(&vec[0], r, vec.shape[0])
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
    """residual (or an empty array) receives x - f16(x) when given. |x| < 65520 (checked)."""
    cdef Py_ssize_t n = vec.shape[0]
    cdef float* r = &residual[0] if residual.shape[0] == n else NULL
    cdef char* data
    cdef bytes out = _new_buffer(header, 2 * n, &data)
    with nogil:
        fg_f2h_array(&vec[0], r, <uint16_t*>(data + HEADER), n)
    _seal(out, data)
    return out


def decode_f16(const uint8_t[::1] buf, float[::1] out):
    with nogil:
        fg_h2f_array(<const uint16_t*>&buf[HEADER], &out[0], out.shape[0])


# ----------------------------------------------------------------------------- q8

def encode_q8(const float[::1] vec, float[::1] residual, Py_ssize_t block, uint32_t seed,
              const uint8_t[::1] header):
    """Per block: scale = max|x| / 127 (float32), q = floor(x / scale + u), u ~ U[0, 1).

    Layout after the header: nblocks float32 scales, then n int8 codes. Returns
    None if a value is not finite (nothing is sent).
    """
    cdef Py_ssize_t n = vec.shape[0]
    cdef Py_ssize_t nb = (n + block - 1) // block
    cdef char* data
    cdef bytes out = _new_buffer(header, 4 * nb + n, &data)
    cdef char* scales = data + HEADER
    cdef int8_t* q = <int8_t*>(data + HEADER + 4 * nb)
    cdef const float* v = &vec[0]
    cdef float* r = &residual[0] if residual.shape[0] == n else NULL
    cdef bint bad
    with nogil:
        bad = fg_q8_encode(v, r, q, scales, n, block, seed)
    if bad:
        return None
    _seal(out, data)
    return out


def decode_q8(const uint8_t[::1] buf, Py_ssize_t block, float[::1] out):
    """Returns -1, or the index of the first block whose scale is negative or not finite."""
    cdef Py_ssize_t n = out.shape[0]
    cdef Py_ssize_t nb = (n + block - 1) // block
    cdef const uint8_t* p = &buf[HEADER]
    cdef const int8_t* q = <const int8_t*>(p + 4 * nb)
    cdef Py_ssize_t b, c0, bad = -1
    cdef uint32_t bits
    with nogil:
        for b in range(nb):
            memcpy(&bits, p + 4 * b, 4)
            if bits >= 0x7f800000u:  # negative (sign bit set), Inf or NaN
                bad = b
                break
            c0 = b * block
            fg_q8_dequant(q + c0, &out[c0], min(block, n - c0), fg_u2f(bits))
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
