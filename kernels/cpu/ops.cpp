// CPU kernels of the engine: the per-layer norm, rotary and SiLU-mul chains as
// one op each, and the registration of every op in this folder (paged
// attention and the KV store are in attention.cpp, shared helpers in common.h).
//
// Layout and semantics are those of `kernels/__init__.py`; `kernels/reference.py`
// is the oracle the tests compare against. Invariants:
// - Every op reads its inputs through their strides; only the last dim must be
//   contiguous. Each op checks its arguments itself (common.h's checks), so a
//   call through torch.ops is as safe as one through `kernels/cpu_ops.py`.
// - Arithmetic is float32 whatever the storage dtype; results are rounded to the
//   storage dtype where transformers rounds (after the norm, before the weight
//   multiply; after SiLU, before the up multiply), so bfloat16 stays close to it.
// - Positions are checked before they become addresses: a bad one raises.
// - Work is split with at::parallel_for over rows, so the torch thread count
//   (`torch.set_num_threads`) governs every op here too.

#include <torch/library.h>

#include <type_traits>
#include <vector>

#include "common.h"

namespace pagedinfer_cpu {
namespace {

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
      int64_t i = 0;
#if defined(PAGEDINFER_VEC)
      // A vector at a time with vexp (gcc leaves the loop below scalar):
      // SiLU in float32, then rounded to T before the up multiply.
      for (; i + kLanes <= d; i += kLanes) {
        const vfloat g = vload(gate + i);
        const vfloat silu = vdiv(g, vadd(vset(1.0f), vexp(vsub(vzero(), g))));
        if constexpr (std::is_same_v<T, float>) {
          vstore(o + i, vmul(silu, vload(up + i)));
        } else {
          alignas(64) float lanes[kLanes];
          vstore(lanes, silu);
          for (int64_t k = 0; k < kLanes; ++k) {
            o[i + k] = static_cast<T>(static_cast<float>(static_cast<T>(lanes[k])) * static_cast<float>(up[i + k]));
          }
        }
      }
#endif
      for (; i < d; ++i) {
        const float g = static_cast<float>(gate[i]);
        const T silu = static_cast<T>(g / (1.0f + fast_exp(-g)));
        o[i] = static_cast<T>(static_cast<float>(silu) * static_cast<float>(up[i]));
      }
    }
  });
}

// x: [rows, hidden] or [tokens, heads, head_dim]; weight: a dense [hidden] in x's dtype.
void check_norm(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 2 || x.dim() == 3, op, ": x must be [rows, hidden] or [tokens, heads, head_dim], got ",
              x.sizes());
  check_float_rows(op, "x", x);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.scalar_type() == x.scalar_type() &&
                  dense_last_dim(weight),
              op, ": weight must be a contiguous [", x.size(-1), "] in x's dtype ", x.scalar_type(), ", got ",
              weight.sizes(), " ", weight.scalar_type(), " with strides ", weight.strides());
}

void rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, at::Tensor out) {
  check_norm("rms_norm", x, weight);
  check_layout("rms_norm", "out", out, x.sizes(), x.scalar_type());
  DISPATCH_FLOATS(x.scalar_type(), "rms_norm", [&] { rms_norm_kernel<scalar_t>(x, nullptr, nullptr, weight, eps, out); });
}

void fused_add_rms_norm(const at::Tensor& x, const at::Tensor& residual, const at::Tensor& weight, double eps,
                        at::Tensor out, at::Tensor residual_out) {
  check_norm("fused_add_rms_norm", x, weight);
  check_layout("fused_add_rms_norm", "residual", residual, x.sizes(), x.scalar_type());
  check_layout("fused_add_rms_norm", "out", out, x.sizes(), x.scalar_type());
  check_layout("fused_add_rms_norm", "residual_out", residual_out, x.sizes(), x.scalar_type());
  DISPATCH_FLOATS(x.scalar_type(), "fused_add_rms_norm",
                  [&] { rms_norm_kernel<scalar_t>(x, &residual, &residual_out, weight, eps, out); });
}

void rotary_embedding(at::Tensor query, at::Tensor key, const at::Tensor& positions, const at::Tensor& cos_sin_cache) {
  const char* op = "rotary_embedding";
  TORCH_CHECK(query.dim() == 3 && key.dim() == 3, op, ": query and key must be [tokens, heads, head_dim], got ",
              query.sizes(), " and ", key.sizes());
  check_float_rows(op, "query", query);
  check_float_rows(op, "key", key);
  TORCH_CHECK(key.scalar_type() == query.scalar_type(), op, ": key is ", key.scalar_type(), ", query ",
              query.scalar_type());
  check_index(op, "positions", positions, at::kLong);
  TORCH_CHECK(query.size(0) == positions.size(0) && key.size(0) == positions.size(0), op,
              ": one position per token: query ", query.size(0), ", key ", key.size(0), ", positions ",
              positions.size(0));
  const int64_t head_dim = query.size(2);
  TORCH_CHECK(key.size(2) == head_dim && head_dim % 2 == 0, op, ": query and key need one even head_dim, got ",
              head_dim, " and ", key.size(2));
  TORCH_CHECK(cos_sin_cache.dim() == 2 && cos_sin_cache.size(1) == head_dim &&
                  cos_sin_cache.scalar_type() == at::kFloat && dense_last_dim(cos_sin_cache),
              op, ": cos_sin_cache must be float32 [positions, ", head_dim, "] with a contiguous last dim, got ",
              cos_sin_cache.sizes(), " ", cos_sin_cache.scalar_type(), " with strides ", cos_sin_cache.strides());
  DISPATCH_FLOATS(query.scalar_type(), "rotary_embedding",
                  [&] { rotary_kernel<scalar_t>(query, key, positions, cos_sin_cache); });
}

void silu_and_mul(const at::Tensor& x, at::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) % 2 == 0, "silu_and_mul: x must be [tokens, 2 * intermediate], got ",
              x.sizes());
  check_float_rows("silu_and_mul", "x", x);
  check_layout("silu_and_mul", "out", out, {x.size(0), x.size(1) / 2}, x.scalar_type());
  DISPATCH_FLOATS(x.scalar_type(), "silu_and_mul", [&] { silu_and_mul_kernel<scalar_t>(x, out); });
}

}  // namespace
}  // namespace pagedinfer_cpu

// The schemas of every op in this folder; each file registers its own kernels.
TORCH_LIBRARY(pagedinfer_cpu, m) {
  m.def("paged_attention(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, Tensor seq_lens, "
        "Tensor query_start_loc, int max_seq_len, float scale, int max_rows_query_len, Tensor(a!) out) -> ()");
  m.def("store_kv(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slot_mapping) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, Tensor(a!) out) -> ()");
  m.def("fused_add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps, Tensor(a!) out, "
        "Tensor(b!) residual_out) -> ()");
  m.def("rotary_embedding(Tensor(a!) query, Tensor(b!) key, Tensor positions, Tensor cos_sin_cache) -> ()");
  m.def("silu_and_mul(Tensor x, Tensor(a!) out) -> ()");
  m.def("pack_linear_weight(Tensor weight) -> Tensor");
  m.def("linear(Tensor x, Tensor packed, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("pack_linear_weight_bf16(Tensor weight) -> Tensor");
  m.def("linear_bf16(Tensor x, Tensor packed, Tensor? bias, Tensor(a!) out) -> ()");
  m.def("lora_linear(Tensor x, Tensor packed, Tensor? bias, Tensor packed_a, Tensor[] packed_b, int[] part_rows, "
        "Tensor token_slots, int rank, Tensor(a!) out, Tensor(b!) y) -> ()");
}

TORCH_LIBRARY_IMPL(pagedinfer_cpu, CPU, m) {
  m.impl("rms_norm", &pagedinfer_cpu::rms_norm);
  m.impl("fused_add_rms_norm", &pagedinfer_cpu::fused_add_rms_norm);
  m.impl("rotary_embedding", &pagedinfer_cpu::rotary_embedding);
  m.impl("silu_and_mul", &pagedinfer_cpu::silu_and_mul);
}
