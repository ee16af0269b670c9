// Run-time choice of the kernels' instruction-set level (see isa.h). Compiled for the baseline target only.
#include "isa.h"

#include <atomic>

#if defined(MI_CROW_X86)
#include <cpuid.h>
#endif

namespace mi_crow {

namespace {

#if defined(MI_CROW_X86)
// XCR0: which register states the OS saves on a context switch (the CPU may have AVX-512 the OS does not enable).
uint64_t xcr0() {
  uint32_t eax, edx;
  __asm__ volatile("xgetbv" : "=a"(eax), "=d"(edx) : "c"(0));
  return (static_cast<uint64_t>(edx) << 32) | eax;
}

bool bit(uint32_t reg, int b) { return (reg >> b) & 1u; }

Isa detect() {
  uint32_t a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return Isa::baseline;
  // Leaf 1: FMA (ecx 12), POPCNT (23), OSXSAVE (27), AVX (28), F16C (29).
  const bool leaf1 = bit(c, 12) && bit(c, 23) && bit(c, 27) && bit(c, 28) && bit(c, 29);
  if (!leaf1 || __get_cpuid_max(0, nullptr) < 7) return Isa::baseline;
  // SSE, AVX (bits 1, 2) and the three AVX-512 states: opmask, ZMM_Hi256, Hi16_ZMM (bits 5-7).
  const uint64_t x = xcr0();
  if ((x & 0xE6) != 0xE6) return Isa::baseline;
  __cpuid_count(7, 0, a, b, c, d);
  // Leaf 7.0 ebx: BMI1 (3), AVX2 (5), BMI2 (8), AVX512F (16), DQ (17), CD (28), BW (30), VL (31).
  const bool avx512 = bit(b, 3) && bit(b, 5) && bit(b, 8) && bit(b, 16) && bit(b, 17) && bit(b, 28) && bit(b, 30) &&
                      bit(b, 31);
  if (!avx512) return Isa::baseline;
  // Leaf 7.0 edx: AMX-BF16 (22), AMX-TILE (24); XCR0: XTILECFG and XTILEDATA (bits 17, 18).
  const bool amx = bit(d, 22) && bit(d, 24) && ((x >> 17) & 3) == 3;
  __cpuid_count(7, 1, a, b, c, d);
  // Leaf 7.1 eax: AVX512_BF16 (5).
  if (!bit(a, 5)) return Isa::avx512;
  return amx ? Isa::amx : Isa::avx512bf16;
}
#else
Isa detect() { return Isa::baseline; }
#endif

std::atomic<int> g_requested{-1};  // -1: nothing asked for, use the detected level

}  // namespace

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::avx512:
      return "avx512";
    case Isa::avx512bf16:
      return "avx512bf16";
    case Isa::amx:
      return "amx";
    default:
      return "baseline";
  }
}

Isa detected_isa() {
  static const Isa detected = detect();
  return detected;
}

Isa selected_isa() {
  const int requested = g_requested.load(std::memory_order_relaxed);
  const Isa detected = detected_isa();
  if (requested < 0 || requested > static_cast<int>(detected)) return detected;
  return static_cast<Isa>(requested);
}

Isa kernel_isa() {
#if defined(MI_CROW_X86)
  return selected_isa() >= Isa::avx512 ? Isa::avx512 : Isa::baseline;
#else
  return Isa::baseline;
#endif
}

Isa request_isa(Isa isa) {
  g_requested.store(static_cast<int>(isa), std::memory_order_relaxed);
  return selected_isa();
}

}  // namespace mi_crow
