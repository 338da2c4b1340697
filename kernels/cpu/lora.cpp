// A LoRA layer on the CPU in one call: the base product plus each token's
// adapter delta, for inference/lora/layers.py.
//
//   out = x @ weight.T (+ bias)                          } one parallel region
//   y   = x @ A_all.T, A_all = every part's and slot's A }
//   y  := y with row t zeroed outside its slot's rank block in each part (slot 0: all)
//   out[:, part p's columns] += y[:, part p's block] @ B_p.T   (one more region)
//
// `y` is [num_tokens, num_parts * num_loras * rank] (part, slot, rank order);
// B_p is [part p's rows, num_loras * rank], so no part multiplies another's
// zeros. Why one op: the Python path took ~50 us a layer in small torch calls,
// more than the arithmetic (bench.lora's step at batch 16).
//
// Invariants: equals F.linear plus the masked products up to float32
// rounding; rows of slot 0 get exactly the base product; slots are checked
// (0..num_loras) before anything is read with them.

#include <torch/library.h>

#include "common.h"
#include "linear.h"

namespace pagedinfer_cpu {
namespace {

void lora_linear(const at::Tensor& x, const at::Tensor& packed, const std::optional<at::Tensor>& bias,
                 const at::Tensor& packed_a, at::TensorList packed_b, at::IntArrayRef part_rows,
                 const at::Tensor& token_slots, int64_t rank, at::Tensor out, at::Tensor y) {
  const int64_t num_parts = static_cast<int64_t>(packed_b.size()), num_tokens = x.size(0);
  TORCH_CHECK(num_parts >= 1 && static_cast<int64_t>(part_rows.size()) == num_parts,
              "lora_linear: packed_b and part_rows must name the same parts");
  TORCH_CHECK(y.dim() == 2 && rank >= 1 && y.size(1) % (num_parts * rank) == 0 && y.is_contiguous(),
              "lora_linear: y must be contiguous [num_tokens, num_parts * num_loras * rank]");
  const int64_t width = y.size(1) / num_parts, num_loras = width / rank;
  TORCH_CHECK(token_slots.scalar_type() == at::kInt && token_slots.dim() == 1 && token_slots.size(0) == num_tokens &&
                  token_slots.is_contiguous(),
              "lora_linear: token_slots must be contiguous int32 [", num_tokens, "]");
  const int32_t* slots = token_slots.data_ptr<int32_t>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    TORCH_CHECK(slots[t] >= 0 && slots[t] <= num_loras, "lora_linear: token ", t, " has slot ", slots[t],
                ", past the ", num_loras, " slots");
  }
  std::vector<Product> first{check_product(x, packed, bias, out), check_product(x, packed_a, std::nullopt, y)};
  run_products(first, false);

  float* yp = y.data_ptr<float>();
  for (int64_t t = 0; t < num_tokens; ++t) {
    const int64_t keep = slots[t] == 0 ? 0 : (slots[t] - 1) * rank, keep_end = slots[t] == 0 ? 0 : keep + rank;
    for (int64_t p = 0; p < num_parts; ++p) {
      float* row = yp + t * y.size(1) + p * width;
      std::fill(row, row + keep, 0.0f);
      std::fill(row + keep_end, row + width, 0.0f);
    }
  }

  std::vector<Product> expands;
  int64_t first_row = 0;
  for (int64_t p = 0; p < num_parts; ++p) {
    at::Tensor columns = out.narrow(1, first_row, part_rows[p]);
    expands.push_back(check_product(y.narrow(1, p * width, width), packed_b[p], std::nullopt, columns));
    first_row += part_rows[p];
  }
  TORCH_CHECK(first_row == out.size(1), "lora_linear: part_rows sum to ", first_row, ", out has ", out.size(1));
  run_products(expands, true);
}

}  // namespace
}  // namespace pagedinfer_cpu

TORCH_LIBRARY_IMPL(pagedinfer_cpu, CPU, m) { m.impl("lora_linear", &pagedinfer_cpu::lora_linear); }
