"""Fused update kernels behind :mod:`fedgate.core.aggregate` (checks and sums read in place).

Private module: every function trusts its arguments (lengths, block sizes and offsets
are checked by the façade) and runs inside one ``nogil`` region. The updates are read
straight from a received byte buffer at any alignment (loads through ``memcpy``), so
a model-sized update is never copied or decoded into a temporary array:

* ``check_f32`` / ``check_q8``: one pass over an update and a reference vector giving
  the first non-finite value and the squared L2 distance (in float64 of the float32
  differences);
* ``accumulate_q8``: ``acc += w * dequantised codes`` (float64), block by block.

q8 layout (see :mod:`fedgate.core.codec`): ``ceil(n / block)`` float32 scales, then
``n`` int8 codes; value = (float) code * scale, computed in float32 exactly as the
codec's decoder does.
Compiler directives come from ``setup.py``.
"""
from libc.stdint cimport int8_t, uint8_t, uint32_t


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
    #define FG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
    #else
    #define FG_CLONES
    #endif
    typedef float fg_v4f __attribute__((vector_size(16)));
    typedef double fg_v4d __attribute__((vector_size(32)));
    typedef uint32_t fg_v4u __attribute__((vector_size(16)));
    typedef int8_t fg_v4c __attribute__((vector_size(4)));
    #define FG_EXP 0x7f800000u

    static inline float fg_load_f32(const uint8_t* p) { float f; memcpy(&f, p, 4); return f; }
    static inline uint32_t fg_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
    static inline fg_v4u fg_nonfinite4(fg_v4f v) {
        const fg_v4u e = {FG_EXP, FG_EXP, FG_EXP, FG_EXP};
        return (fg_v4u)(((fg_v4u)v & e) == e);
    }
    /* acc += (double)(v - r)^2, four lanes (a macro: no 32-byte vector crosses a call) */
    #define FG_SQDIFF4(acc, v, r) do { fg_v4d d_ = __builtin_convertvector((v) - (r), fg_v4d); \
                                       (acc) += d_ * d_; } while (0)

    /* x: n float32 at any alignment. NaN/Inf test of the bits and the sum of (x - r)^2
       (float32 differences, squared and summed in double, 8 lanes). Returns 1 when a
       NaN/Inf was seen (sq is then meaningless), else 0. */
    FG_CLONES static int fg_check_f32(const uint8_t* x, const float* r, Py_ssize_t n, double* sq) {
        fg_v4d a0 = {0, 0, 0, 0}, a1 = {0, 0, 0, 0};
        fg_v4u bad = {0, 0, 0, 0};
        Py_ssize_t i = 0;
        for (; i + 8 <= n; i += 8) {
            fg_v4f v0, v1, r0, r1;
            memcpy(&v0, x + 4 * i, 16); memcpy(&v1, x + 4 * i + 16, 16);
            memcpy(&r0, r + i, 16); memcpy(&r1, r + i + 4, 16);
            bad |= fg_nonfinite4(v0) | fg_nonfinite4(v1);
            FG_SQDIFF4(a0, v0, r0);
            FG_SQDIFF4(a1, v1, r1);
        }
        uint32_t b = bad[0] | bad[1] | bad[2] | bad[3];
        double s = 0.0;
        for (; i < n; i++) {
            float v = fg_load_f32(x + 4 * i);
            b |= (fg_bits(v) & FG_EXP) == FG_EXP;
            double d = (double)(v - r[i]);
            s += d * d;
        }
        a0 += a1;
        *sq = s + (a0[0] + a0[1]) + (a0[2] + a0[3]);
        return b != 0;
    }

    /* m q8 codes with scale s against r: as fg_check_f32 for the values (float)q * s
       (dequantised 1024 at a time into a buffer that stays in L1), adding to *sq */
    FG_CLONES static int fg_check_q8(const int8_t* q, float s, const float* r, Py_ssize_t m, double* sq) {
        float tmp[1024];
        int bad = 0;
        for (Py_ssize_t c0 = 0; c0 < m; c0 += 1024) {
            Py_ssize_t w = m - c0 < 1024 ? m - c0 : 1024;
            for (Py_ssize_t i = 0; i < w; i++) tmp[i] = (float)q[c0 + i] * s;
            double part = 0.0;
            bad |= fg_check_f32((const uint8_t*)tmp, r + c0, w, &part);
            *sq += part;
        }
        return bad;
    }

    FG_CLONES static void fg_axpy_q8(double* __restrict acc, const int8_t* __restrict q, float s, double w,
                                     Py_ssize_t m) {
        for (Py_ssize_t i = 0; i < m; i++) acc[i] += w * (double)((float)q[i] * s);
    }
    """
    int fg_check_f32(const uint8_t* x, const float* r, Py_ssize_t n, double* sq) noexcept nogil
    int fg_check_q8(const int8_t* q, float s, const float* r, Py_ssize_t m, double* sq) noexcept nogil
    void fg_axpy_q8(double* acc, const int8_t* q, float s, double w, Py_ssize_t m) noexcept nogil
    float fg_load_f32(const uint8_t* p) noexcept nogil
    uint32_t fg_bits(float f) noexcept nogil

def check_f32(const uint8_t[::1] buf, Py_ssize_t offset, const float[::1] ref):
    """(first NaN/Inf index or -1, sum (x - ref)^2) of the n = len(ref) float32 at buf[offset:]."""
    cdef double sq = 0.0
    cdef Py_ssize_t i, n = ref.shape[0], bad = -1
    cdef const uint8_t* x = &buf[offset]
    with nogil:
        if fg_check_f32(x, &ref[0], n, &sq):
            for i in range(n):
                if (fg_bits(fg_load_f32(x + 4 * i)) & 0x7f800000u) == 0x7f800000u:
                    bad = i
                    break
    return bad, sq


def check_q8(const uint8_t[::1] buf, Py_ssize_t offset, Py_ssize_t block, const float[::1] ref):
    """(status, index, sum (x - ref)^2) of the q8 vector at buf[offset:], n = len(ref).

    status 0: all finite (index -1); 1: block ``index`` has a negative or non-finite
    scale; 2: value ``index`` dequantises to an infinity.
    """
    cdef Py_ssize_t n = ref.shape[0], nb = (n + block - 1) // block, b, c0, m, i
    cdef const uint8_t* scales = &buf[offset]
    cdef const int8_t* codes = <const int8_t*>(scales + 4 * nb)
    cdef const float* r = &ref[0]
    cdef double sq = 0.0
    cdef float s
    cdef int status = 0
    cdef Py_ssize_t where = -1
    with nogil:
        for b in range(nb):
            s = fg_load_f32(scales + 4 * b)
            if fg_bits(s) >= 0x7f800000u:  # negative (sign bit set), Inf or NaN
                status = 1
                where = b
                break
            c0 = b * block
            m = min(block, n - c0)
            if fg_check_q8(codes + c0, s, r + c0, m, &sq):
                status = 2
                for i in range(c0, c0 + m):
                    if (fg_bits(<float>codes[i] * s) & 0x7f800000u) == 0x7f800000u:
                        where = i
                        break
                break
    return status, where, sq


def accumulate_q8(double[::1] acc, const uint8_t[::1] buf, Py_ssize_t offset, Py_ssize_t block, double weight):
    """acc += weight * dequantised q8 vector at buf[offset:] (n = len(acc); scales checked before)."""
    cdef Py_ssize_t n = acc.shape[0], nb = (n + block - 1) // block, b, c0
    cdef const uint8_t* scales = &buf[offset]
    cdef const int8_t* codes = <const int8_t*>(scales + 4 * nb)
    with nogil:
        for b in range(nb):
            c0 = b * block
            fg_axpy_q8(&acc[c0], codes + c0, fg_load_f32(scales + 4 * b), weight, min(block, n - c0))
