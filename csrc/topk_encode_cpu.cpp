// mi_crow::topk_encode on CPU: values/indices = top-k of (x - b_dec) @ W_enc.T + b_enc per token (ReLU after),
// plus, in the same pass, the top-k_aux among dead latents.
//
// The [B, n] pre-activation matrix is never materialised. Latents are processed in tiles; for each tile and
// each block of tokens one BLAS/oneDNN product fills a small per-task scratch tile, and a scan keeps a running
// top-k per token in a min-heap. The scan rejects almost every entry with one vector compare against the current
// k-th value, so its cost is a small fraction of the product. Tiles are the outer loop so the threads share the
// tile of W_enc in cache; token blocks are the parallel inner loop. With fewer token blocks than threads, the
// latents are split between threads instead and the per-thread heaps are merged at the end.
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "checks.h"

namespace mi_crow {
namespace {

constexpr int64_t kTileLatents = 2048;  // latents per tile: [kTileTokens, kTileLatents] fp32 scratch = 2 MiB
constexpr int64_t kTileTokens = 256;

// Fixed-capacity min-heaps, one per token row, stored contiguously: the root is the smallest kept value, i.e.
// the threshold a new entry has to beat once the heap is full.
template <typename acc_t>
struct RowHeaps {
  int64_t cap = 0;
  std::vector<acc_t> val;
  std::vector<int64_t> idx;
  std::vector<int64_t> count;

  void init(int64_t rows, int64_t capacity) {
    cap = capacity;
    val.assign(rows * capacity, acc_t(0));
    idx.assign(rows * capacity, 0);
    count.assign(rows, 0);
  }

  acc_t threshold(int64_t r) const {
    return count[r] < cap ? -std::numeric_limits<acc_t>::infinity() : val[r * cap];
  }

  // Inserts (v, i) for row r; the caller guarantees v beats threshold(r). Returns the new threshold.
  acc_t push(int64_t r, acc_t v, int64_t i) {
    acc_t* hv = val.data() + r * cap;
    int64_t* hi = idx.data() + r * cap;
    int64_t& c = count[r];
    if (c < cap) {
      int64_t pos = c++;
      while (pos > 0) {  // sift up
        int64_t parent = (pos - 1) / 2;
        if (!(v < hv[parent])) break;
        hv[pos] = hv[parent];
        hi[pos] = hi[parent];
        pos = parent;
      }
      hv[pos] = v;
      hi[pos] = i;
      return c < cap ? -std::numeric_limits<acc_t>::infinity() : hv[0];
    }
    int64_t pos = 0;  // replace the root and sift down
    for (;;) {
      int64_t child = 2 * pos + 1;
      if (child >= cap) break;
      if (child + 1 < cap && hv[child + 1] < hv[child]) ++child;
      if (!(hv[child] < v)) break;
      hv[pos] = hv[child];
      hi[pos] = hi[child];
      pos = child;
    }
    hv[pos] = v;
    hi[pos] = i;
    return hv[0];
  }
};

// Scans one row of a product tile (pre-activations without bias) and updates the row's heaps.
// tile: [len] product row; bias: [len] encoder bias of the tile's latents; dead: [n] bool or nullptr.
template <typename acc_t>
void scan_row(const acc_t* tile, const acc_t* bias, int64_t len, int64_t lat0, int64_t r, RowHeaps<acc_t>& main,
              RowHeaps<acc_t>* aux, const bool* dead) {
  acc_t thr = main.threshold(r);
  acc_t athr = aux ? aux->threshold(r) : std::numeric_limits<acc_t>::infinity();
  int64_t j = 0;
#if defined(__AVX512F__)
  if constexpr (std::is_same_v<acc_t, float>) {
    alignas(64) float buf[16];
    __m512 vthr = _mm512_set1_ps(thr);
    __m512 vathr = _mm512_set1_ps(athr);
    for (; j + 16 <= len; j += 16) {
      __m512 v = _mm512_add_ps(_mm512_loadu_ps(tile + j), _mm512_loadu_ps(bias + j));
      __mmask16 m = _mm512_cmp_ps_mask(v, vthr, _CMP_GT_OQ);
      __mmask16 ma = 0;
      if (aux) {
        ma = _mm512_cmp_ps_mask(v, vathr, _CMP_GT_OQ);
        if (ma) {
          __mmask16 dm = _mm512_cmpneq_epi8_mask(
              _mm512_castsi128_si512(_mm_loadu_si128(reinterpret_cast<const __m128i*>(dead + lat0 + j))),
              _mm512_setzero_si512());
          ma &= dm;
        }
      }
      if (!(m | ma)) continue;
      _mm512_store_ps(buf, v);
      while (m) {
        int bit = __builtin_ctz(m);
        m &= m - 1;
        if (buf[bit] > thr) thr = main.push(r, buf[bit], lat0 + j + bit);
      }
      while (ma) {
        int bit = __builtin_ctz(ma);
        ma &= ma - 1;
        if (buf[bit] > athr) athr = aux->push(r, buf[bit], lat0 + j + bit);
      }
      vthr = _mm512_set1_ps(thr);
      vathr = _mm512_set1_ps(athr);
    }
  }
#endif
  for (; j < len; ++j) {
    const acc_t v = tile[j] + bias[j];
    if (v > thr) thr = main.push(r, v, lat0 + j);
    if (aux && v > athr && dead[lat0 + j]) athr = aux->push(r, v, lat0 + j);
  }
}

// Sorts a row's kept entries descending (ties by index, so the result does not depend on scan order).
template <typename acc_t>
void sorted_row(const RowHeaps<acc_t>& h, int64_t r, std::vector<std::pair<acc_t, int64_t>>& tmp) {
  tmp.clear();
  for (int64_t q = 0; q < h.count[r]; ++q) tmp.emplace_back(h.val[r * h.cap + q], h.idx[r * h.cap + q]);
  std::sort(tmp.begin(), tmp.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second < b.second);
  });
}

template <typename scalar_t>
void encode_impl(const at::Tensor& xc, const at::Tensor& W, const at::Tensor& b_enc, int64_t k, const bool* dead,
                 int64_t k_aux, at::Tensor& values, at::Tensor& indices, at::Tensor& aux_values,
                 at::Tensor& aux_indices) {
  using acc_t = at::opmath_type<scalar_t>;
  constexpr at::ScalarType acc_type = c10::CppTypeToScalarType<acc_t>::value;
  constexpr bool same_type = std::is_same_v<scalar_t, acc_t>;
  const int64_t B = xc.size(0), n = W.size(0);
  const bool use_aux = dead != nullptr && k_aux > 0;

  std::vector<acc_t> bias(n);
  to_acc(b_enc.data_ptr<scalar_t>(), bias.data(), n);

  const int64_t n_tiles = (n + kTileLatents - 1) / kTileLatents;
  const int64_t n_blocks = (B + kTileTokens - 1) / kTileTokens;
  const int64_t threads = at::get_num_threads();
  // Split latents between threads only when there are too few token blocks to keep every thread busy.
  const int64_t segments = (n_blocks >= threads || n_tiles < 2) ? 1 : std::min<int64_t>(threads, n_tiles);

  std::vector<RowHeaps<acc_t>> mains(segments), auxs(segments);
  for (int64_t s = 0; s < segments; ++s) {
    mains[s].init(B, k);
    if (use_aux) auxs[s].init(B, k_aux);
  }

  // Product of one token block with one latent tile into scratch, then the scan of its rows.
  auto process = [&](int64_t blk, int64_t tile, int64_t seg, at::Tensor& scratch, at::Tensor& scratch_acc) {
    // Dispatch-key guards are thread-local, and this may run on a worker thread.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t row0 = blk * kTileTokens, rows = std::min(kTileTokens, B - row0);
    const int64_t lat0 = tile * kTileLatents, len = std::min(kTileLatents, n - lat0);
    at::Tensor out = scratch.narrow(0, 0, rows * len).view({rows, len});
    at::mm_out(out, xc.narrow(0, row0, rows), W.narrow(0, lat0, len).t());
    const acc_t* tp;
    if constexpr (same_type) {
      tp = out.data_ptr<acc_t>();
    } else {
      acc_t* dst = scratch_acc.data_ptr<acc_t>();
      to_acc(out.data_ptr<scalar_t>(), dst, rows * len);
      tp = dst;
    }
    for (int64_t r = 0; r < rows; ++r) {
      scan_row<acc_t>(tp + r * len, bias.data() + lat0, len, lat0, row0 + r, mains[seg],
                      use_aux ? &auxs[seg] : nullptr, dead);
    }
  };
  auto make_scratch = [&]() {
    return std::make_pair(at::empty({kTileTokens * kTileLatents}, xc.options()),
                          same_type ? at::Tensor() : at::empty({kTileTokens * kTileLatents}, xc.options().dtype(acc_type)));
  };

  if (segments == 1) {
    for (int64_t tile = 0; tile < n_tiles; ++tile) {
      at::parallel_for(0, n_blocks, 1, [&](int64_t begin, int64_t end) {
        auto [scratch, scratch_acc] = make_scratch();
        for (int64_t blk = begin; blk < end; ++blk) process(blk, tile, 0, scratch, scratch_acc);
      });
    }
  } else {
    at::parallel_for(0, segments, 1, [&](int64_t begin, int64_t end) {
      auto [scratch, scratch_acc] = make_scratch();
      for (int64_t seg = begin; seg < end; ++seg) {
        const int64_t t0 = seg * n_tiles / segments, t1 = (seg + 1) * n_tiles / segments;
        for (int64_t tile = t0; tile < t1; ++tile)
          for (int64_t blk = 0; blk < n_blocks; ++blk) process(blk, tile, seg, scratch, scratch_acc);
      }
    });
  }

  // Merge segments (if any), sort descending, apply ReLU and write the outputs.
  scalar_t* vp = values.data_ptr<scalar_t>();        // [B, k]
  int64_t* ip = indices.data_ptr<int64_t>();         // [B, k]
  scalar_t* avp = use_aux ? aux_values.data_ptr<scalar_t>() : nullptr;  // [B, k_aux]
  int64_t* aip = use_aux ? aux_indices.data_ptr<int64_t>() : nullptr;   // [B, k_aux]
  at::parallel_for(0, B, 64, [&](int64_t begin, int64_t end) {
    std::vector<std::pair<acc_t, int64_t>> all, part;
    auto emit = [&](std::vector<RowHeaps<acc_t>>& heaps, int64_t r, int64_t cap, scalar_t* ov, int64_t* oi) {
      all.clear();
      for (auto& h : heaps) {
        sorted_row(h, r, part);
        all.insert(all.end(), part.begin(), part.end());
      }
      if (heaps.size() > 1) {
        std::sort(all.begin(), all.end(), [](const auto& a, const auto& b) {
          return a.first > b.first || (a.first == b.first && a.second < b.second);
        });
      }
      const int64_t have = std::min<int64_t>(cap, static_cast<int64_t>(all.size()));
      for (int64_t q = 0; q < have; ++q) {
        ov[q] = static_cast<scalar_t>(all[q].first > acc_t(0) ? all[q].first : acc_t(0));
        oi[q] = all[q].second;
      }
      // Fewer candidates than slots (only possible for the aux code): pad with value 0 and index 0.
      for (int64_t q = have; q < cap; ++q) {
        ov[q] = scalar_t(0);
        oi[q] = 0;
      }
    };
    for (int64_t r = begin; r < end; ++r) {
      emit(mains, r, k, vp + r * k, ip + r * k);
      if (use_aux) emit(auxs, r, k_aux, avp + r * k_aux, aip + r * k_aux);
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> topk_encode_cpu(
    const at::Tensor& x, const at::Tensor& W_enc, const at::Tensor& b_enc, const at::Tensor& b_dec, int64_t k,
    const std::optional<at::Tensor>& dead_mask, int64_t k_aux) {
  constexpr const char* op = "topk_encode";
  check_dim(op, "x", x, 2);
  check_dim(op, "W_enc", W_enc, 2);
  check_dim(op, "b_enc", b_enc, 1);
  check_dim(op, "b_dec", b_dec, 1);
  check_float(op, "x", x);
  check_same_dtype(op, "W_enc", W_enc, x, "x");
  check_same_dtype(op, "b_enc", b_enc, x, "x");
  check_same_dtype(op, "b_dec", b_dec, x, "x");
  const int64_t B = x.size(0), d = x.size(1), n = W_enc.size(0);
  TORCH_CHECK_VALUE(W_enc.size(1) == d, op, ": W_enc must have x.shape[1] = ", d, " columns, got shape ", W_enc.sizes());
  TORCH_CHECK_VALUE(b_enc.size(0) == n, op, ": b_enc must have shape [", n, "], got ", b_enc.sizes());
  TORCH_CHECK_VALUE(b_dec.size(0) == d, op, ": b_dec must have shape [", d, "], got ", b_dec.sizes());
  TORCH_CHECK_VALUE(k >= 1 && k <= n, op, ": k must be in [1, ", n, "], got ", k);
  TORCH_CHECK_VALUE(k_aux >= 0 && k_aux <= n, op, ": k_aux must be in [0, ", n, "], got ", k_aux);
  at::Tensor dead;
  if (dead_mask.has_value() && dead_mask->defined()) {
    TORCH_CHECK_TYPE(dead_mask->scalar_type() == at::kBool, op, ": dead_mask must be bool, got ",
                dead_mask->scalar_type());
    TORCH_CHECK_VALUE(dead_mask->dim() == 1 && dead_mask->size(0) == n, op, ": dead_mask must have shape [", n,
                "], got ", dead_mask->sizes());
    dead = dead_mask->contiguous();
  }
  const int64_t ka = dead.defined() ? k_aux : 0;
  auto values = at::empty({B, k}, x.options());
  auto indices = at::empty({B, k}, x.options().dtype(at::kLong));
  auto aux_values = at::empty({B, ka}, x.options());
  auto aux_indices = at::empty({B, ka}, x.options().dtype(at::kLong));
  if (B == 0) return {values, indices, aux_values, aux_indices};

  // This kernel sits below autograd; the ATen calls it makes must not record (or refuse) autograd history.
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  at::Tensor xc = at::sub(x.detach(), b_dec.detach()).contiguous();
  at::Tensor W = W_enc.detach().contiguous();
  at::Tensor be = b_enc.contiguous();
  const bool* dp = (dead.defined() && ka > 0) ? dead.data_ptr<bool>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "topk_encode_cpu", [&] {
    encode_impl<scalar_t>(xc, W, be, k, dp, ka, values, indices, aux_values, aux_indices);
  });
  return {values, indices, aux_values, aux_indices};
}

}  // namespace mi_crow

TORCH_LIBRARY_IMPL(mi_crow, CPU, m) { m.impl("topk_encode", &mi_crow::topk_encode_cpu); }
