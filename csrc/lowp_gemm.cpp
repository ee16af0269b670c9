// The run-time choice of the low-precision encoder product (see lowp_gemm.h). Compiled once, for the baseline
// target: the heavy lifting is in oneDNN / MKL, which pick their own instructions.
#include "lowp_gemm.h"

#include <ATen/native/CPUBlas.h>
#include <c10/util/Exception.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <vector>

#include "isa.h"

// MKL's mixed-precision GEMMs (weak: absent from a torch without MKL). Declared the same way in
// topk_encode_cpu.cpp, which calls them.
extern "C" {
void cblas_gemm_bf16bf16f32(int layout, int transa, int transb, int m, int n, int k, float alpha,
                            const uint16_t* a, int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc)
    __attribute__((weak));
void cblas_gemm_f16f16f32(int layout, int transa, int transb, int m, int n, int k, float alpha, const uint16_t* a,
                          int lda, const uint16_t* b, int ldb, float beta, float* c, int ldc) __attribute__((weak));
}

namespace mi_crow {

namespace {

std::atomic<int> g_requested{static_cast<int>(LowpGemm::automatic)};

// Small integers: every product and sum below is exact in float32, so the check can demand equality.
float check_value(int64_t i, int64_t j, int salt) { return static_cast<float>(((i * 7 + j * 13 + salt) % 9) - 4); }

// One product through onednn_bf16_strip (more rows than a token block, with a tail; a strip with a latent tail;
// depth d) compared exactly with a plain loop. Any exception (a torch without the oneDNN micro-kernel, a CPU it
// refuses) or a wrong number disables it.
bool onednn_self_check(int64_t d) {
  try {
    const int64_t rows = 261, n = 50, ldc = kStripLatents + 3;
    std::vector<c10::BFloat16> A(rows * d), W(n * d), strip(d * kStripLatents);
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t k = 0; k < d; ++k) A[i * d + k] = c10::BFloat16(check_value(i, k, 1));
    for (int64_t j = 0; j < n; ++j)
      for (int64_t k = 0; k < d; ++k) W[j * d + k] = c10::BFloat16(check_value(j, k, 5));
    pack_vnni_strip(W.data(), d, 0, n, strip.data());
    std::vector<float> C(rows * ldc, -1.0f);
    onednn_bf16_strip(rows, d, A.data(), d, strip.data(), C.data(), ldc);
    onednn_release();
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < kStripLatents; ++j) {
        float want = 0.0f;
        if (j < n)
          for (int64_t k = 0; k < d; ++k) want += static_cast<float>(A[i * d + k]) * static_cast<float>(W[j * d + k]);
        if (C[i * ldc + j] != want) return false;
      }
      // Nothing written past the strip.
      for (int64_t j = kStripLatents; j < ldc; ++j)
        if (C[i * ldc + j] != -1.0f) return false;
    }
    return true;
  } catch (const std::exception&) {
    return false;
  }
}

bool onednn_ok() {
  // The instructions first (selected level, so MI_CROW_CPU_ISA=avx512 turns this off), then the self-check, once.
  if (selected_isa() < Isa::avx512bf16) return false;
  static const bool ok = onednn_self_check(96);
  return ok;
}

}  // namespace

bool onednn_supports_depth(int64_t d) {
  if (d <= 0 || d % 2 != 0 || !onednn_ok()) return false;
  if (d % 32 == 0) return true;
  // A depth that is not a whole number of AMX tile rows (32 bf16) takes the micro-kernel's tail path: checked
  // once on its own.
  static const bool tail_ok = onednn_self_check(98);
  return tail_ok;
}

namespace {

LowpGemm automatic_choice(bool half) {
  if (!half && onednn_ok()) return LowpGemm::onednn;
  // fp16: MKL's f16 path uses AMX-FP16 / AVX512-FP16 on the Intel CPUs that have them (AMX-BF16 CPUs are the
  // ones among those this detection sees); elsewhere the widened float32 product is faster.
  if (half && selected_isa() >= Isa::amx && lowp_gemm_available(LowpGemm::mkl, true)) return LowpGemm::mkl;
  return LowpGemm::fp32;
}

}  // namespace

const char* lowp_gemm_name(LowpGemm g) {
  switch (g) {
    case LowpGemm::onednn:
      return "onednn";
    case LowpGemm::mkl:
      return "mkl";
    case LowpGemm::fp32:
      return "fp32";
    default:
      return "auto";
  }
}

bool lowp_gemm_available(LowpGemm g, bool half) {
  switch (g) {
    case LowpGemm::onednn:
      return !half && onednn_ok();
    case LowpGemm::mkl:
      return half ? cblas_gemm_f16f16f32 != nullptr : cblas_gemm_bf16bf16f32 != nullptr;
    case LowpGemm::fp32:
      return true;
    default:
      return false;
  }
}

LowpGemm lowp_gemm(bool half) {
  const auto requested = static_cast<LowpGemm>(g_requested.load(std::memory_order_relaxed));
  if (requested != LowpGemm::automatic && lowp_gemm_available(requested, half)) return requested;
  return automatic_choice(half);
}

LowpGemm request_lowp_gemm(LowpGemm g) {
  g_requested.store(static_cast<int>(g), std::memory_order_relaxed);
  return lowp_gemm(false);
}

void pack_vnni_strip(const c10::BFloat16* W, int64_t d, int64_t lat0, int64_t count, c10::BFloat16* out) {
  // A pair of bf16 (k = 2p, 2p + 1) is one 32-bit word: the strip is the [count, d / 2] block of words transposed.
  const int64_t pairs = d / 2;
  uint32_t* o = reinterpret_cast<uint32_t*>(out);
  for (int64_t j = 0; j < kStripLatents; ++j) {
    if (j < count) {
      const c10::BFloat16* row = W + (lat0 + j) * d;
      for (int64_t p = 0; p < pairs; ++p) {
        uint32_t word;
        std::memcpy(&word, row + 2 * p, sizeof(word));
        o[p * kStripLatents + j] = word;
      }
    } else {
      for (int64_t p = 0; p < pairs; ++p) o[p * kStripLatents + j] = 0u;
    }
  }
}

void onednn_bf16_strip(int64_t rows, int64_t d, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* strip,
                       float* C, int64_t ldc) {
  at::native::cpublas::brgemm(rows, kStripLatents, d, lda, kStripLatents, ldc, /*add_C=*/false, A, strip, C,
                              /*is_vnni=*/true);
}

void onednn_release() { at::native::cpublas::brgemm_release(/*is_vnni=*/true); }

}  // namespace mi_crow
