"""Compiled aggregation kernels behind :mod:`fedgate.core.aggregate`.

Private module: every function trusts its arguments (shapes, dtypes, finiteness,
ranges are checked by the façade) and computes inside one ``nogil`` region.
Sums, norms, finiteness and the server optimisers live here; the coordinate-wise
order statistics in ``fedgate.core._order``.
Compiler directives come from ``setup.py``.
"""
from cython cimport floating
from libc.math cimport sqrt
from libc.stdint cimport uint32_t, uint64_t

cdef enum:
    # column block (elements) of the float64 accumulator kept in L1 while rows are folded in
    ACC_BLOCK = 2048


cdef extern from *:
    """
    /* On x86-64 Linux with GCC, hot loops are compiled for AVX-512, AVX2 and the
       baseline, and the loader picks the best for the CPU (function multi-versioning). */
    #include <stdint.h>
    #if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__)
    #define FG_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
    #else
    #define FG_CLONES
    #endif

    /* acc[i] += w * x[i] in double */
    #define FG_AXPY(NAME, T)                                                         \
    FG_CLONES static void NAME(double* __restrict acc, const T* __restrict x,        \
                               double w, Py_ssize_t n) {                             \
        for (Py_ssize_t i = 0; i < n; i++) acc[i] += w * (double)x[i];               \
    }
    FG_AXPY(fg_axpy_f32, float)
    FG_AXPY(fg_axpy_f64, double)
    """
    void fg_axpy_f32(double* acc, const float* x, double w, Py_ssize_t n) noexcept nogil
    void fg_axpy_f64(double* acc, const double* x, double w, Py_ssize_t n) noexcept nogil


# --------------------------------------------------------------------------- sums

cdef inline void _axpy(double* acc, const floating* x, double w, Py_ssize_t n) noexcept nogil:
    if floating is float:
        fg_axpy_f32(acc, x, w, n)
    else:
        fg_axpy_f64(acc, x, w, n)


def accumulate(double[::1] acc, const floating[::1] x, double weight):
    """acc += weight * x  (float64 accumulation)."""
    with nogil:
        _axpy(&acc[0], &x[0], weight, x.shape[0])


def accumulate_stack(double[::1] acc, const floating[:, ::1] stack, const double[::1] weights,
                     bint check_finite=False):
    """acc += sum_i weights[i] * stack[i], column-blocked so acc stays in cache.

    With check_finite, each block of a row is tested (while in L1) before it is
    added; returns True as soon as a NaN/Inf is met (acc then holds a partial sum).
    """
    cdef Py_ssize_t n = stack.shape[0], d = stack.shape[1], c0, r, width
    cdef double* a = &acc[0]
    cdef const floating* s = &stack[0, 0]
    cdef bint bad = False
    with nogil:
        c0 = 0
        while c0 < d and not bad:
            width = min(<Py_ssize_t>ACC_BLOCK, d - c0)
            for r in range(n):
                if check_finite and _any_nonfinite(s + r * d + c0, width):
                    bad = True
                    break
                _axpy(a + c0, s + r * d + c0, weights[r], width)
            c0 += width
    return bad


def scale_into(floating[::1] out, const double[::1] acc, double factor):
    """out = acc * factor (cast to out's dtype)."""
    cdef Py_ssize_t i, n = acc.shape[0]
    with nogil:
        for i in range(n):
            out[i] = <floating>(acc[i] * factor)


def sq_norm(const floating[::1] x):
    """Sum of squares accumulated in float64 (8 independent partial sums)."""
    cdef Py_ssize_t i, j, n = x.shape[0], n8 = n - n % 8
    cdef double part[8]
    cdef double total = 0.0, v
    cdef const floating* p = &x[0]
    with nogil:
        for j in range(8):
            part[j] = 0.0
        i = 0
        while i < n8:
            for j in range(8):
                v = p[i + j]
                part[j] += v * v
            i += 8
        for j in range(8):
            total += part[j]
        for i in range(n8, n):
            v = p[i]
            total += v * v
    return total


def scale_inplace(floating[::1] x, double factor):
    cdef Py_ssize_t i, n = x.shape[0]
    cdef floating f = <floating>factor
    with nogil:
        for i in range(n):
            x[i] = x[i] * f


# ------------------------------------------------------------------ finiteness

cdef Py_ssize_t _first_nonfinite32(const uint32_t* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, c0 = 0, width
    cdef uint32_t bad
    while c0 < n:
        width = min(<Py_ssize_t>1024, n - c0)
        bad = 0
        for i in range(c0, c0 + width):
            bad |= <uint32_t>((b[i] & 0x7f800000u) == 0x7f800000u)
        if bad:
            for i in range(c0, c0 + width):
                if (b[i] & 0x7f800000u) == 0x7f800000u:
                    return i
        c0 += width
    return -1


cdef Py_ssize_t _first_nonfinite64(const uint64_t* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i, c0 = 0, width
    cdef uint64_t bad
    while c0 < n:
        width = min(<Py_ssize_t>1024, n - c0)
        bad = 0
        for i in range(c0, c0 + width):
            bad |= <uint64_t>((b[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull)
        if bad:
            for i in range(c0, c0 + width):
                if (b[i] & 0x7ff0000000000000ull) == 0x7ff0000000000000ull:
                    return i
        c0 += width
    return -1


cdef inline bint _any_nonfinite(const floating* x, Py_ssize_t n) noexcept nogil:
    if floating is float:
        return _first_nonfinite32(<const uint32_t*>x, n) >= 0
    else:
        return _first_nonfinite64(<const uint64_t*>x, n) >= 0


def first_nonfinite(const floating[::1] x):
    """Index of the first NaN/Inf in x, or -1."""
    cdef Py_ssize_t r, n = x.shape[0]
    if n == 0:
        return -1
    with nogil:
        if floating is float:
            r = _first_nonfinite32(<const uint32_t*>&x[0], n)
        else:
            r = _first_nonfinite64(<const uint64_t*>&x[0], n)
    return r


# -------------------------------------------------------------- server optimisers

def fedopt_step(float[::1] params, const float[::1] delta, float[::1] m, float[::1] v,
                int rule, double lr, double beta1, double beta2, double tau):
    """One adaptive server step (rule 0 Adagrad, 1 Adam, 2 Yogi), in place.

    m = beta1 m + (1-beta1) delta; v by the rule; params += lr m / (sqrt(v) + tau).
    """
    cdef Py_ssize_t i, n = params.shape[0]
    cdef double g, g2, mi, vi, s
    with nogil:
        for i in range(n):
            g = delta[i]
            g2 = g * g
            mi = beta1 * m[i] + (1.0 - beta1) * g
            vi = v[i]
            if rule == 0:
                vi = vi + g2
            elif rule == 1:
                vi = beta2 * vi + (1.0 - beta2) * g2
            else:
                s = vi - g2
                vi = vi - (1.0 - beta2) * g2 * ((s > 0) - (s < 0))
            m[i] = <float>mi
            v[i] = <float>vi
            params[i] = <float>(params[i] + lr * mi / (sqrt(vi) + tau))


def momentum_step(float[::1] params, const float[::1] delta, float[::1] mom,
                  double lr, double beta):
    """Server momentum (FedAvgM), in place: mom = beta mom + delta; params += lr mom."""
    cdef Py_ssize_t i, n = params.shape[0]
    cdef double mi
    with nogil:
        for i in range(n):
            mi = beta * mom[i] + delta[i]
            mom[i] = <float>mi
            params[i] = <float>(params[i] + lr * mi)
