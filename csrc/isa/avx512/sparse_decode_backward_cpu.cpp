// The AVX-512 build of sparse_decode_backward_cpu.cpp: the same code in namespace mi_crow::isa_avx512, compiled
// for AVX-512 (see csrc/isa.h). Selected at run time on CPUs that have it; the baseline build registers the op.
#define MI_CROW_ISA_VARIANT_AVX512 1
#include "../../sparse_decode_backward_cpu.cpp"
