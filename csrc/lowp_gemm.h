// The run-time choice of the matrix product behind a low-precision (bf16 / fp16) encoder: which library, if any,
// has a fast path for it on this CPU.
//
// The precision contract (mi_crow/ops/reference.py) is: operands rounded to bf16/fp16, products accumulated in
// float32, a float32 result. Three ways to compute exactly that:
//
//   onednn  oneDNN's batch-reduce GEMM micro-kernel (at::native::cpublas::brgemm, bf16 x bf16 -> f32), on B packed
//           by us in the VNNI pair layout. It uses the CPU's bf16 dot-product instructions (AVX512_BF16, or AMX on
//           Intel CPUs that have it) whatever the vendor: the same library that torch.matmul uses for bf16 on such
//           CPUs. Chosen for bf16 when the selected instruction-set level (isa.h) is avx512bf16 or amx and a
//           self-check of the layout passes on first use (else the next choice is taken).
//   mkl     MKL's cblas_gemm_bf16bf16f32 / cblas_gemm_f16f16f32. Fast where MKL has a path for the CPU (Intel with
//           AMX); on other CPUs it widens internally and is slower than its own float32 product.
//   fp32    widen the rounded operands to float32 and run the float32 product (MKL's packed sgemm). Exact for the
//           contract: a product of two bf16 (8-bit significand) or fp16 (11-bit) numbers is exact in float32, so
//           the result is the low-precision product accumulated in float32. The choice on CPUs without bf16
//           instructions, where it costs about what the float32 encoder costs.
//
// MI_CROW_LOWP_GEMM (read by mi_crow.ops.registration) asks for one of them; a request the CPU or the torch build
// cannot serve falls back to the automatic choice.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>

namespace mi_crow {

enum class LowpGemm : int { automatic = -1, onednn = 0, mkl = 1, fp32 = 2 };

// "auto", "onednn", "mkl" or "fp32".
const char* lowp_gemm_name(LowpGemm g);
// Whether the library is usable here (onednn: the CPU has bf16 instructions at the selected level and the
// self-check passed; mkl: the torch build exports MKL's mixed-precision GEMMs; fp32: always).
bool lowp_gemm_available(LowpGemm g, bool half);
// The product used for bf16 (half = false) or fp16 (half = true) operands: the request if available, else the
// automatic choice.
LowpGemm lowp_gemm(bool half);
// Asks for a product (LowpGemm::automatic: the automatic choice). Returns the one bf16 now uses.
LowpGemm request_lowp_gemm(LowpGemm g);

// The VNNI strip layout that onednn_bf16_strip reads: a strip of kStripLatents latents of W [n, d] (row-major
// bf16) as [d / 2][kStripLatents][2], latents past the end zero. d must be even.
constexpr int64_t kStripLatents = 64;
void pack_vnni_strip(const c10::BFloat16* W, int64_t d, int64_t lat0, int64_t count, c10::BFloat16* out);
// C[rows, kStripLatents] (leading dimension ldc, float32, overwritten) = A[rows, d] (bf16, leading dimension
// lda) @ strip, with oneDNN's micro-kernel. Only when lowp_gemm(false) == LowpGemm::onednn.
void onednn_bf16_strip(int64_t rows, int64_t d, const c10::BFloat16* A, int64_t lda, const c10::BFloat16* strip,
                       float* C, int64_t ldc);
// Whether onednn_bf16_strip serves depth d (even, and self-checked for its tail when not a multiple of 32).
bool onednn_supports_depth(int64_t d);
// Releases the micro-kernel's per-thread hardware state (the AMX tile configuration); call at the end of a task
// that used onednn_bf16_strip.
void onednn_release();

}  // namespace mi_crow
