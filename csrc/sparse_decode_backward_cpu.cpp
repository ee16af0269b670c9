// mi_crow::sparse_decode_backward on CPU: both gradients of sparse_decode in one pass,
//   grad_values[b, j] = <grad_out[b], W_dec[indices[b, j]]>            (= gather_dot)
//   grad_W_dec[i]     = sum over (b, j) with indices[b, j] == i of values[b, j] * grad_out[b]  (= scatter_rows)
// Contributions are grouped by latent (counting sort); one thread owns each latent, loads its decoder row once
// and, for every (b, j) that selected it, reads grad_out[b] once for both the dot and the accumulation. Compared
// with a gather per (b, j), the decoder rows are read once, in order, instead of once per use from random places.
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "checks.h"
#include "hugepages.h"
#include "vec.h"

namespace mi_crow {

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_cpu(const at::Tensor& grad_out, const at::Tensor& values,
                                                              const at::Tensor& indices, const at::Tensor& W_dec) {
  constexpr const char* op = "sparse_decode_backward";
  check_dim(op, "grad_out", grad_out, 2);
  check_dim(op, "values", values, 2);
  check_dim(op, "indices", indices, 2);
  check_dim(op, "W_dec", W_dec, 2);
  check_float(op, "W_dec", W_dec);
  check_same_dtype(op, "grad_out", grad_out, W_dec, "W_dec");
  check_same_dtype(op, "values", values, W_dec, "W_dec");
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), op, ": indices must have the shape of values ",
                    values.sizes(), ", got ", indices.sizes());
  TORCH_CHECK_VALUE(grad_out.size(0) == values.size(0) && grad_out.size(1) == W_dec.size(1), op,
                    ": grad_out must have shape [", values.size(0), ", ", W_dec.size(1), "], got ", grad_out.sizes());
  const int64_t B = values.size(0), k = values.size(1), n = W_dec.size(0), d = W_dec.size(1);
  auto v = values.contiguous();
  auto idx = indices.contiguous();
  auto W = W_dec.contiguous();
  check_indices(op, idx, n);
  auto grad_values = at::empty({B, k}, v.options());
  auto grad_W = empty_gradient({n, d}, W.options());
  if (n == 0 || d == 0) {
    grad_values.zero_();
    return {grad_values, grad_W};
  }
  std::vector<int64_t> start, order;
  group_by_latent(idx.data_ptr<int64_t>(), B * k, n, start, order);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "sparse_decode_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor ga = grad_out.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
    const acc_t* gp = ga.data_ptr<acc_t>();         // [B, d]
    const scalar_t* vp = v.data_ptr<scalar_t>();    // [B, k]
    const scalar_t* wp = W.data_ptr<scalar_t>();    // [n, d]
    scalar_t* gvp = grad_values.data_ptr<scalar_t>();  // [B, k]
    scalar_t* gwp = grad_W.data_ptr<scalar_t>();       // [n, d]
    const int64_t* sp = start.data();
    const int64_t* orderp = order.data();
    // Source row of each contribution in latent order, so the inner loop needs no division.
    const int64_t total = B * k;
    std::vector<int64_t> rowq(total);
    for (int64_t q = 0; q < total; ++q) rowq[q] = orderp[q] / k;
    const int64_t* rp = rowq.data();
    const int64_t grain = std::max<int64_t>(64, n * std::max<int64_t>(1, 131072 / std::max<int64_t>(1, d)) /
                                                    std::max<int64_t>(1, B * k));
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> acc(d), wrow(d);
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* o = gwp + i * d;
        if (sp[i] == sp[i + 1]) {
          for (int64_t c = 0; c < d; ++c) o[c] = scalar_t(0);
          continue;
        }
        widen(wp + i * d, wrow.data(), d);
        acc_t* a = acc.data();
        for (int64_t c = 0; c < d; ++c) a[c] = 0;
        const int64_t end_q = sp[i + 1];
        // Four contributions per pass (dot_axpy_rows): their gradient rows are random reads, and several in
        // flight at once is what makes this fast. The accumulation order is still contribution by contribution.
        constexpr int kRows = 4;
        acc_t coef[kRows], dots[kRows];
        const acc_t* rows[kRows];
        int64_t q = sp[i];
        for (; q + kRows <= end_q; q += kRows) {
          for (int r = 0; r < kRows; ++r) {
            coef[r] = static_cast<acc_t>(vp[orderp[q + r]]);
            rows[r] = gp + rp[q + r] * d;
          }
          dot_axpy_rows<kRows>(a, coef, rows, wrow.data(), d, dots);
          for (int r = 0; r < kRows; ++r) gvp[orderp[q + r]] = static_cast<scalar_t>(dots[r]);
        }
        for (; q < end_q; ++q) {
          const acc_t c1[1] = {static_cast<acc_t>(vp[orderp[q]])};
          const acc_t* r1[1] = {gp + rp[q] * d};
          acc_t s1[1];
          dot_axpy_rows<1>(a, c1, r1, wrow.data(), d, s1);
          gvp[orderp[q]] = static_cast<scalar_t>(s1[0]);
        }
        for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(a[c]);
      }
    });
  });
  return {grad_values, grad_W};
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CPU, m) { m.impl("sparse_decode_backward", &mi_crow::sparse_decode_backward_cpu); }
