// Helpers shared by the CPU kernels in this folder: a vectorizable exp, row
// loads to float32, one float32 vector type for AVX-512 or AVX2, and the
// storage-dtype dispatch. Arithmetic is float32 whatever the storage dtype
// (float32, bfloat16 or float16).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace pagedinfer_cpu {

// expf with Cephes' range reduction and degree-6 polynomial, branch-free so
// `omp simd` loops vectorize it (libm's expf would not); relative error ~2e-7
// on [-87, 88], the input clamped to that range (exp(-87) ~ 1.6e-38).
inline float fast_exp(float x) {
  x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - k * 0.693359375f + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

template <typename T>
inline void load_row(const T* src, float* dst, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// One float32 vector register, `kLanes` wide, and the few operations the
// kernels need, for AVX-512 (16 lanes) or AVX2 with FMA (8 lanes): the kernels
// are written once against these and gcc leaves their loops scalar otherwise
// (reductions and exp in nested loops). PAGEDINFER_VEC is defined where one of
// the two exists; without it the kernels run their plain loops.
#if defined(__AVX512F__)
#define PAGEDINFER_VEC 1
using vfloat = __m512;
constexpr int64_t kLanes = 16;
inline vfloat vzero() { return _mm512_setzero_ps(); }
inline vfloat vset(float x) { return _mm512_set1_ps(x); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm512_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm512_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm512_mul_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm512_div_ps(a, b); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm512_max_ps(a, b); }
inline vfloat vmin(vfloat a, vfloat b) { return _mm512_min_ps(a, b); }
inline vfloat vfmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fmadd_ps(a, b, c); }
inline vfloat vfnmadd(vfloat a, vfloat b, vfloat c) { return _mm512_fnmadd_ps(a, b, c); }
inline vfloat vfloor(vfloat x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
// 2^k for integral k in the float exponent range.
inline vfloat vexp2_int(vfloat k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(k), _mm512_set1_epi32(127)), 23));
}
inline float vreduce_add(vfloat v) { return _mm512_reduce_add_ps(v); }
inline float vreduce_max(vfloat v) { return _mm512_reduce_max_ps(v); }
inline vfloat vload(const float* p) { return _mm512_loadu_ps(p); }
inline vfloat vload(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline vfloat vload(const c10::Half* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline void vstore(float* p, vfloat v) { _mm512_storeu_ps(p, v); }
// The first min(n, kLanes) lanes: loaded (the others set to `fill`) or stored.
inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }
inline vfloat vload_first(const float* p, int64_t n, float fill) {
  return _mm512_mask_loadu_ps(_mm512_set1_ps(fill), first_lanes(n), p);
}
inline void vstore_first(float* p, vfloat v, int64_t n) { _mm512_mask_storeu_ps(p, first_lanes(n), v); }
inline vfloat vkeep_first(vfloat v, int64_t n) { return _mm512_maskz_mov_ps(first_lanes(n), v); }  // others 0

// [sum(v[0]), ..., sum(v[15])]: three levels of pairwise shuffles and adds.
inline vfloat vsum_each(const vfloat v[kLanes]) {
  __m512 w[8], x[4];
  for (int i = 0; i < 8; ++i) {  // each 128-bit lane: partial sums of two vectors
    w[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // each lane: one partial sum for each of four vectors
    const __m512d a = _mm512_castps_pd(w[2 * i]), b = _mm512_castps_pd(w[2 * i + 1]);
    x[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
  }
  const __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x[0], x[1], _MM_SHUFFLE(3, 1, 3, 1)));
  const __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(2, 0, 2, 0)),
                                  _mm512_shuffle_f32x4(x[2], x[3], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(y0, y1, _MM_SHUFFLE(3, 1, 3, 1)));
}
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define PAGEDINFER_VEC 1
using vfloat = __m256;
constexpr int64_t kLanes = 8;
inline vfloat vzero() { return _mm256_setzero_ps(); }
inline vfloat vset(float x) { return _mm256_set1_ps(x); }
inline vfloat vadd(vfloat a, vfloat b) { return _mm256_add_ps(a, b); }
inline vfloat vsub(vfloat a, vfloat b) { return _mm256_sub_ps(a, b); }
inline vfloat vmul(vfloat a, vfloat b) { return _mm256_mul_ps(a, b); }
inline vfloat vdiv(vfloat a, vfloat b) { return _mm256_div_ps(a, b); }
inline vfloat vmax(vfloat a, vfloat b) { return _mm256_max_ps(a, b); }
inline vfloat vmin(vfloat a, vfloat b) { return _mm256_min_ps(a, b); }
inline vfloat vfmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fmadd_ps(a, b, c); }
inline vfloat vfnmadd(vfloat a, vfloat b, vfloat c) { return _mm256_fnmadd_ps(a, b, c); }
inline vfloat vfloor(vfloat x) { return _mm256_round_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC); }
inline vfloat vexp2_int(vfloat k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23));
}
inline float vreduce_add(vfloat v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
inline float vreduce_max(vfloat v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
inline vfloat vload(const float* p) { return _mm256_loadu_ps(p); }
inline vfloat vload(const c10::BFloat16* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}
inline vfloat vload(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void vstore(float* p, vfloat v) { _mm256_storeu_ps(p, v); }
inline __m256i first_lanes(int64_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int32_t>(std::min<int64_t>(n, 8))),
                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline vfloat vload_first(const float* p, int64_t n, float fill) {
  const __m256i mask = first_lanes(n);
  return _mm256_blendv_ps(_mm256_set1_ps(fill), _mm256_maskload_ps(p, mask), _mm256_castsi256_ps(mask));
}
inline void vstore_first(float* p, vfloat v, int64_t n) { _mm256_maskstore_ps(p, first_lanes(n), v); }
inline vfloat vkeep_first(vfloat v, int64_t n) { return _mm256_and_ps(v, _mm256_castsi256_ps(first_lanes(n))); }

// [sum(v[0]), ..., sum(v[7])]: two levels of horizontal adds within each
// 128-bit half, then the two halves added.
inline vfloat vsum_each(const vfloat v[kLanes]) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
#endif

#if defined(PAGEDINFER_VEC)
// fast_exp on kLanes lanes, the same steps: gcc leaves the scalar one
// unvectorized inside the attention's loops.
inline vfloat vexp(vfloat x) {
  x = vmax(vmin(x, vset(88.0f)), vset(-87.0f));
  const vfloat k = vfloor(vfmadd(x, vset(1.44269504088896341f), vset(0.5f)));
  vfloat r = vfnmadd(k, vset(0.693359375f), x);
  r = vfmadd(k, vset(2.12194440e-4f), r);
  vfloat p = vset(1.9875691500e-4f);
  p = vfmadd(p, r, vset(1.3981999507e-3f));
  p = vfmadd(p, r, vset(8.3334519073e-3f));
  p = vfmadd(p, r, vset(4.1665795894e-2f));
  p = vfmadd(p, r, vset(1.6666665459e-1f));
  p = vfmadd(p, r, vset(5.0000001201e-1f));
  p = vadd(vfmadd(p, vmul(r, r), r), vset(1.0f));
  return vmul(p, vexp2_int(k));
}
#endif

// Argument checks: every op checks what its loops assume (ranks, shapes,
// dtypes, a dense last dim) before it reads a pointer, so a wrong argument
// raises (a RuntimeError in Python, also under `python -O`) instead of reading
// past a tensor, whether the op is called through kernels/cpu_ops.py or
// torch.ops.pagedinfer_cpu directly. The checks cost nanoseconds a call.
inline bool is_float(const at::Tensor& t) {
  const at::ScalarType dtype = t.scalar_type();
  return dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf;
}

// The kernels address the last dim as `base + i`, without a stride.
inline bool dense_last_dim(const at::Tensor& t) { return t.dim() == 0 || t.size(-1) <= 1 || t.stride(-1) == 1; }

// `t` is exactly `sizes` of `dtype`, with a dense last dim (outputs, and operands read alongside another).
inline void check_layout(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef sizes,
                         at::ScalarType dtype) {
  TORCH_CHECK(t.sizes() == sizes && t.scalar_type() == dtype && dense_last_dim(t), op, ": ", name, " must be ", dtype,
              " ", sizes, " with a contiguous last dim, got ", t.scalar_type(), " ", t.sizes(), " with strides ",
              t.strides());
}

inline void check_float_rows(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(is_float(t), op, ": ", name, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  TORCH_CHECK(dense_last_dim(t), op, ": ", name, " must be contiguous in its last dim, got strides ", t.strides());
}

// A 1-D index tensor of `dtype`, read densely.
inline void check_index(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.dim() == 1 && t.scalar_type() == dtype && dense_last_dim(t), op, ": ", name,
              " must be a contiguous 1-D ", dtype, " tensor, got ", t.sizes(), " ", t.scalar_type(), " with strides ",
              t.strides());
}

#define DISPATCH_FLOATS(dtype, name, ...)                                  \
  switch (dtype) {                                                         \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }     \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; } \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }  \
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);      \
  }

}  // namespace pagedinfer_cpu
