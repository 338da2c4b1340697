// float32 linear layers for decode steps and prompt chunks up to a step's
// token budget: out = x @ weight.T (+ bias) on a weight packed once into
// column panels. `run_products` (linear.h) runs several such products in one
// parallel region, optionally adding into `out` (lora.cpp's base + shrink,
// then its per-part expands).
//
// Why not torch's BLAS: at a decode step's row counts the work per call is
// small, and the fixed cost per call is not: oneDNN through torch
// (`mkldnn._linear_pointwise`) costs 25-45 us per call on a 2-core EPYC, MKL
// repacks the weight every call. A decode step makes ~120 of these calls.
//
// Layout: `packed` is [num_panels, in_features, kPanel] float32; panel p holds
// output columns p*kPanel .. p*kPanel+kPanel-1 (past out_features: zeros),
// k-major, so one pass over k reads a panel front to back. Invariants:
// - A panel is a function of the weight alone (re-pack after the weight changes).
// - Each output element is one float32 sum over k in order, then + bias: it
//   equals F.linear up to float32 rounding, never a different shape or dtype.
// - Columns past out_features are computed on the zero padding but never stored.
// - Shapes, dtypes and strides are checked here (cheaply, once per call): a
//   wrong one raises instead of reading past a tensor.
// - Work is split with at::parallel_for over panels; each panel is read from
//   memory once per call and reused from cache by every block of rows.

#include <torch/library.h>

#include <vector>

#include "common.h"
#include "linear.h"

namespace pagedinfer_cpu {
namespace {

#if defined(PAGEDINFER_VEC)
constexpr int64_t kPanel = 2 * kLanes;  // two vector registers of columns
#else
constexpr int64_t kPanel = 16;
#endif
// Rows per register tile: 6 x 2 accumulators, 2 panel loads and a broadcast
// fill 15 of AVX2's 16 vector registers.
constexpr int64_t kTileRows = 6;

// out[r, c] (+)= for R rows and the panel's columns (the first num_cols stored).
template <int64_t R>
void tile(const float* x, int64_t x_stride, const float* panel, int64_t in_features, const float* bias, float* out,
          int64_t out_stride, int64_t num_cols, bool accumulate) {
#if defined(PAGEDINFER_VEC)
  vfloat acc[R][2];
  for (int64_t r = 0; r < R; ++r) acc[r][0] = acc[r][1] = vzero();
  for (int64_t k = 0; k < in_features; ++k) {
    const vfloat b0 = vload(panel + k * kPanel), b1 = vload(panel + k * kPanel + kLanes);
    for (int64_t r = 0; r < R; ++r) {
      const vfloat a = vset(x[r * x_stride + k]);
      acc[r][0] = vfmadd(a, b0, acc[r][0]);
      acc[r][1] = vfmadd(a, b1, acc[r][1]);
    }
  }
  // The second vector exists only where the panel has more than kLanes columns:
  // a first-n load with n <= 0 is not defined on every vector width.
  const bool two = num_cols > kLanes;
  const vfloat bias0 = bias ? vload_first(bias, num_cols, 0.0f) : vzero();
  const vfloat bias1 = bias && two ? vload_first(bias + kLanes, num_cols - kLanes, 0.0f) : vzero();
  for (int64_t r = 0; r < R; ++r) {
    float* o = out + r * out_stride;
    acc[r][0] = vadd(acc[r][0], bias0);
    acc[r][1] = vadd(acc[r][1], bias1);
    if (accumulate) {
      acc[r][0] = vadd(acc[r][0], vload_first(o, num_cols, 0.0f));
      if (two) acc[r][1] = vadd(acc[r][1], vload_first(o + kLanes, num_cols - kLanes, 0.0f));
    }
    if (num_cols == kPanel) {
      vstore(o, acc[r][0]);
      vstore(o + kLanes, acc[r][1]);
    } else {
      vstore_first(o, acc[r][0], num_cols);
      if (two) vstore_first(o + kLanes, acc[r][1], num_cols - kLanes);
    }
  }
#else
  float acc[R][kPanel] = {};
  for (int64_t k = 0; k < in_features; ++k) {
    for (int64_t r = 0; r < R; ++r) {
      const float a = x[r * x_stride + k];
#pragma omp simd
      for (int64_t c = 0; c < kPanel; ++c) acc[r][c] += a * panel[k * kPanel + c];
    }
  }
  for (int64_t r = 0; r < R; ++r) {
    for (int64_t c = 0; c < num_cols; ++c) {
      float* o = out + r * out_stride + c;
      *o = acc[r][c] + (bias ? bias[c] : 0.0f) + (accumulate ? *o : 0.0f);
    }
  }
#endif
}

using TileFn = void (*)(const float*, int64_t, const float*, int64_t, const float*, float*, int64_t, int64_t, bool);
constexpr TileFn kTiles[kTileRows + 1] = {nullptr, tile<1>, tile<2>, tile<3>, tile<4>, tile<5>, tile<6>};

at::Tensor pack_linear_weight(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kFloat, "pack_linear_weight: weight must be 2-D float32");
  const int64_t out_features = weight.size(0), in_features = weight.size(1);
  const int64_t num_panels = (out_features + kPanel - 1) / kPanel;
  at::Tensor packed = at::zeros({num_panels, in_features, kPanel}, weight.options());
  const at::Tensor w = weight.contiguous();
  const float* wp = w.data_ptr<float>();
  float* pp = packed.data_ptr<float>();
  at::parallel_for(0, num_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      for (int64_t c = 0; c < std::min(kPanel, out_features - p * kPanel); ++c) {
        const float* row = wp + (p * kPanel + c) * in_features;
        for (int64_t k = 0; k < in_features; ++k) pp[(p * in_features + k) * kPanel + c] = row[k];
      }
    }
  });
  return packed;
}

}  // namespace

Product check_product(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                      at::Tensor& out) {
  TORCH_CHECK(x.dim() == 2 && out.dim() == 2 && packed.dim() == 3, "linear: x and out must be 2-D, packed 3-D");
  TORCH_CHECK(x.scalar_type() == at::kFloat && out.scalar_type() == at::kFloat && packed.scalar_type() == at::kFloat,
              "linear: x, packed and out must be float32");
  const int64_t num_rows = x.size(0), in_features = x.size(1), out_features = out.size(1);
  const int64_t num_panels = packed.size(0);
  TORCH_CHECK(packed.size(1) == in_features && packed.size(2) == kPanel && packed.is_contiguous(),
              "linear: packed is not a pack_linear_weight of a weight with ", in_features, " input features");
  TORCH_CHECK(out.size(0) == num_rows && out_features <= num_panels * kPanel && out_features > (num_panels - 1) * kPanel,
              "linear: out must be [", num_rows, ", out_features of the packed weight]");
  TORCH_CHECK((in_features <= 1 || x.stride(1) == 1) && (out_features <= 1 || out.stride(1) == 1),
              "linear: x and out must be contiguous in their last dim");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == out_features &&
                        bias->is_contiguous()),
              "linear: bias must be a contiguous float32 [out_features]");
  return {x.data_ptr<float>(), x.stride(0), packed.data_ptr<float>(), in_features, bias ? bias->data_ptr<float>() : nullptr,
          out.data_ptr<float>(), out.stride(0), out_features, num_rows, 0};
}

void run_products(std::vector<Product>& products, bool accumulate) {
  int64_t total = 0;
  for (Product& p : products) {
    p.first_panel = total;
    total += (p.out_features + kPanel - 1) / kPanel;
  }
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    size_t i = 0;
    for (int64_t g = begin; g < end; ++g) {
      while (i + 1 < products.size() && g >= products[i + 1].first_panel) ++i;
      const Product& p = products[i];
      const int64_t panel = g - p.first_panel;
      const int64_t col = panel * kPanel, num_cols = std::min(kPanel, p.out_features - col);
      for (int64_t row = 0; row < p.num_rows; row += kTileRows) {
        const int64_t rows = std::min(kTileRows, p.num_rows - row);
        kTiles[rows](p.x + row * p.x_stride, p.x_stride, p.panels + panel * p.in_features * kPanel, p.in_features,
                     p.bias ? p.bias + col : nullptr, p.out + row * p.out_stride + col, p.out_stride, num_cols,
                     accumulate);
      }
    }
  });
}

namespace {

void linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias, at::Tensor out) {
  std::vector<Product> products{check_product(x, packed, bias, out)};
  run_products(products, false);
}

}  // namespace
}  // namespace pagedinfer_cpu

TORCH_LIBRARY_IMPL(pagedinfer_cpu, CPU, m) {
  m.impl("pack_linear_weight", &pagedinfer_cpu::pack_linear_weight);
  m.impl("linear", &pagedinfer_cpu::linear);
}
