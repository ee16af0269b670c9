// Instruction-set levels of the CPU kernels: what the CPU offers, what was asked for, which build of the kernels
// runs.
//
// The extension is built for a portable baseline (setup.py: -march=x86-64-v2, no AVX), so the same binary loads
// on any x86-64 CPU of the last fifteen years. The code that needs more -- the AVX-512 compare/compress scans and
// quickselect of topk_encode, the AVX-512 axpy/dot rows of the decoder kernels (vec.h) -- is compiled a second
// time for AVX-512: each kernel file is included by a wrapper in csrc/isa/avx512/ that defines
// MI_CROW_ISA_VARIANT_AVX512, and the file's code then lands in namespace mi_crow::isa_avx512 under a target
// attribute, next to the baseline build in mi_crow::isa_baseline. Only the baseline build registers the op with
// the dispatcher; its entry point calls one build or the other, per call, from the level chosen at run time.
//
// Levels, ordered: baseline < avx512 (AVX-512 F/BW/DQ/VL/CD with AVX2, FMA, F16C, BMI1/2, POPCNT, and the OS
// saving ZMM state) < avx512bf16 (+ AVX512_BF16) < amx (+ AMX-TILE/AMX-BF16 enabled by the OS). mi_crow's own
// kernels have no code that changes above avx512: what the two upper levels change is the bf16 encoder product,
// oneDNN's bf16 micro-kernel (lowp_gemm.h), used from avx512bf16 up. They are detected and reported so that a
// run's record says what the machine was, and MI_CROW_CPU_ISA accepts them; they run the avx512 build.
//
// Every header whose inline functions a kernel file uses must be included before MI_CROW_ISA_BEGIN (so they are
// compiled for the baseline target in every translation unit, and the linker may keep any copy); vec.h and
// slots.h (the hot helpers) are the exceptions, on purpose: they are included after it, and put their code in the
// build's namespace.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#define MI_CROW_X86 1
#include <immintrin.h>
#endif

namespace mi_crow {

enum class Isa : int { baseline = 0, avx512 = 1, avx512bf16 = 2, amx = 3 };

// "baseline", "avx512", "avx512bf16" or "amx".
const char* isa_name(Isa isa);
// The best level this CPU and OS support (detected once, with cpuid and xgetbv).
Isa detected_isa();
// The level in use: the detected one, or a lower one asked for with request_isa.
Isa selected_isa();
// The build of the kernels that serves the selected level: Isa::baseline or Isa::avx512.
Isa kernel_isa();
// Asks for a level; it is clamped to the detected one. Returns the selected level.
Isa request_isa(Isa isa);

}  // namespace mi_crow

// This translation unit's build of the kernel code: the namespace it goes into and whether AVX-512 code paths are
// compiled. A -march=native build (MI_CROW_NATIVE=1) may have AVX-512 in its baseline build too.
#if defined(MI_CROW_ISA_VARIANT_AVX512)
#define MI_CROW_ISA_PRIMARY 0
#define MI_CROW_ISA isa_avx512
#define MI_CROW_AVX512 1
#else
#define MI_CROW_ISA_PRIMARY 1
#define MI_CROW_ISA isa_baseline
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define MI_CROW_AVX512 1
#endif
#endif

// The AVX-512 build's target, applied to every function defined between MI_CROW_ISA_BEGIN and MI_CROW_ISA_END
// (lambdas and template instantiations of our own templates included; templates of the standard library and
// ATen, defined before, keep the baseline target).
// (The feature list is spelled out in each pragma, on one line: _Pragma takes one string literal, neither a macro
// nor adjacent literals.)
#if defined(MI_CROW_ISA_VARIANT_AVX512)
#if defined(__clang__)
// clang-format off
#define MI_CROW_ISA_BEGIN _Pragma("clang attribute push(__attribute__((target(\"avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx2,fma,f16c,bmi,bmi2,popcnt\"))), apply_to = function)")
// clang-format on
#define MI_CROW_ISA_END _Pragma("clang attribute pop")
#else
#define MI_CROW_ISA_BEGIN             \
  _Pragma("GCC push_options")         \
  _Pragma("GCC target(\"avx512f,avx512bw,avx512dq,avx512vl,avx512cd,avx2,fma,f16c,bmi,bmi2,popcnt\")")
#define MI_CROW_ISA_END _Pragma("GCC pop_options")
#endif
#else
#define MI_CROW_ISA_BEGIN
#define MI_CROW_ISA_END
#endif

// Declares `ret fn params` in every build's namespace (in the baseline translation unit, before dispatching). The
// return type comes last, so that one with commas (std::tuple<...>) needs no parentheses.
#if defined(MI_CROW_X86)
#define MI_CROW_ISA_DECLARE(fn, params, ...) \
  namespace isa_baseline {                  \
  __VA_ARGS__ fn params;                    \
  }                                         \
  namespace isa_avx512 {                    \
  __VA_ARGS__ fn params;                    \
  }
// Calls the build of fn that serves the selected level.
#define MI_CROW_ISA_CALL(fn, ...)                                                                               \
  (::mi_crow::kernel_isa() == ::mi_crow::Isa::avx512 ? ::mi_crow::isa_avx512::fn(__VA_ARGS__)               \
                                                     : ::mi_crow::isa_baseline::fn(__VA_ARGS__))
#else
#define MI_CROW_ISA_DECLARE(fn, params, ...) \
  namespace isa_baseline {                  \
  __VA_ARGS__ fn params;                    \
  }
#define MI_CROW_ISA_CALL(fn, ...) ::mi_crow::isa_baseline::fn(__VA_ARGS__)
#endif
