// mi_crow::sparse_decode on CPU: x_hat[b] = b_dec + sum_j values[b, j] * W_dec[indices[b, j]].
// One token per task; the k selected decoder rows are gathered, never a dense [B, n] product.
#include <torch/library.h>

#include <vector>

#include "checks.h"
#include "isa.h"

MI_CROW_ISA_BEGIN
#include "vec.h"

namespace mi_crow {
namespace MI_CROW_ISA {

at::Tensor sparse_decode_cpu(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                             const at::Tensor& b_dec) {
  constexpr const char* op = "sparse_decode";
  check_dim(op, "values", values, 2);
  check_dim(op, "indices", indices, 2);
  check_dim(op, "W_dec", W_dec, 2);
  check_dim(op, "b_dec", b_dec, 1);
  check_float(op, "W_dec", W_dec);
  check_same_dtype(op, "values", values, W_dec, "W_dec");
  check_same_dtype(op, "b_dec", b_dec, W_dec, "W_dec");
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), op, ": indices must have the shape of values ", values.sizes(),
              ", got ", indices.sizes());
  TORCH_CHECK_VALUE(b_dec.size(0) == W_dec.size(1), op, ": b_dec must have shape [", W_dec.size(1), "], got ",
              b_dec.sizes());
  const int64_t B = values.size(0), k = values.size(1), n = W_dec.size(0), d = W_dec.size(1);
  auto v = values.contiguous();
  auto idx = indices.contiguous();
  auto W = W_dec.contiguous();
  auto bias = b_dec.contiguous();
  check_indices(op, idx, n);
  auto out = at::empty({B, d}, W.options());
  if (B == 0 || d == 0) return out;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "sparse_decode_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const scalar_t* vp = v.data_ptr<scalar_t>();   // [B, k]
    const int64_t* ip = idx.data_ptr<int64_t>();   // [B, k]
    const scalar_t* wp = W.data_ptr<scalar_t>();   // [n, d]
    const scalar_t* bp = bias.data_ptr<scalar_t>();  // [d]
    scalar_t* op_ = out.data_ptr<scalar_t>();      // [B, d]
    std::vector<acc_t> bias_acc(d);
    to_acc(bp, bias_acc.data(), d);
    // ~256K multiply-adds per task: below that, waking a second thread costs more than it saves.
    const int64_t grain = std::max<int64_t>(1, 262144 / std::max<int64_t>(1, d * std::max<int64_t>(k, 1)));
    at::parallel_for(0, B, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d);
      for (int64_t b = begin; b < end; ++b) {
        acc_t* a = acc.data();
        for (int64_t c = 0; c < d; ++c) a[c] = bias_acc[c];
        int64_t j = 0;
        if constexpr (std::is_same_v<scalar_t, acc_t>) {
          // Four decoder rows per pass (axpy_rows): they are random reads, and several in flight at once is what
          // makes a gather fast. Same summation order as one row at a time.
          constexpr int kRows = 4;
          acc_t coef[kRows];
          const acc_t* rows[kRows];
          for (; j + kRows <= k; j += kRows) {
            for (int r = 0; r < kRows; ++r) {
              coef[r] = static_cast<acc_t>(vp[b * k + j + r]);
              rows[r] = reinterpret_cast<const acc_t*>(wp + ip[b * k + j + r] * d);  // scalar_t is acc_t here
            }
            axpy_rows<kRows>(a, coef, rows, d);
          }
        }
        for (; j < k; ++j) {
          if (j + 1 < k) prefetch_row(wp + ip[b * k + j + 1] * d, d);
          axpy(a, static_cast<acc_t>(vp[b * k + j]), wp + ip[b * k + j] * d, d);
        }
        scalar_t* o = op_ + b * d;
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(a[c]);
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

MI_CROW_ISA_DECLARE(sparse_decode_cpu,
                    (const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                     const at::Tensor& b_dec),
                    at::Tensor)

at::Tensor sparse_decode_dispatch(const at::Tensor& values, const at::Tensor& indices, const at::Tensor& W_dec,
                                  const at::Tensor& b_dec) {
  return MI_CROW_ISA_CALL(sparse_decode_cpu, values, indices, W_dec, b_dec);
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CPU, m) { m.impl("sparse_decode", &mi_crow::sparse_decode_dispatch); }
#endif  // MI_CROW_ISA_PRIMARY
