// mi_crow::gather_dot on CPU: out[b, j] = <grad_out[b], W[indices[b, j]]>, the gradient of sparse_decode
// w.r.t. the code values. One token per task; its row of grad_out is converted once and dotted with k rows.
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "isa.h"

MI_CROW_ISA_BEGIN
#include "vec.h"

namespace mi_crow {
namespace MI_CROW_ISA {

at::Tensor gather_dot_cpu(const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& W) {
  constexpr const char* op = "gather_dot";
  check_dim(op, "grad_out", grad_out, 2);
  check_dim(op, "indices", indices, 2);
  check_dim(op, "W", W, 2);
  check_float(op, "grad_out", grad_out);
  check_same_dtype(op, "W", W, grad_out, "grad_out");
  TORCH_CHECK_VALUE(grad_out.size(1) == W.size(1), op, ": grad_out must have W.shape[1] = ", W.size(1),
              " columns, got shape ", grad_out.sizes());
  TORCH_CHECK_VALUE(indices.size(0) == grad_out.size(0), op, ": indices must have ", grad_out.size(0),
              " rows (the rows of grad_out), got shape ", indices.sizes());
  const int64_t B = indices.size(0), k = indices.size(1), n = W.size(0), d = W.size(1);
  auto g = grad_out.contiguous();
  auto idx = indices.contiguous();
  auto Wc = W.contiguous();
  check_indices(op, idx, n);
  auto out = at::empty({B, k}, g.options());
  if (B == 0 || k == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, g.scalar_type(), "gather_dot_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* gp = g.data_ptr<scalar_t>();   // [B, d]
    const int64_t* ip = idx.data_ptr<int64_t>();   // [B, k]
    const scalar_t* wp = Wc.data_ptr<scalar_t>();  // [n, d]
    scalar_t* op_ = out.data_ptr<scalar_t>();      // [B, k]
    // ~256K multiply-adds per task: below that, waking a second thread costs more than it saves.
    const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(1, d * k));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> grow(d);
      for (int64_t b = begin; b < end; ++b) {
        widen(gp + b * d, grow.data(), d);
        const acc_t* gr = grow.data();
        for (int64_t j = 0; j < k; ++j) {
          if (j + 1 < k) prefetch_row(wp + ip[b * k + j + 1] * d, d);
          op_[b * k + j] = static_cast<scalar_t>(dot(gr, wp + ip[b * k + j] * d, d));
        }
      }
    });
  });
  return out;
}

}  // namespace MI_CROW_ISA
}  // namespace mi_crow
MI_CROW_ISA_END

#if MI_CROW_ISA_PRIMARY
// Only the baseline build registers the op: its entry point runs the build for the selected level.
namespace mi_crow {

MI_CROW_ISA_DECLARE(gather_dot_cpu,
                    (const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& W),
                    at::Tensor)

at::Tensor gather_dot_dispatch(const at::Tensor& grad_out, const at::Tensor& indices, const at::Tensor& W) {
  return MI_CROW_ISA_CALL(gather_dot_cpu, grad_out, indices, W);
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CPU, m) { m.impl("gather_dot", &mi_crow::gather_dot_dispatch); }
#endif  // MI_CROW_ISA_PRIMARY
