// Constant fan-in ("condensed") linear layer for small batches on a CPU (rigl_ds.export.CondensedLinear).
//
//   y[b, o] = bias[o] + sum_j values[o, j] * x[b, indices[o, j]]
//
// One pass over the layer's active weights and their indices (int16 when the layer has at most
// 32768 inputs, else int32); rows of the output are split over torch's intra-op threads. The
// batch loop sits inside the row loop so a row's weights are read once per call. Built on first
// use by torch.utils.cpp_extension (rigl_ds/kernels/__init__.py); fp32 only.
#include <torch/extension.h>
#include <ATen/Parallel.h>

namespace {

template <typename Index>
void condensed_rows(const float* x, const float* values, const Index* indices, const float* bias, float* y,
                    int64_t batch, int64_t in_features, int64_t out_features, int64_t fan_in) {
  at::parallel_for(0, out_features, 64, [&](int64_t begin, int64_t end) {
    for (int64_t o = begin; o < end; ++o) {
      const float* v = values + o * fan_in;
      const Index* idx = indices + o * fan_in;
      const float b0 = bias ? bias[o] : 0.f;
      for (int64_t b = 0; b < batch; ++b) {
        const float* xb = x + b * in_features;
        // four partial sums: independent multiply-adds in flight while the gathers wait on memory
        float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
        int64_t j = 0;
        for (; j + 4 <= fan_in; j += 4) {
          a0 += v[j] * xb[idx[j]];
          a1 += v[j + 1] * xb[idx[j + 1]];
          a2 += v[j + 2] * xb[idx[j + 2]];
          a3 += v[j + 3] * xb[idx[j + 3]];
        }
        for (; j < fan_in; ++j) a0 += v[j] * xb[idx[j]];
        y[b * out_features + o] = ((a0 + a1) + (a2 + a3)) + b0;
      }
    }
  });
}

torch::Tensor condensed_linear(const torch::Tensor& x, const torch::Tensor& values, const torch::Tensor& indices,
                               const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.device().is_cpu() && values.device().is_cpu() && indices.device().is_cpu(),
              "condensed_linear: CPU tensors only");
  TORCH_CHECK(x.scalar_type() == torch::kFloat && values.scalar_type() == torch::kFloat,
              "condensed_linear: float32 only");
  TORCH_CHECK(x.dim() == 2 && values.dim() == 2 && indices.sizes() == values.sizes(),
              "condensed_linear: x (batch, in), values and indices (out, fan_in)");
  const auto xc = x.contiguous();
  const auto vc = values.contiguous();
  const auto ic = indices.contiguous();
  const int64_t batch = xc.size(0), in_features = xc.size(1), out_features = vc.size(0), fan_in = vc.size(1);
  const float* bp = nullptr;
  torch::Tensor bc;
  if (bias.has_value()) {
    bc = bias->contiguous();
    TORCH_CHECK(bc.device().is_cpu() && bc.scalar_type() == torch::kFloat && bc.numel() == out_features,
                "condensed_linear: bias (out,), float32 on the CPU");
    bp = bc.data_ptr<float>();
  }
  auto y = torch::empty({batch, out_features}, xc.options());
  if (ic.scalar_type() == torch::kShort) {
    condensed_rows<int16_t>(xc.data_ptr<float>(), vc.data_ptr<float>(), ic.data_ptr<int16_t>(), bp,
                            y.data_ptr<float>(), batch, in_features, out_features, fan_in);
  } else {
    TORCH_CHECK(ic.scalar_type() == torch::kInt, "condensed_linear: int16 or int32 indices");
    condensed_rows<int32_t>(xc.data_ptr<float>(), vc.data_ptr<float>(), ic.data_ptr<int32_t>(), bp,
                            y.data_ptr<float>(), batch, in_features, out_features, fan_in);
  }
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("condensed_linear", &condensed_linear, "y = bias + values x[indices] per output row (CPU, fp32)");
}
