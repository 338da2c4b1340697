// bfloat16 linear layers on CPUs with AVX512-BF16: out = x @ weight.T (+ bias)
// on a bf16 weight packed once, with `_mm512_dpbf16_ps` (two bf16 products
// summed into each float32 lane per instruction). The float32 kernel
// (linear.cpp) has the same role for float32 weights; this one exists because
// torch's bf16 F.linear (oneDNN) pays a fixed cost per call that a decode
// step's ~120 small products mostly are.
//
// Layout: `packed` has the float32 pack's shape, [num_panels, in_features,
// kPanel], so its checks can tell the input width; it is a view of a buffer
// with an even number of k rows (an odd in_features adds a zero row). Inside
// panel p, k runs in pairs: [num_pairs][kPanel][2], the column c's bf16 pair
// (k, k+1) in one 32-bit lane, as the instruction multiplies a broadcast
// x pair into each lane. Invariants:
// - A panel is a function of the weight alone (re-pack after it changes);
//   columns past out_features and the odd in_features' pad row are zeros.
// - Each output element is one float32 sum over k pairs in order, + bias in
//   float32, rounded once to bf16 (round to nearest even) on store.
// - x's odd in_features tail is read alone (its pair's other half is 0, not
//   the element past the row, which may be another row or not exist).
// - Columns past out_features are computed but never stored.
// - Shapes, dtypes and strides are checked on every call; a wrong one raises.
// - Work is split with at::parallel_for over panels, as in linear.cpp.
// Where the compiler does not target AVX512-BF16, the ops raise and
// has_linear_bf16() is false: Python keeps bf16 on F.linear there.

#include <torch/library.h>

#include <optional>

#include "common.h"

namespace pagedinfer_cpu {
namespace {

#if defined(__AVX512BF16__)

using bf16 = c10::BFloat16;
constexpr int64_t kPanel = 32;  // two 16-lane float32 accumulators per row
// Rows per register tile: 12 x 2 accumulators, 2 weight vectors and a
// broadcast fill 27 of AVX-512's 32 vector registers.
constexpr int64_t kTileRows = 12;

inline __mmask16 first_cols(int64_t n) { return n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1); }

// The first n (<= 16) bf16 values from p as float32, the other lanes 0.
inline __m512 load_bf16_first(const bf16* p, int64_t n) {
  const __m256i raw = _mm256_maskz_loadu_epi16(first_cols(n), p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

inline void store_bf16_first(bf16* p, __m512 v, int64_t n) {
  _mm256_mask_storeu_epi16(p, first_cols(n), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// x's elements k and k+1 in every 32-bit lane (k in the low half, as packed).
inline __m512bh broadcast_pair(const bf16* x) {
  uint32_t bits;
  std::memcpy(&bits, x, sizeof(bits));  // x need not be 4-byte aligned
  return reinterpret_cast<__m512bh>(_mm512_set1_epi32(static_cast<int32_t>(bits)));
}

// out[r, c] = for R rows and the panel's columns (the first num_cols stored).
template <int64_t R>
void tile(const bf16* x, int64_t x_stride, const bf16* panel, int64_t in_features, const bf16* bias, bf16* out,
          int64_t out_stride, int64_t num_cols) {
  __m512 acc[R][2];
  for (int64_t r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
  const int64_t num_full_pairs = in_features / 2;
  for (int64_t kp = 0; kp < num_full_pairs; ++kp) {
    const bf16* w = panel + kp * 2 * kPanel;
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + kPanel));
    for (int64_t r = 0; r < R; ++r) {
      const __m512bh a = broadcast_pair(x + r * x_stride + 2 * kp);
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
    }
  }
  if (in_features % 2) {
    const bf16* w = panel + num_full_pairs * 2 * kPanel;
    const __m512bh w0 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w));
    const __m512bh w1 = reinterpret_cast<__m512bh>(_mm512_loadu_si512(w + kPanel));
    for (int64_t r = 0; r < R; ++r) {
      const uint16_t last = x[r * x_stride + in_features - 1].x;
      const __m512bh a = reinterpret_cast<__m512bh>(_mm512_set1_epi32(last));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], a, w0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], a, w1);
    }
  }
  // The second vector exists only where the panel has more than 16 columns.
  const bool two = num_cols > 16;
  const __m512 bias0 = bias ? load_bf16_first(bias, num_cols) : _mm512_setzero_ps();
  const __m512 bias1 = bias && two ? load_bf16_first(bias + 16, num_cols - 16) : _mm512_setzero_ps();
  for (int64_t r = 0; r < R; ++r) {
    bf16* o = out + r * out_stride;
    store_bf16_first(o, _mm512_add_ps(acc[r][0], bias0), num_cols);
    if (two) store_bf16_first(o + 16, _mm512_add_ps(acc[r][1], bias1), num_cols - 16);
  }
}

using TileFn = void (*)(const bf16*, int64_t, const bf16*, int64_t, const bf16*, bf16*, int64_t, int64_t);
constexpr TileFn kTiles[kTileRows + 1] = {nullptr,  tile<1>, tile<2>, tile<3>,  tile<4>,  tile<5>, tile<6>,
                                          tile<7>,  tile<8>, tile<9>, tile<10>, tile<11>, tile<12>};

int64_t num_pairs(int64_t in_features) { return (in_features + 1) / 2; }

at::Tensor pack_linear_weight_bf16(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kBFloat16,
              "pack_linear_weight_bf16: weight must be 2-D bfloat16");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t num_panels = (out_features + kPanel - 1) / kPanel, pairs = num_pairs(in_features);
  at::Tensor buffer = at::zeros({num_panels, 2 * pairs, kPanel}, weight.options());
  const at::Tensor w = weight.contiguous();
  const bf16* wp = w.data_ptr<bf16>();
  bf16* bp = buffer.data_ptr<bf16>();
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      bf16* panel = bp + p * 2 * pairs * kPanel;
      for (int64_t c = 0; c < std::min(kPanel, out_features - p * kPanel); ++c) {
        const bf16* row = wp + (p * kPanel + c) * in_features;
        for (int64_t k = 0; k < in_features; ++k) panel[((k / 2) * kPanel + c) * 2 + k % 2] = row[k];
      }
    }
  });
  return buffer.narrow(1, 0, in_features);
}

void linear_bf16(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                 at::Tensor out) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && packed.dim() == 3, "linear_bf16: x and out must be 2-D, packed 3-D");
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 && out.scalar_type() == at::kBFloat16 &&
                  packed.scalar_type() == at::kBFloat16,
              "linear_bf16: x, packed and out must be bfloat16");
  const int64_t num_rows = x.size(0), in_features = x.size(1), out_features = out.size(1);
  const int64_t num_panels = packed.size(0), pairs = num_pairs(in_features);
  const int64_t panel_size = 2 * pairs * kPanel;
  // The view pack_linear_weight_bf16 returns, its buffer's pad row included.
  TORCH_CHECK(packed.size(1) == in_features && packed.size(2) == kPanel && packed.stride(2) == 1 &&
                  packed.stride(1) == kPanel && packed.stride(0) == panel_size &&
                  static_cast<int64_t>(packed.storage().nbytes() / sizeof(bf16)) >=
                      packed.storage_offset() + num_panels * panel_size,
              "linear_bf16: packed is not a pack_linear_weight_bf16 of a weight with ", in_features, " input features");
  TORCH_CHECK(out.size(0) == num_rows && out_features <= num_panels * kPanel && out_features > (num_panels - 1) * kPanel,
              "linear_bf16: out must be [", num_rows, ", out_features of the packed weight]");
  TORCH_CHECK(dense_last_dim(x) && dense_last_dim(out), "linear_bf16: x and out must be contiguous in their last dim");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kBFloat16 && bias->dim() == 1 && bias->size(0) == out_features &&
                        bias->is_contiguous()),
              "linear_bf16: bias must be a contiguous bfloat16 [out_features]");
  const bf16* xp = x.data_ptr<bf16>();
  const bf16* pp = packed.data_ptr<bf16>();
  const bf16* bp = bias ? bias->data_ptr<bf16>() : nullptr;
  bf16* op = out.data_ptr<bf16>();
  const int64_t x_stride = x.stride(0), out_stride = out.stride(0);
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t panel = begin; panel < end; ++panel) {
      const int64_t col = panel * kPanel, num_cols = std::min(kPanel, out_features - col);
      for (int64_t row = 0; row < num_rows; row += kTileRows) {
        const int64_t rows = std::min(kTileRows, num_rows - row);
        kTiles[rows](xp + row * x_stride, x_stride, pp + panel * panel_size, in_features, bp ? bp + col : nullptr,
                     op + row * out_stride + col, out_stride, num_cols);
      }
    }
  });
}

#else

at::Tensor pack_linear_weight_bf16(const at::Tensor&) {
  TORCH_CHECK(false, "pack_linear_weight_bf16: built without AVX512-BF16 (see has_linear_bf16)");
}

void linear_bf16(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&, at::Tensor) {
  TORCH_CHECK(false, "linear_bf16: built without AVX512-BF16 (see has_linear_bf16)");
}

#endif

bool has_linear_bf16() {
#if defined(__AVX512BF16__)
  return true;
#else
  return false;
#endif
}

}  // namespace
}  // namespace pagedinfer_cpu

TORCH_LIBRARY_FRAGMENT(pagedinfer_cpu, m) {
  // No tensor argument to dispatch on: a catch-all kernel, not a CPU one.
  m.def("has_linear_bf16() -> bool", &pagedinfer_cpu::has_linear_bf16);
}

TORCH_LIBRARY_IMPL(pagedinfer_cpu, CPU, m) {
  m.impl("pack_linear_weight_bf16", &pagedinfer_cpu::pack_linear_weight_bf16);
  m.impl("linear_bf16", &pagedinfer_cpu::linear_bf16);
}
