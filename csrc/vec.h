// Small vector helpers for the CPU kernels: loads of float/bf16/fp16 rows widened to float, axpy and dot with
// float accumulation. AVX-512 in the AVX-512 build of a kernel file (MI_CROW_AVX512, see isa.h), scalar in the
// baseline build. Written with intrinsics because the compiler may not reorder a floating-point reduction by
// itself.
//
// Included after MI_CROW_ISA_BEGIN, so these inline functions are compiled for the build's target and live in
// its namespace (mi_crow::isa_baseline or mi_crow::isa_avx512): two builds never share a copy.
#pragma once

#include "isa.h"

namespace mi_crow {
namespace MI_CROW_ISA {

#if defined(MI_CROW_AVX512)
template <typename scalar_t>
inline __m512 load16(const scalar_t* p);

template <>
inline __m512 load16<float>(const float* p) {
  return _mm512_loadu_ps(p);
}

template <>
inline __m512 load16<c10::BFloat16>(const c10::BFloat16* p) {
  // bf16 is the upper half of a float32: widen to 32 bits and shift into place.
  __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}

template <>
inline __m512 load16<c10::Half>(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <typename scalar_t>
constexpr bool has_vec16 = std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, c10::BFloat16> ||
                           std::is_same_v<scalar_t, c10::Half>;
#endif

// Asks for a whole row to be brought into cache ahead of use. The grouped and gathered loops jump between rows
// of a matrix far larger than L2, and one row is too short for the hardware prefetcher to ramp up on its own.
template <typename scalar_t>
inline void prefetch_row(const scalar_t* row, int64_t d) {
  const char* p = reinterpret_cast<const char*>(row);
  const int64_t bytes = d * static_cast<int64_t>(sizeof(scalar_t));
  for (int64_t off = 0; off < bytes; off += 64) __builtin_prefetch(p + off, 0, 3);
}

// a[0..d) += coef * row[0..d)
template <typename acc_t, typename scalar_t>
inline void axpy(acc_t* a, acc_t coef, const scalar_t* row, int64_t d) {
  int64_t c = 0;
#if defined(MI_CROW_AVX512)
  if constexpr (std::is_same_v<acc_t, float> && has_vec16<scalar_t>) {
    const __m512 vc = _mm512_set1_ps(coef);
    for (; c + 16 <= d; c += 16) {
      _mm512_storeu_ps(a + c, _mm512_fmadd_ps(vc, load16(row + c), _mm512_loadu_ps(a + c)));
    }
  }
#endif
  for (; c < d; ++c) a[c] += coef * static_cast<acc_t>(row[c]);
}

// sum_c g[c] * row[c]
template <typename acc_t, typename scalar_t>
inline acc_t dot(const acc_t* g, const scalar_t* row, int64_t d) {
  int64_t c = 0;
  acc_t s = 0;
#if defined(MI_CROW_AVX512)
  if constexpr (std::is_same_v<acc_t, float> && has_vec16<scalar_t>) {
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    for (; c + 32 <= d; c += 32) {
      s0 = _mm512_fmadd_ps(_mm512_loadu_ps(g + c), load16(row + c), s0);
      s1 = _mm512_fmadd_ps(_mm512_loadu_ps(g + c + 16), load16(row + c + 16), s1);
    }
    for (; c + 16 <= d; c += 16) s0 = _mm512_fmadd_ps(_mm512_loadu_ps(g + c), load16(row + c), s0);
    s = _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
  }
#endif
  for (; c < d; ++c) s += g[c] * static_cast<acc_t>(row[c]);
  return s;
}

// Both backward products of a decoder row w for R gradient rows in one pass: a[0..d) += coef[0] * g[0][0..d), then
// += coef[1] * g[1][0..d), ... (a gets the same roundings per element as from R passes of one row in that order),
// and s[r] = <g[r], w> (two partial sums, so s[r] does not depend on R or r). The accumulator is loaded and stored once
// for all R rows, and R independent row streams are in flight at once, which is what a pass bound by reading
// scattered gradient rows needs.
template <int R, typename acc_t>
inline void dot_axpy_rows(acc_t* a, const acc_t* coef, const acc_t* const* g, const acc_t* w, int64_t d, acc_t* s) {
  int64_t c = 0;
  for (int r = 0; r < R; ++r) s[r] = 0;
#if defined(MI_CROW_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    __m512 vc[R], p0[R], p1[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      vc[r] = _mm512_set1_ps(coef[r]);
      p0[r] = _mm512_setzero_ps();
      p1[r] = _mm512_setzero_ps();
    }
    for (; c + 32 <= d; c += 32) {
      const __m512 w0 = _mm512_loadu_ps(w + c), w1 = _mm512_loadu_ps(w + c + 16);
      __m512 a0 = _mm512_loadu_ps(a + c), a1 = _mm512_loadu_ps(a + c + 16);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 x0 = _mm512_loadu_ps(g[r] + c), x1 = _mm512_loadu_ps(g[r] + c + 16);
        p0[r] = _mm512_fmadd_ps(x0, w0, p0[r]);
        p1[r] = _mm512_fmadd_ps(x1, w1, p1[r]);
        a0 = _mm512_fmadd_ps(vc[r], x0, a0);
        a1 = _mm512_fmadd_ps(vc[r], x1, a1);
      }
      _mm512_storeu_ps(a + c, a0);
      _mm512_storeu_ps(a + c + 16, a1);
    }
    for (; c + 16 <= d; c += 16) {
      const __m512 w0 = _mm512_loadu_ps(w + c);
      __m512 a0 = _mm512_loadu_ps(a + c);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        const __m512 x0 = _mm512_loadu_ps(g[r] + c);
        p0[r] = _mm512_fmadd_ps(x0, w0, p0[r]);
        a0 = _mm512_fmadd_ps(vc[r], x0, a0);
      }
      _mm512_storeu_ps(a + c, a0);
    }
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) s[r] = _mm512_reduce_add_ps(_mm512_add_ps(p0[r], p1[r]));
  }
#endif
  for (; c < d; ++c) {
    for (int r = 0; r < R; ++r) {
      s[r] += g[r][c] * w[c];
      a[c] += coef[r] * g[r][c];
    }
  }
}

// a[0..d) += coef[0] * x[0][0..d), then += coef[1] * x[1][0..d), ... in that order (each element gets the same
// roundings as from R axpy calls), loading and storing the accumulator once for all R rows and keeping R
// independent row streams in flight: a pass bound by reading scattered rows needs that parallelism.
template <int R, typename acc_t>
inline void axpy_rows(acc_t* a, const acc_t* coef, const acc_t* const* x, int64_t d) {
  int64_t c = 0;
#if defined(MI_CROW_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    __m512 vc[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) vc[r] = _mm512_set1_ps(coef[r]);
    for (; c + 32 <= d; c += 32) {
      __m512 a0 = _mm512_loadu_ps(a + c), a1 = _mm512_loadu_ps(a + c + 16);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) {
        a0 = _mm512_fmadd_ps(vc[r], _mm512_loadu_ps(x[r] + c), a0);
        a1 = _mm512_fmadd_ps(vc[r], _mm512_loadu_ps(x[r] + c + 16), a1);
      }
      _mm512_storeu_ps(a + c, a0);
      _mm512_storeu_ps(a + c + 16, a1);
    }
    for (; c + 16 <= d; c += 16) {
      __m512 a0 = _mm512_loadu_ps(a + c);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) a0 = _mm512_fmadd_ps(vc[r], _mm512_loadu_ps(x[r] + c), a0);
      _mm512_storeu_ps(a + c, a0);
    }
  }
#endif
  for (; c < d; ++c) {
    for (int r = 0; r < R; ++r) a[c] += coef[r] * x[r][c];
  }
}

// dst[0..len) = float(src[0..len))
template <typename scalar_t, typename acc_t>
inline void widen(const scalar_t* src, acc_t* dst, int64_t len) {
  int64_t c = 0;
#if defined(MI_CROW_AVX512)
  if constexpr (std::is_same_v<acc_t, float> && has_vec16<scalar_t> && !std::is_same_v<scalar_t, float>) {
    for (; c + 16 <= len; c += 16) _mm512_storeu_ps(dst + c, load16(src + c));
  }
#endif
  for (; c < len; ++c) dst[c] = static_cast<acc_t>(src[c]);
}

}  // namespace MI_CROW_ISA
}  // namespace mi_crow
