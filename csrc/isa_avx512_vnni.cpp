// AVX-512 VNNI micro-kernel (Ice Lake / Sapphire Rapids / Zen 4+): vpdpbusd on zmm, 64-column tiles.
#include <immintrin.h>

#include "kernel_api.h"

#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")

namespace moemix {
namespace {

struct Avx512Vnni {
  using I = __m512i;
  using F = __m512;
  using Acc = __m512i;
  static constexpr int kLanes = 16;
  static constexpr int kMaxRows = 4;       // 16 accumulators of 32 zmm
  static constexpr int kWeight8Offset = 0;  // vpdpbusd sums u8 x s8 into int32 exactly
  static constexpr bool kWideBlocks = true;  // 32 zmm: a block's 4 x 4 accumulators fit (dot_block_wide)

  static I load(const int32_t* p) { return _mm512_loadu_si512(p); }
  static I set1(int32_t v) { return _mm512_set1_epi32(v); }
  // A fresh broadcast from memory at every use, as in isa_ymm.h: hoisted broadcasts would spill.
  static I bcast4(const int8_t* p) {
    I r;
    __asm__ volatile("vpbroadcastd %1, %0" : "=v"(r) : "m"(*reinterpret_cast<const int32_t*>(p)));
    return r;
  }
  static I zero() { return _mm512_setzero_si512(); }
  static I and_(I a, I b) { return _mm512_and_si512(a, b); }
  static I or_masked(I low, I high, I mask) { return _mm512_ternarylogic_epi32(low, high, mask, 0xF8); }
  static I srli(I a, int n) { return _mm512_srli_epi32(a, n); }
  static I slli(I a, int n) { return _mm512_slli_epi32(a, n); }

  static Acc acc_zero() { return _mm512_setzero_si512(); }
  static void dot(Acc& acc, I w, I x) { acc = _mm512_dpbusd_epi32(acc, w, x); }
  static I finish(Acc acc) { return acc; }
  static void dot8(I& acc, I w, I x) { acc = _mm512_dpbusd_epi32(acc, w, x); }

  static F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  static F set1f(float v) { return _mm512_set1_ps(v); }
  static F zerof() { return _mm512_setzero_ps(); }
  static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm512_fnmadd_ps(a, b, c); }
  static F load_fp16(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static F load_u8(const uint8_t* p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
  }
  static F loadf(const float* p) { return _mm512_loadu_ps(p); }
  static void storef(float* p, F v) { _mm512_storeu_ps(p, v); }
};

}  // namespace
}  // namespace moemix

#include "microkernel.h"

namespace moemix {
namespace {
const char* const kRequires[] = {"avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx2", "fma", "f16c"};
}
const IsaVariant kAvx512VnniVariant = {"avx512_vnni", Avx512Vnni::kLanes * kVectorsPerTile, Avx512Vnni::kMaxRows,
                                       &gemm_rows<Avx512Vnni>, kRequires, 7};
}  // namespace moemix
