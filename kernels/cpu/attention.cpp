// Paged attention on the CPU, reading K/V through the block table (no
// per-step gather of the context), and the KV store.
//
// Layout and semantics are those of `kernels/__init__.py`; `kernels/reference.py`
// is the oracle the tests compare against. Invariants:
// - Inputs are read through their strides; only the last dim must be
//   contiguous. Shapes, dtypes and strides are checked here (common.h's
//   checks), whichever way the op is called.
// - Arithmetic is float32 whatever the storage dtype; the output is rounded once.
// - Attention reads K/V rows of positions < seq_len only, through block ids of
//   `block_tables` (never a -1 entry), and writes only the output rows of the
//   requests it handles: those with a query length <= `max_rows_query_len`.
// - Lengths, block ids and slots are checked before they become addresses: a
//   bad one raises instead of reading another request's memory.
// - Work is split with at::parallel_for over runs of (request, token, KV heads)
//   of about equal cost, so the torch thread count governs it.
//
// Decode attention is bound by reading the cache, so the inner loops must keep
// up with memory: each block's rows of a KV head are read once per pass and
// used for all the query heads sharing it, the scores of one vector's width of
// rows are reduced together (one vector of sums instead of a horizontal sum
// per row), and the output accumulators stay in registers across a block's
// rows. The loops are written once against common.h's vector type (AVX-512 or
// AVX2). (Software prefetch of the next blocks measured no faster: the loads
// are bound by the memory bandwidth, not by finding the scattered blocks.)

#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "common.h"

namespace pagedinfer_cpu {
namespace {

// Rows of K scored together: one vector of sums per chunk.
#if defined(PAGEDINFER_VEC)
constexpr int64_t kRowsPerChunk = kLanes;
#else
constexpr int64_t kRowsPerChunk = 16;
#endif

// scores[g * score_stride + i] = q[g] . k[i] for `rows` <= kRowsPerChunk rows
// of one KV head and its `group` query heads (q already scaled, float32).
template <typename T>
inline void score_rows(const float* __restrict__ q, int64_t group, const T* __restrict__ k, int64_t row_stride,
                       int64_t rows, int64_t head_dim, float* __restrict__ scores, int64_t score_stride) {
#if defined(PAGEDINFER_VEC)
  if (head_dim % kLanes == 0) {
    for (int64_t g = 0; g < group; ++g) {
      const float* qg = q + g * head_dim;
      vfloat parts[kRowsPerChunk];
      for (int64_t i = 0; i < kRowsPerChunk; ++i) {
        vfloat acc = vzero();
        if (i < rows) {
          for (int64_t d = 0; d < head_dim; d += kLanes) acc = vfmadd(vload(qg + d), vload(k + i * row_stride + d), acc);
        }
        parts[i] = acc;
      }
      vstore_first(scores + g * score_stride, vsum_each(parts), rows);
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i = 0; i < rows; ++i) {
      float sum = 0.0f;
      for (int64_t d = 0; d < head_dim; ++d) sum += q[g * head_dim + d] * static_cast<float>(k[i * row_stride + d]);
      scores[g * score_stride + i] = sum;
    }
  }
}

// acc[g] += sum_i weights[g * weight_stride + i] * v[i] over `rows` rows of one
// KV head, for its `group` query heads.
template <typename T, int64_t HD>
inline void accumulate_rows(const float* __restrict__ weights, int64_t weight_stride, int64_t group,
                            const T* __restrict__ v, int64_t row_stride, int64_t rows, int64_t head_dim,
                            float* __restrict__ acc) {
#if defined(PAGEDINFER_VEC)
  // A head's accumulators stay in registers across the rows, at most 8 vectors
  // at a time (of the 16 or 32 registers): a wider head takes its slices of
  // 8 in turn, re-reading the block's rows from L1.
  constexpr int64_t kVecs = HD / kLanes, kSlice = kVecs >= 8 ? 8 : (kVecs > 0 ? kVecs : 1);
  if constexpr (HD > 0 && HD % kLanes == 0 && kVecs % kSlice == 0) {
    for (int64_t g = 0; g < group; ++g) {
      for (int64_t first = 0; first < kVecs; first += kSlice) {
        vfloat a[kSlice];
        float* ag = acc + g * HD + first * kLanes;
        const T* vg = v + first * kLanes;
        for (int64_t d = 0; d < kSlice; ++d) a[d] = vload(ag + kLanes * d);
        for (int64_t i = 0; i < rows; ++i) {
          const vfloat w = vset(weights[g * weight_stride + i]);
          for (int64_t d = 0; d < kSlice; ++d) a[d] = vfmadd(w, vload(vg + i * row_stride + kLanes * d), a[d]);
        }
        for (int64_t d = 0; d < kSlice; ++d) vstore(ag + kLanes * d, a[d]);
      }
    }
    return;
  }
#endif
  for (int64_t g = 0; g < group; ++g) {
    for (int64_t i = 0; i < rows; ++i) {
      const float w = weights[g * weight_stride + i];
#pragma omp simd
      for (int64_t d = 0; d < head_dim; ++d) acc[g * head_dim + d] += w * static_cast<float>(v[i * row_stride + d]);
    }
  }
}

// s[t] = exp(s[t] - max(s)) for t < n; returns their sum.
inline float exp_minus_max(float* __restrict__ s, int64_t n) {
#if defined(PAGEDINFER_VEC)
  vfloat top = vset(-INFINITY);
  for (int64_t t = 0; t < n; t += kLanes) top = vmax(top, vload_first(s + t, n - t, -INFINITY));
  const vfloat m = vset(vreduce_max(top));
  vfloat sum = vzero();
  for (int64_t t = 0; t < n; t += kLanes) {
    const vfloat e = vexp(vsub(vload_first(s + t, n - t, 0.0f), m));
    vstore_first(s + t, e, n - t);
    sum = vadd(sum, vkeep_first(e, n - t));
  }
  return vreduce_add(sum);
#else
  float m = -INFINITY;
  for (int64_t t = 0; t < n; ++t) m = s[t] > m ? s[t] : m;
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = fast_exp(s[t] - m);
    sum += s[t];
  }
  return sum;
#endif
}

// One (request, query token, KV heads) at a time: the query token at absolute
// position `pos` sees keys 0..pos. Two passes over the cached rows, block by
// block: K rows give the scores of every query head, then (after a softmax
// per head) V rows are summed with those weights. HD > 0 fixes head_dim at
// compile time, so the row loops unroll into whole vector registers; HD == 0
// serves any other head_dim.
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
  TORCH_CHECK(starts[0] >= 0, "paged_attention: query_start_loc starts at ", starts[0]);
  for (int64_t r = 0; r < num_reqs; ++r) {
    TORCH_CHECK(starts[r] <= starts[r + 1] && starts[r + 1] <= query.size(0), "paged_attention: query_start_loc[",
                r + 1, "] = ", starts[r + 1], " is not in [", starts[r], ", ", query.size(0), " query rows]");
  }
  const int64_t q_tok = query.stride(0), q_head = query.stride(1);
  const int64_t o_tok = out.stride(0), o_head = out.stride(1);
  const int64_t k_blk = key_cache.stride(0), k_row = key_cache.stride(1), k_head = key_cache.stride(2);
  const int64_t v_blk = value_cache.stride(0), v_row = value_cache.stride(1), v_head = value_cache.stride(2);
  const float fscale = static_cast<float>(scale);

  // Work items: (request, query token, chunk of KV heads), flattened through
  // a prefix sum over the requests' query lengths. A chunk holds every KV
  // head when there are enough tokens to share out among the threads (a
  // block's K or V rows are then read as one contiguous run), else one.
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
  // must raise, not read another request's memory (query_start_loc is checked
  // before the sums above).
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

  // Each thread takes a contiguous run of items of about equal cost (keys
  // read), not of equal count: contexts in a batch differ several-fold, and
  // an even split by count left one thread idle for much of the call.
  // Keys query token j of request r sees: positions 0..its own.
  auto num_keys_of = [&](int64_t r, int64_t j) -> int64_t { return lens[r] - (starts[r + 1] - starts[r]) + j + 1; };
  std::vector<int64_t> cost_end(num_items + 1, 0);
  for (int64_t r = 0, item = 0; r < num_reqs; ++r) {
    for (int64_t local = 0; local < item_start[r + 1] - item_start[r]; ++local, ++item) {
      cost_end[item + 1] = cost_end[item] + num_keys_of(r, local / chunks) + kRowsPerChunk;  // keys + fixed cost
    }
  }
  const int64_t num_parts = std::min<int64_t>(at::get_num_threads(), num_items);
  auto part_start = [&](int64_t part) {
    const int64_t target = cost_end[num_items] * part / num_parts;
    return std::lower_bound(cost_end.begin(), cost_end.end(), target) - cost_end.begin();
  };

  const int64_t heads = heads_per_item * group;  // query heads per item
  const int64_t runtime_head_dim = head_dim;
  at::parallel_for(0, num_parts, 1, [&](int64_t first_part, int64_t end_part) {
    const int64_t begin = part_start(first_part), end = part_start(end_part);
    // A compile-time constant inside the loops when HD > 0 (a captured
    // variable is a load, and the vector loops would keep their remainders).
    constexpr int64_t kHeadDim = HD;
    const int64_t head_dim = kHeadDim > 0 ? kHeadDim : runtime_head_dim;
    const int64_t score_stride = max_seq_len;  // scores of query head h start at h * score_stride
    std::vector<float> q_buf(heads * head_dim), acc_buf(heads * head_dim), inv_sum(heads);
    std::vector<float> score_buf(heads * score_stride);
    float* __restrict__ q = q_buf.data();
    float* __restrict__ acc = acc_buf.data();
    float* __restrict__ scores = score_buf.data();
    int64_t r = 0;
    for (int64_t item = begin; item < end; ++item) {
      while (item_start[r + 1] <= item) ++r;
      const int64_t local = item - item_start[r];
      const int64_t first_kv_head = (local % chunks) * heads_per_item, j = local / chunks;
      const int64_t first_head = first_kv_head * group;
      const int64_t token = starts[r] + j;
      const int64_t num_keys = num_keys_of(r, j);
      const int32_t* table = tables + r * table_stride;
      for (int64_t h = 0; h < heads; ++h) {
        const T* src = q_base + token * q_tok + (first_head + h) * q_head;
#pragma omp simd
        for (int64_t d = 0; d < head_dim; ++d) q[h * head_dim + d] = static_cast<float>(src[d]) * fscale;
      }
      // Pass 1: the scores of each KV head's query heads, a block at a time.
      for (int64_t first = 0, b = 0; first < num_keys; first += block_size, ++b) {
        const int64_t rows = std::min(block_size, num_keys - first);
        const T* block = k_base + table[b] * k_blk + first_kv_head * k_head;
        for (int64_t kv = 0; kv < heads_per_item; ++kv) {
          for (int64_t i = 0; i < rows; i += kRowsPerChunk) {
            score_rows<T>(q + kv * group * head_dim, group, block + kv * k_head + i * k_row, k_row,
                          std::min(kRowsPerChunk, rows - i), head_dim, scores + kv * group * score_stride + first + i,
                          score_stride);
          }
        }
      }
      for (int64_t h = 0; h < heads; ++h) inv_sum[h] = 1.0f / exp_minus_max(scores + h * score_stride, num_keys);
      // Pass 2: V rows weighted by the softmax, a block at a time.
      std::fill(acc, acc + heads * head_dim, 0.0f);
      for (int64_t first = 0, b = 0; first < num_keys; first += block_size, ++b) {
        const int64_t rows = std::min(block_size, num_keys - first);
        const T* block = v_base + table[b] * v_blk + first_kv_head * v_head;
        for (int64_t kv = 0; kv < heads_per_item; ++kv) {
          accumulate_rows<T, kHeadDim>(scores + kv * group * score_stride + first, score_stride, group,
                                       block + kv * v_head, v_row, rows, head_dim, acc + kv * group * head_dim);
        }
      }
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

void paged_attention(const at::Tensor& query, const at::Tensor& key_cache, const at::Tensor& value_cache,
                     const at::Tensor& block_tables, const at::Tensor& seq_lens, const at::Tensor& query_start_loc,
                     int64_t max_seq_len, double scale, int64_t max_rows_query_len, at::Tensor out) {
  const char* op = "paged_attention";
  TORCH_CHECK(query.dim() == 3, op, ": query must be [tokens, heads, head_dim], got ", query.sizes());
  check_float_rows(op, "query", query);
  check_layout(op, "out", out, query.sizes(), query.scalar_type());
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(1) > 0, op,
              ": key_cache must be [blocks, block_size > 0, kv_heads, head_dim], got ", key_cache.sizes());
  check_float_rows(op, "key_cache", key_cache);
  TORCH_CHECK(key_cache.scalar_type() == query.scalar_type(), op, ": key_cache is ", key_cache.scalar_type(),
              ", query ", query.scalar_type());
  check_layout(op, "value_cache", value_cache, key_cache.sizes(), key_cache.scalar_type());
  TORCH_CHECK(key_cache.size(3) == query.size(2), op, ": the caches' head_dim ", key_cache.size(3), " != query's ",
              query.size(2));
  TORCH_CHECK(key_cache.size(2) > 0 && query.size(1) % key_cache.size(2) == 0, op, ": ", query.size(1),
              " query heads do not split into ", key_cache.size(2), " KV heads");
  check_index(op, "seq_lens", seq_lens, at::kInt);
  check_index(op, "query_start_loc", query_start_loc, at::kInt);
  const int64_t num_reqs = seq_lens.size(0);
  TORCH_CHECK(query_start_loc.size(0) == num_reqs + 1, op, ": query_start_loc needs ", num_reqs + 1,
              " entries (one more than seq_lens), got ", query_start_loc.size(0));
  TORCH_CHECK(block_tables.dim() == 2 && block_tables.size(0) == num_reqs && block_tables.scalar_type() == at::kInt &&
                  dense_last_dim(block_tables),
              op, ": block_tables must be int32 [", num_reqs, " requests, max_blocks] with a contiguous last dim, got ",
              block_tables.sizes(), " ", block_tables.scalar_type(), " with strides ", block_tables.strides());
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
  const char* op = "store_kv";
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.size(1) > 0, op,
              ": key_cache must be [blocks, block_size > 0, kv_heads, head_dim], got ", key_cache.sizes());
  check_float_rows(op, "key_cache", key_cache);
  check_layout(op, "value_cache", value_cache, key_cache.sizes(), key_cache.scalar_type());
  check_index(op, "slot_mapping", slot_mapping, at::kLong);
  // One [kv_heads, head_dim] row of key and of value per slot, in the caches' dtype.
  const int64_t rows[] = {slot_mapping.size(0), key_cache.size(2), key_cache.size(3)};
  check_layout(op, "key", key, rows, key_cache.scalar_type());
  check_layout(op, "value", value, rows, key_cache.scalar_type());
  DISPATCH_FLOATS(key_cache.scalar_type(), "store_kv",
                  [&] { store_kv_kernel<scalar_t>(key, value, key_cache, value_cache, slot_mapping); });
}

}  // namespace
}  // namespace pagedinfer_cpu

TORCH_LIBRARY_IMPL(pagedinfer_cpu, CPU, m) {
  m.impl("paged_attention", &pagedinfer_cpu::paged_attention);
  m.impl("store_kv", &pagedinfer_cpu::store_kv);
}
