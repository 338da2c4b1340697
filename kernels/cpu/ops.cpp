// CPU kernels of the engine: paged attention that reads K/V through the block
// table (no per-step gather of the context), the KV store, and the per-layer
// norm, rotary and SiLU-mul chains as one op each.
//
// Layout and semantics are those of `kernels/__init__.py`; `kernels/reference.py`
// is the oracle the tests compare against. Invariants:
// - Every op reads its inputs through their strides; only the last dim must be
//   contiguous (checked by the Python wrappers in `kernels/cpu_ops.py`).
// - Arithmetic is float32 whatever the storage dtype; results are rounded to the
//   storage dtype where transformers rounds (after the norm, before the weight
//   multiply; after SiLU, before the up multiply), so bfloat16 stays close to it.
// - Attention reads K/V rows of positions < seq_len only, through block ids of
//   `block_tables` (never a -1 entry), and writes only the output rows of the
//   requests it handles: those with a query length <= `max_rows_query_len`.
// - Lengths, block ids, slots and positions are checked before they become
//   addresses: a bad one raises instead of reading another request's memory.
// - Work is split with at::parallel_for over (request, token, KV heads) or rows, so the
//   torch thread count (`torch.set_num_threads`) governs every op here too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

namespace {

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

// The attention's two row operations, float32 accumulation. With AVX-512 and
// a head_dim that is a multiple of 16 they are written with intrinsics: gcc
// leaves these loops scalar inside the kernel's loop nest (measured 5x
// slower). Elsewhere the plain loops run.
#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
inline __m512 load16(const c10::Half* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
#endif

template <typename T>
inline float dot_row(const float* __restrict__ q, const T* __restrict__ k, int64_t n) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    __m512 acc = _mm512_setzero_ps();
    for (int64_t d = 0; d < n; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16(k + d), acc);
    return _mm512_reduce_add_ps(acc);
  }
#endif
  float sum = 0.0f;
  for (int64_t d = 0; d < n; ++d) sum += q[d] * static_cast<float>(k[d]);
  return sum;
}

// a += w * v
template <typename T>
inline void axpy_row(float w, const T* __restrict__ v, float* __restrict__ a, int64_t n) {
#if defined(__AVX512F__)
  if (n % 16 == 0) {
    const __m512 wv = _mm512_set1_ps(w);
    for (int64_t d = 0; d < n; d += 16) _mm512_storeu_ps(a + d, _mm512_fmadd_ps(wv, load16(v + d), _mm512_loadu_ps(a + d)));
    return;
  }
#endif
  for (int64_t d = 0; d < n; ++d) a[d] += w * static_cast<float>(v[d]);
}

// One (request, query token, KV heads) at a time: the query token at absolute
// position `pos` sees keys 0..pos. Scores of all `group` query heads sharing
// the KV head are computed per key row, so each K and V row is read once, in
// place (no copy of the context). HD > 0 fixes head_dim at compile time, so
// the per-row loops unroll into whole vector registers; HD == 0 serves any
// other head_dim.
template <typename T, int64_t HD>
void paged_attention_kernel(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                            const at::Tensor& block_tables, const at::Tensor& seq_lens,
                            const at::Tensor& query_start_loc, int64_t max_seq_len, double scale,
                            int64_t max_rows_query_len, at::Tensor& out) {
  const int64_t num_reqs = seq_lens.size(0);
  const int64_t num_heads = query.size(1);
  const int64_t head_dim = HD > 0 ? HD : query.size(2);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int32_t* tables = block_tables.data_ptr<int32_t>();
  const int64_t table_stride = block_tables.stride(0);
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* starts = query_start_loc.data_ptr<int32_t>();
  const T* q_base = query.data_ptr<T>();
  const T* k_base = key_cache.data_ptr<T>();
  const T* v_base = value_cache.data_ptr<T>();
  T* o_base = out.data_ptr<T>();
  const int64_t q_tok = query.stride(0), q_head = query.stride(1);
  const int64_t o_tok = out.stride(0), o_head = out.stride(1);
  const int64_t k_blk = key_cache.stride(0), k_row = key_cache.stride(1), k_head = key_cache.stride(2);
  const int64_t v_blk = value_cache.stride(0), v_row = value_cache.stride(1), v_head = value_cache.stride(2);
  const float fscale = static_cast<float>(scale);

  // Work items: (request, query token, chunk of KV heads), flattened through
  // a prefix sum over the requests' query lengths. A chunk holds every KV
  // head when there are enough tokens to share out among the threads (the K
  // and V rows of a position are then read as one contiguous run), else one.
  int64_t num_tokens = 0;
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t n = starts[r + 1] - starts[r];
    num_tokens += n <= max_rows_query_len ? n : 0;
  }
  if (num_tokens == 0) return;
  const int64_t heads_per_item = num_tokens >= 4 * at::get_num_threads() ? num_kv_heads : 1;
  const int64_t chunks = num_kv_heads / heads_per_item;
  std::vector<int64_t> item_start(num_reqs + 1, 0);
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t n = starts[r + 1] - starts[r];
    item_start[r + 1] = item_start[r] + (n <= max_rows_query_len ? n * chunks : 0);
  }
  const int64_t num_items = item_start[num_reqs];
  // What the loops below index with, checked once: a bad length or block id
  // must raise, not read another request's memory.
  const int64_t num_blocks = key_cache.size(0), max_blocks = block_tables.size(1);
  for (int64_t r = 0; r < num_reqs; ++r) {
    const int64_t n = starts[r + 1] - starts[r];
    if (item_start[r + 1] == item_start[r]) continue;
    TORCH_CHECK(n <= lens[r] && lens[r] <= max_seq_len, "paged_attention: request ", r, " has seq_len ", lens[r],
                ", query length ", n, ", max_seq_len ", max_seq_len);
    const int64_t used = (lens[r] + block_size - 1) / block_size;
    TORCH_CHECK(used <= max_blocks, "paged_attention: request ", r, " needs ", used, " blocks, the table has ", max_blocks);
    for (int64_t b = 0; b < used; ++b) {
      const int32_t block = tables[r * table_stride + b];
      TORCH_CHECK(block >= 0 && block < num_blocks, "paged_attention: block id ", block, " of request ", r,
                  " is outside the cache");
    }
  }

  const int64_t heads = heads_per_item * group;  // query heads per item
  const int64_t runtime_head_dim = head_dim;
  at::parallel_for(0, num_items, 1, [&](int64_t begin, int64_t end) {
    // A compile-time constant inside the loops when HD > 0 (a captured
    // variable is a load, and the vector loops would keep their remainders).
    constexpr int64_t kHeadDim = HD;
    const int64_t head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
    std::vector<float> q_buf(heads * head_dim), acc_buf(heads * head_dim), inv_sum(heads);
    std::vector<float> score_buf(heads * max_seq_len);
    float* __restrict__ q = q_buf.data();
    float* __restrict__ acc = acc_buf.data();
    float* __restrict__ scores = score_buf.data();
    int64_t r = 0;
    for (int64_t item = begin; item < end; ++item) {
      while (item_start[r + 1] <= item) ++r;
      const int64_t local = item - item_start[r];
      const int64_t first_kv_head = (local % chunks) * heads_per_item, j = local / chunks;
      const int64_t first_head = first_kv_head * group;
      const int64_t query_len = starts[r + 1] - starts[r];
      const int64_t token = starts[r] + j;
      const int64_t num_keys = lens[r] - query_len + j + 1;  // positions 0..pos
      const int32_t* table = tables + r * table_stride;
      // fn(row, position, query head) for every cached row of this item's KV
      // heads, block by block (no division per row: a 64-bit idiv costs more
      // than the row's dot products), once per query head of the row's KV head.
      auto for_each_row = [&](const T* base, int64_t blk, int64_t row_stride, int64_t head_stride, auto&& fn) {
        for (int64_t first = 0, b = 0; first < num_keys; first += block_size, ++b) {
          const T* block = base + table[b] * blk + first_kv_head * head_stride;
          const int64_t rows = std::min(block_size, num_keys - first);
          for (int64_t i = 0; i < rows; ++i) {
            for (int64_t kv = 0, h = 0; kv < heads_per_item; ++kv) {
              const T* row = block + i * row_stride + kv * head_stride;
              for (int64_t g = 0; g < group; ++g, ++h) fn(row, first + i, h);
            }
          }
        }
      };
      for (int64_t h = 0; h < heads; ++h) {
        const T* src = q_base + token * q_tok + (first_head + h) * q_head;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) q[h * head_dim + d] = static_cast<float>(src[d]) * fscale;
      }
      // Each K row once, for the query heads of its KV head.
      for_each_row(k_base, k_blk, k_row, k_head, [&](const T* __restrict__ k, int64_t t, int64_t h) {
        scores[h * max_seq_len + t] = dot_row(q + h * head_dim, k, head_dim);
      });
      for (int64_t h = 0; h < heads; ++h) {
        float* s = scores + h * max_seq_len;
        float m = -INFINITY;
        for (int64_t t = 0; t < num_keys; ++t) m = s[t] > m ? s[t] : m;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < num_keys; ++t) {
          s[t] = fast_exp(s[t] - m);
          sum += s[t];
        }
        inv_sum[h] = 1.0f / sum;
      }
      std::fill(acc, acc + heads * head_dim, 0.0f);
      for_each_row(v_base, v_blk, v_row, v_head, [&](const T* __restrict__ v, int64_t t, int64_t h) {
        axpy_row(scores[h * max_seq_len + t], v, acc + h * head_dim, head_dim);
      });
      for (int64_t h = 0; h < heads; ++h) {
        const float inv = inv_sum[h];
        T* o = o_base + token * o_tok + (first_head + h) * o_head;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) o[d] = static_cast<T>(acc[h * head_dim + d] * inv);
      }
    }
  });
}

template <typename T>
void store_kv_kernel(const at::Tensor& key, const at::Tensor& value, at::Tensor& key_cache, at::Tensor& value_cache,
                     const at::Tensor& slot_mapping) {
  const int64_t num_tokens = slot_mapping.size(0);
  const int64_t block_size = key_cache.size(1), num_kv_heads = key_cache.size(2), head_dim = key_cache.size(3);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const T* k = key.data_ptr<T>();
  const T* v = value.data_ptr<T>();
  T* kc = key_cache.data_ptr<T>();
  T* vc = value_cache.data_ptr<T>();
  const int64_t num_slots = key_cache.size(0) * block_size;
  for (int64_t i = 0; i < num_tokens; ++i) {
    const int64_t slot = slots[i];
    if (slot < 0) continue;  // padding
    TORCH_CHECK(slot < num_slots, "store_kv: slot ", slot, " is past the cache's ", num_slots, " slots");
    const int64_t block = slot / block_size, offset = slot % block_size;
    for (int64_t h = 0; h < num_kv_heads; ++h) {
      std::memcpy(kc + block * key_cache.stride(0) + offset * key_cache.stride(1) + h * key_cache.stride(2),
                  k + i * key.stride(0) + h * key.stride(1), head_dim * sizeof(T));
      std::memcpy(vc + block * value_cache.stride(0) + offset * value_cache.stride(1) + h * value_cache.stride(2),
                  v + i * value.stride(0) + h * value.stride(1), head_dim * sizeof(T));
    }
  }
}

// Rows of `x` viewed as [num_rows, row_len] through (outer stride, inner stride)
// pairs: a [tokens, hidden] matrix or the [tokens, heads, head_dim] q/k slices.
struct Rows {
  int64_t num_inner, stride_outer, stride_inner;
  int64_t offset(int64_t row) const { return (row / num_inner) * stride_outer + (row % num_inner) * stride_inner; }
};

inline Rows rows_of(const at::Tensor& x) {
  if (x.dim() == 2) return {1, x.stride(0), 0};
  return {x.size(1), x.stride(0), x.stride(1)};
}

// out = weight * (normalise(residual_in + x) rounded to T); with `residual` set,
// residual_in + x is first rounded to T and written there.
template <typename T>
void rms_norm_kernel(const at::Tensor& x, const at::Tensor* add, at::Tensor* residual_out, const at::Tensor& weight,
                     double eps, at::Tensor& out) {
  const int64_t n = x.size(-1);
  const int64_t num_rows = x.numel() / n;
  const Rows xr = rows_of(x), orow = rows_of(out);
  const Rows ar = add ? rows_of(*add) : xr, rr = residual_out ? rows_of(*residual_out) : xr;
  const T* xp = x.data_ptr<T>();
  const T* ap = add ? add->data_ptr<T>() : nullptr;
  T* rp = residual_out ? residual_out->data_ptr<T>() : nullptr;
  const T* wp = weight.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const float feps = static_cast<float>(eps);
  at::parallel_for(0, num_rows, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> v(n), w(n);
    load_row(wp, w.data(), n);
    for (int64_t row = begin; row < end; ++row) {
      load_row(xp + xr.offset(row), v.data(), n);
      if (ap) {
        const T* a = ap + ar.offset(row);
        T* res = rp + rr.offset(row);
#pragma omp simd
        for (int64_t i = 0; i < n; ++i) {
          const T sum = static_cast<T>(v[i] + static_cast<float>(a[i]));
          res[i] = sum;
          v[i] = static_cast<float>(sum);
        }
      }
      float sumsq = 0.0f;
#pragma omp simd reduction(+ : sumsq)
      for (int64_t i = 0; i < n; ++i) sumsq += v[i] * v[i];
      const float rstd = 1.0f / std::sqrt(sumsq / static_cast<float>(n) + feps);
      T* o = op + orow.offset(row);
#pragma omp simd
      for (int64_t i = 0; i < n; ++i) o[i] = static_cast<T>(w[i] * static_cast<float>(static_cast<T>(v[i] * rstd)));
    }
  });
}

// Rotate-half in place: x = x * cos + rotate_half(x) * sin, cos/sin rounded to
// T first as transformers does; one rounding at the end.
template <typename T>
void rotary_kernel(at::Tensor& query, at::Tensor& key, const at::Tensor& positions, const at::Tensor& cos_sin_cache) {
  const int64_t num_tokens = positions.size(0), head_dim = query.size(2), half = head_dim / 2;
  const int64_t* pos = positions.data_ptr<int64_t>();
  struct Heads {
    T* base;
    int64_t num_heads, stride_token, stride_head;
  };
  const Heads q{query.data_ptr<T>(), query.size(1), query.stride(0), query.stride(1)};
  const Heads k{key.data_ptr<T>(), key.size(1), key.stride(0), key.stride(1)};
  const float* cache = cos_sin_cache.data_ptr<float>();
  const int64_t cache_stride = cos_sin_cache.stride(0), num_positions = cos_sin_cache.size(0);
  for (int64_t i = 0; i < num_tokens; ++i) {
    TORCH_CHECK(pos[i] >= 0 && pos[i] < num_positions, "rotary_embedding: position ", pos[i], " is outside [0, ",
                num_positions, ")");
  }
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    std::vector<float> c(half), s(half);
    for (int64_t i = begin; i < end; ++i) {
      const float* row = cache + pos[i] * cache_stride;
      for (int64_t d = 0; d < half; ++d) {
        c[d] = static_cast<float>(static_cast<T>(row[d]));
        s[d] = static_cast<float>(static_cast<T>(row[half + d]));
      }
      for (const Heads& t : {q, k}) {
        for (int64_t h = 0; h < t.num_heads; ++h) {
          T* x = t.base + i * t.stride_token + h * t.stride_head;
#pragma omp simd
          for (int64_t d = 0; d < half; ++d) {
            const float x1 = static_cast<float>(x[d]), x2 = static_cast<float>(x[half + d]);
            x[d] = static_cast<T>(x1 * c[d] - x2 * s[d]);
            x[half + d] = static_cast<T>(x2 * c[d] + x1 * s[d]);
          }
        }
      }
    }
  });
}

template <typename T>
void silu_and_mul_kernel(const at::Tensor& x, at::Tensor& out) {
  const int64_t num_rows = x.size(0), d = out.size(1);
  const T* xp = x.data_ptr<T>();
  T* op = out.data_ptr<T>();
  const int64_t xs = x.stride(0), os = out.stride(0);
  at::parallel_for(0, num_rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const T* gate = xp + row * xs;
      const T* up = gate + d;
      T* o = op + row * os;
#pragma omp simd
      for (int64_t i = 0; i < d; ++i) {
        const float g = static_cast<float>(gate[i]);
        const T silu = static_cast<T>(g / (1.0f + fast_exp(-g)));
        o[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[i]));
      }
    }
  });
}

#define DISPATCH_FLOATS(dtype, name, ...)                                  \
  switch (dtype) {                                                         \
    case at::kFloat: { using scalar_t = float; __VA_ARGS__(); break; }     \
    case at::kBFloat16: { using scalar_t = c10::BFloat16; __VA_ARGS__(); break; } \
    case at::kHalf: { using scalar_t = c10::Half; __VA_ARGS__(); break; }  \
    default: TORCH_CHECK(false, name, ": unsupported dtype ", dtype);      \
  }

void paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                     int64_t max_seq_len, double scale, int64_t max_rows_query_len, at::Tensor out) {
  DISPATCH_FLOATS(query.scalar_type(), "paged_attention", [&] {
    auto run = [&](auto head_dim) {
      paged_attention_kernel<scalar_t, decltype(head_dim)::value>(
          query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, max_seq_len, scale,
          max_rows_query_len, out);
    };
    // The head_dims of the models we serve, unrolled; any other runs the generic loops.
    switch (query.size(2)) {
      case 64: run(std::integral_constant<int64_t, 64>{}); break;
      case 128: run(std::integral_constant<int64_t, 128>{}); break;
      default: run(std::integral_constant<int64_t, 0>{}); break;
    }
  });
}

void store_kv(const at::Tensor& key, const at::Tensor& value, at::Tensor key_cache, at::Tensor value_cache,
              const at::Tensor& slot_mapping) {
  DISPATCH_FLOATS(key_cache.scalar_type(), "store_kv",
                  [&] { store_kv_kernel<scalar_t>(key, value, key_cache, value_cache, slot_mapping); });
}

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor out) {
  DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] { rms_norm_kernel<scalar_t>(x, nullptr, nullptr, weight, eps, out); });
}

void fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                        at::Tensor out, at::Tensor residual_out) {
  DISPATCH_FLOATS(x.scalar_type(), "fused_add_rms_norm",
                  [&] { rms_norm_kernel<scalar_t>(x, &residual, &residual_out, weight, eps, out); });
}

void rotary_embedding(at::Tensor query, at::Tensor key, const at::Tensor& positions, const at::Tensor& cos_sin_cache) {
  DISPATCH_FLOATS(query.scalar_type(), "rotary_embedding",
                  [&] { rotary_kernel<scalar_t>(query, key, positions, cos_sin_cache); });
}

void silu_and_mul(const at::Tensor& x, at::Tensor out) {
  DISPATCH_FLOATS(x.scalar_type(), "silu_and_mul", [&] { silu_and_mul_kernel<scalar_t>(x, out); });
}

}  // namespace

TORCH_LIBRARY(pagedinfer_cpu, m) {
  m.def("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, int max_seq_len, float scale, int max_rows_query_len, Tensor(a!) out) -> ()");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, Tensor(a!) out, "
        "Tensor(b!) residual_out) -> ()");
  m.def("rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor cos_sin_cache) -> ()");
  m.def("silu_and_mul(Tensor x, Tensor(a!) out) -> ()");
}

TORCH_LIBRARY_IMPL(pagedinfer_cpu, CPU, m) {
  m.impl("paged_attention", &paged_attention);
  m.impl("store_kv", &store_kv);
  m.impl("rms_norm", &rms_norm);
  m.impl("fused_add_rms_norm", &fused_add_rms_norm);
  m.impl("rotary_embedding", &rotary_embedding);
  m.impl("silu_and_mul", &silu_and_mul);
}
