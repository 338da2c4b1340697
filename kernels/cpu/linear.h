// Several packed float32 products in one parallel region (linear.cpp), for
// the ops that chain them (lora.cpp): on a loaded 2-vCPU machine each
// region's fork/join costs more than a small product's arithmetic.
#pragma once

#include <optional>
#include <vector>

#include "common.h"

namespace pagedinfer_cpu {

// out (+)= x @ weight.T (+ bias), the weight packed by pack_linear_weight; checked by check_product.
struct Product {
  const float* x;
  int64_t x_stride;
  const float* panels;
  int64_t in_features;
  const float* bias;
  float* out;
  int64_t out_stride;
  int64_t out_features;
  int64_t num_rows;
  int64_t first_panel;  // in run_products' numbering
};

// Checks shapes, dtypes and strides (x and out: any row stride, last dim contiguous); raises on a wrong one.
Product check_product(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                      at::Tensor& out);

// Every product's panels split over the threads of one at::parallel_for; `accumulate` adds into out.
void run_products(std::vector<Product>& products, bool accumulate);

}  // namespace pagedinfer_cpu
