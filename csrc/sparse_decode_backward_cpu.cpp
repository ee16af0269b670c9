// The decoder gradients on CPU, for one code or for the AuxK step's two codes of one W_dec:
//   mi_crow::sparse_decode_backward          (grad_out, values, indices, W_dec) -> (grad_values, grad_W_dec)
//   mi_crow::sparse_decode_with_aux_backward (..., aux_grad_out, aux_values, aux_indices, ...)
//                                            -> (grad_values, aux_grad_values, grad_W_dec)
// with
//   grad_values[b, j]     = <grad_out[b],     W_dec[indices[b, j]]>
//   aux_grad_values[b, j] = <aux_grad_out[b], W_dec[aux_indices[b, j]]>
//   grad_W_dec[i]         = sum over main slots (b, j) selecting i of values[b, j]     * grad_out[b]
//                         + sum over aux slots  (b, j) selecting i of aux_values[b, j] * aux_grad_out[b]
// One pass serves both ops (the single-code op is the two-code one with an empty aux code). The slots of the
// codes are grouped by latent with one counting sort (main slots are the flat positions [0, B*k), aux slots
// [B*k, B*k + B*k_aux)). One thread owns each latent: it loads the decoder row once, and for the slots that
// selected it, four at a time, does the fused dot + axpy with each slot's gradient row. For the AuxK step,
// compared with two single-code passes and an add, each decoder row is read once and a single [n, d] gradient is
// written, instead of two that are then read back and summed. Deterministic (a latent's slots are summed in a
// fixed order: main then aux, each in (b, j) order, whatever the thread count), no atomics, no [B*k, d]
// temporary; the only per-slot memory is a position and a row, 8 bytes per slot while they fit in int32.
#include <torch/library.h>

#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "hugepages.h"
#include "isa.h"

MI_CROW_ISA_BEGIN
#include "slots.h"
#include "vec.h"

namespace mi_crow {
namespace MI_CROW_ISA {

namespace {

// Slots of one latent handled per fused step. One at a time, the pass waits on one scattered gradient row after
// another. At B=4096, d=768, n=32768, k=32, k_aux=256 on one thread: 1 row 305 ms, 2 rows 234 ms, 4 rows 205 ms,
// 8 rows no better.
constexpr int kRows = 4;

// What a slot needs: its gradient row, its coefficient and where its dot goes.
template <typename scalar_t, typename acc_t>
struct Slot {
  const acc_t* g;
  acc_t coef;
  scalar_t* out;
};

// R slots of one latent at once: gather their rows and coefficients, one fused pass, store the dots.
template <int R, typename scalar_t, typename acc_t, typename SlotFn>
inline void slots_step(const SlotFn& slot, int64_t q, acc_t* a, const acc_t* w, int64_t d) {
  const acc_t* g[R];
  acc_t coef[R], dots[R];
  scalar_t* out[R];
  for (int r = 0; r < R; ++r) {
    const auto sl = slot(q + r);
    g[r] = sl.g;
    coef[r] = sl.coef;
    out[r] = sl.out;
  }
  dot_axpy_rows<R>(a, coef, g, w, d, dots);
  for (int r = 0; r < R; ++r) *out[r] = static_cast<scalar_t>(dots[r]);
}

template <typename scalar_t, typename index_t>
void fused_pass(const at::Tensor& grad_out, const at::Tensor& v, const at::Tensor& idx, const at::Tensor& aux_grad_out,
                const at::Tensor& av, const at::Tensor& aidx, const at::Tensor& W, at::Tensor& grad_values,
                at::Tensor& aux_grad_values, at::Tensor& grad_W) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t B = v.size(0), k = v.size(1), ka = av.size(1), n = W.size(0), d = W.size(1);
  const int64_t main_total = B * k;
  std::vector<int64_t> start;
  std::vector<index_t> pos, row;
  group_slots_by_latent<index_t>({CodeSlots{idx.data_ptr<int64_t>(), B, k, 0},
                                  CodeSlots{aidx.data_ptr<int64_t>(), B, ka, main_total}},
                                 n, start, pos, row);
  const int64_t total = main_total + B * ka;

  // Low-precision gradient rows are widened once instead of once per slot that reads them (no copy for fp32).
  constexpr auto acc_type = c10::CppTypeToScalarType<acc_t>::value;
  at::Tensor ga = grad_out.to(acc_type).contiguous();
  at::Tensor aga = ka == 0 ? ga : aux_grad_out.to(acc_type).contiguous();
  const acc_t* gp = ga.data_ptr<acc_t>();           // [B, d]
  const acc_t* agp = aga.data_ptr<acc_t>();         // [B, d]
  const scalar_t* vp = v.data_ptr<scalar_t>();      // [B, k]
  const scalar_t* avp = av.data_ptr<scalar_t>();    // [B, k_aux]
  const scalar_t* wp = W.data_ptr<scalar_t>();      // [n, d]
  scalar_t* gvp = grad_values.data_ptr<scalar_t>();       // [B, k]
  scalar_t* agvp = aux_grad_values.data_ptr<scalar_t>();  // [B, k_aux]
  scalar_t* gwp = grad_W.data_ptr<scalar_t>();            // [n, d]
  const int64_t* sp = start.data();
  const index_t* posp = pos.data();
  const index_t* rowp = row.data();

  // Rows of n with no slot cost only a zero fill; size tasks by the slots that do exist.
  const int64_t grain = std::max<int64_t>(64, n * std::max<int64_t>(1, 131072 / std::max<int64_t>(1, d)) /
                                                  std::max<int64_t>(1, total));
  // Main slots have flat positions below main_total, aux slots the rest. The gradient rows come in random order
  // (slots are in latent order).
  auto slot = [&](int64_t q) -> Slot<scalar_t, acc_t> {
    const int64_t p = posp[q], r = rowp[q];
    if (p < main_total) return {gp + r * d, static_cast<acc_t>(vp[p]), gvp + p};
    return {agp + r * d, static_cast<acc_t>(avp[p - main_total]), agvp + (p - main_total)};
  };
  at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(d), wrow(d);
    for (int64_t i = begin; i < end; ++i) {
      scalar_t* o = gwp + i * d;
      const int64_t first_q = sp[i], end_q = sp[i + 1];
      if (first_q == end_q) {
        for (int64_t c = 0; c < d; ++c) o[c] = scalar_t(0);
        continue;
      }
      const acc_t* w;
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        w = wp + i * d;
      } else {
        widen(wp + i * d, wrow.data(), d);
        w = wrow.data();
      }
      acc_t* a = acc.data();
      for (int64_t c = 0; c < d; ++c) a[c] = 0;
      // kRows slots per step (dot_axpy_rows), then one at a time; the summation order is still slot by slot.
      int64_t q = first_q;
      for (; q + kRows <= end_q; q += kRows) slots_step<kRows, scalar_t>(slot, q, a, w, d);
      for (; q < end_q; ++q) slots_step<1, scalar_t>(slot, q, a, w, d);
      for (int64_t c = 0; c < d; ++c) o[c] = static_cast<scalar_t>(a[c]);
    }
  });
}

// fused_pass with int32 slot positions and rows whenever they fit (the two per-slot arrays are the pass's only
// temporaries besides the widened gradient rows).
void run_pass(const at::Tensor& grad_out, const at::Tensor& v, const at::Tensor& idx, const at::Tensor& aux_grad_out,
              const at::Tensor& av, const at::Tensor& aidx, const at::Tensor& W, at::Tensor& grad_values,
              at::Tensor& aux_grad_values, at::Tensor& grad_W) {
  const bool small = v.size(0) * (v.size(1) + av.size(1)) < std::numeric_limits<int32_t>::max();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, W.scalar_type(), "sparse_decode_backward_cpu", [&] {
    if (small) {
      fused_pass<scalar_t, int32_t>(grad_out, v, idx, aux_grad_out, av, aidx, W, grad_values, aux_grad_values, grad_W);
    } else {
      fused_pass<scalar_t, int64_t>(grad_out, v, idx, aux_grad_out, av, aidx, W, grad_values, aux_grad_values, grad_W);
    }
  });
}

}  // namespace

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
  // The two-code pass with an empty aux code.
  auto no_values = v.new_empty({B, 0});
  auto no_indices = idx.new_empty({B, 0});
  auto no_grads = v.new_empty({B, 0});
  run_pass(grad_out, v, idx, grad_out, no_values, no_indices, W, grad_values, no_grads, grad_W);
  return {grad_values, grad_W};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_with_aux_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& aux_grad_out,
    const at::Tensor& aux_values, const at::Tensor& aux_indices, const at::Tensor& W_dec) {
  constexpr const char* op = "sparse_decode_with_aux_backward";
  check_dim(op, "grad_out", grad_out, 2);
  check_dim(op, "values", values, 2);
  check_dim(op, "indices", indices, 2);
  check_dim(op, "aux_grad_out", aux_grad_out, 2);
  check_dim(op, "aux_values", aux_values, 2);
  check_dim(op, "aux_indices", aux_indices, 2);
  check_dim(op, "W_dec", W_dec, 2);
  check_float(op, "W_dec", W_dec);
  check_same_dtype(op, "grad_out", grad_out, W_dec, "W_dec");
  check_same_dtype(op, "values", values, W_dec, "W_dec");
  check_same_dtype(op, "aux_grad_out", aux_grad_out, W_dec, "W_dec");
  check_same_dtype(op, "aux_values", aux_values, W_dec, "W_dec");
  TORCH_CHECK_VALUE(indices.sizes() == values.sizes(), op, ": indices must have the shape of values ",
                    values.sizes(), ", got ", indices.sizes());
  TORCH_CHECK_VALUE(aux_indices.sizes() == aux_values.sizes(), op, ": aux_indices must have the shape of aux_values ",
                    aux_values.sizes(), ", got ", aux_indices.sizes());
  const int64_t B = values.size(0), k = values.size(1), ka = aux_values.size(1), n = W_dec.size(0),
                d = W_dec.size(1);
  TORCH_CHECK_VALUE(aux_values.size(0) == B, op, ": aux_values must have ", B, " rows (the rows of values), got shape ",
                    aux_values.sizes());
  TORCH_CHECK_VALUE(grad_out.size(0) == B && grad_out.size(1) == d, op, ": grad_out must have shape [", B, ", ", d,
                    "], got ", grad_out.sizes());
  TORCH_CHECK_VALUE(aux_grad_out.size(0) == B && aux_grad_out.size(1) == d, op, ": aux_grad_out must have shape [",
                    B, ", ", d, "], got ", aux_grad_out.sizes());
  auto v = values.contiguous();
  auto idx = indices.contiguous();
  auto av = aux_values.contiguous();
  auto aidx = aux_indices.contiguous();
  auto W = W_dec.contiguous();
  check_indices(op, "indices", idx, n);
  check_indices(op, "aux_indices", aidx, n);
  auto grad_values = at::empty({B, k}, v.options());
  auto aux_grad_values = at::empty({B, ka}, av.options());
  auto grad_W = empty_gradient({n, d}, W.options());
  if (n == 0 || d == 0) {
    grad_values.zero_();
    aux_grad_values.zero_();
    return {grad_values, aux_grad_values, grad_W};
  }
  run_pass(grad_out, v, idx, aux_grad_out, av, aidx, W, grad_values, aux_grad_values, grad_W);
  return {grad_values, aux_grad_values, grad_W};
}

}  // namespace MI_CROW_ISA
}  // namespace mi_crow
MI_CROW_ISA_END

#if MI_CROW_ISA_PRIMARY
// Only the baseline build registers the op: its entry point runs the build for the selected level.
namespace mi_crow {

MI_CROW_ISA_DECLARE(sparse_decode_backward_cpu,
                    (const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
                     const at::Tensor& W_dec),
                    std::tuple<at::Tensor, at::Tensor>)
MI_CROW_ISA_DECLARE(sparse_decode_with_aux_backward_cpu,
                    (const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices,
                     const at::Tensor& aux_grad_out, const at::Tensor& aux_values, const at::Tensor& aux_indices,
                     const at::Tensor& W_dec),
                    std::tuple<at::Tensor, at::Tensor, at::Tensor>)

std::tuple<at::Tensor, at::Tensor> sparse_decode_backward_dispatch(const at::Tensor& grad_out,
                                                                   const at::Tensor& values,
                                                                   const at::Tensor& indices,
                                                                   const at::Tensor& W_dec) {
  return MI_CROW_ISA_CALL(sparse_decode_backward_cpu, grad_out, values, indices, W_dec);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_decode_with_aux_backward_dispatch(
    const at::Tensor& grad_out, const at::Tensor& values, const at::Tensor& indices, const at::Tensor& aux_grad_out,
    const at::Tensor& aux_values, const at::Tensor& aux_indices, const at::Tensor& W_dec) {
  return MI_CROW_ISA_CALL(sparse_decode_with_aux_backward_cpu, grad_out, values, indices, aux_grad_out, aux_values,
                          aux_indices, W_dec);
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CPU, m) {
  m.impl("sparse_decode_backward", &mi_crow::sparse_decode_backward_dispatch);
  m.impl("sparse_decode_with_aux_backward", &mi_crow::sparse_decode_with_aux_backward_dispatch);
}
#endif  // MI_CROW_ISA_PRIMARY
