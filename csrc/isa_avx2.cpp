// AVX2 + FMA + F16C micro-kernel (Haswell and later, Zen 1-3): 32-column tiles on ymm.
//
// No u8 x s8 -> int32 instruction here: vpmaddubsw multiplies u8 weights by s8 activations into int16
// pair sums, vpmaddwd with ones widens them. Below 8 bits a pair is at most 2 * 15 * 127 = 3810, so the
// int16 sums of a whole 32-value block (8 extractions, <= 30480) are exact and widen once per block.
// 8-bit weights would saturate (2 * 255 * 127): they run as w - 128 in s8 through the sign trick
// (|w - 128| <= 128 as u8 times sign-adjusted activations, <= 32512 a pair) and widen at once.
#include <immintrin.h>

#include "kernel_api.h"

#pragma GCC target("avx2,fma,f16c")

#include "isa_ymm.h"

namespace moemix {
namespace {

struct Avx2 : Ymm {
  using Acc = __m256i;  // int16 pair sums of one block
  static constexpr int kWeight8Offset = 128;

  static Acc acc_zero() { return _mm256_setzero_si256(); }
  // The empty asm keeps the adds in program order: GCC otherwise reassociates a block's 8 int16 adds into a
  // tree that computes every product first, and with 4 rows x 8 products live the registers spill.
  static void dot(Acc& acc, I w, I x) {
    acc = _mm256_add_epi16(acc, _mm256_maddubs_epi16(w, x));
    __asm__("" : "+x"(acc));
  }
  static I finish(Acc acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
  static void dot8(I& acc, I w, I x) {
    const I ws = _mm256_xor_si256(w, _mm256_set1_epi8(static_cast<char>(0x80)));  // w - 128 as s8
    const I pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(ws), _mm256_sign_epi8(x, ws));
    acc = _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
    __asm__("" : "+x"(acc));  // program order, as in dot
  }
};

}  // namespace
}  // namespace moemix

#include "microkernel.h"

namespace moemix {
namespace {
const char* const kRequires[] = {"avx2", "fma", "f16c"};
}
const IsaVariant kAvx2Variant = {"avx2", Avx2::kLanes * kVectorsPerTile, Avx2::kMaxRows, &gemm_rows<Avx2>,
                                 kRequires, 3};
}  // namespace moemix
