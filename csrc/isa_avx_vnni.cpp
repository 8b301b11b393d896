// AVX-VNNI micro-kernel (Alder Lake and later, Zen 5): vpdpbusd on ymm, the AVX2 variant's layout.
#include <immintrin.h>

#include "kernel_api.h"

#pragma GCC target("avxvnni,avx2,fma,f16c")

#include "isa_ymm.h"

namespace moemix {
namespace {

struct AvxVnni : Ymm {
  using Acc = __m256i;
  static constexpr int kWeight8Offset = 0;  // vpdpbusd sums u8 x s8 into int32 exactly

  static Acc acc_zero() { return _mm256_setzero_si256(); }
  static void dot(Acc& acc, I w, I x) { acc = _mm256_dpbusd_avx_epi32(acc, w, x); }
  static I finish(Acc acc) { return acc; }
  static void dot8(I& acc, I w, I x) { acc = _mm256_dpbusd_avx_epi32(acc, w, x); }
};

}  // namespace
}  // namespace moemix

#include "microkernel.h"

namespace moemix {
namespace {
const char* const kRequires[] = {"avx_vnni", "avx2", "fma", "f16c"};
}
const IsaVariant kAvxVnniVariant = {"avx_vnni", AvxVnni::kLanes * kVectorsPerTile, AvxVnni::kMaxRows,
                                    &gemm_rows<AvxVnni>, kRequires, 4};
}  // namespace moemix
