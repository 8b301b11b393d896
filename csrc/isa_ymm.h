// Integer plumbing and fp32 epilogue on ymm, shared by the AVX2 and AVX-VNNI micro-kernels.
// Include after the including file's `#pragma GCC target(...)`.
#pragma once

#include <immintrin.h>

#include "kernel_api.h"

namespace moemix {
namespace {

struct Ymm {
  using I = __m256i;
  using F = __m256;
  static constexpr int kLanes = 8;
  static constexpr int kMaxRows = 4;
  static constexpr bool kWideBlocks = false;  // 16 ymm: one vector of a block at a time (dot_block)

  static I load(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static I set1(int32_t v) { return _mm256_set1_epi32(v); }
  // A fresh broadcast from memory at every use (asm volatile): left to itself GCC hoists the 32 broadcasts of
  // a block out of the vector loop, and 32 live registers spill (16 ymm). A load-broadcast is one cheap uop.
  static I bcast4(const int8_t* p) {
    I r;
    __asm__ volatile("vpbroadcastd %1, %0" : "=x"(r) : "m"(*reinterpret_cast<const int32_t*>(p)));
    return r;
  }
  static I zero() { return _mm256_setzero_si256(); }
  static I and_(I a, I b) { return _mm256_and_si256(a, b); }
  static I or_masked(I low, I high, I mask) { return _mm256_or_si256(low, _mm256_and_si256(high, mask)); }
  static I srli(I a, int n) { return _mm256_srli_epi32(a, n); }
  static I slli(I a, int n) { return _mm256_slli_epi32(a, n); }

  static F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static F set1f(float v) { return _mm256_set1_ps(v); }
  static F zerof() { return _mm256_setzero_ps(); }
  static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static F fnmadd(F a, F b, F c) { return _mm256_fnmadd_ps(a, b, c); }
  static F load_fp16(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static F load_u8(const uint8_t* p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
  }
  static F loadf(const float* p) { return _mm256_loadu_ps(p); }
  static void storef(float* p, F v) { _mm256_storeu_ps(p, v); }
};

}  // namespace
}  // namespace moemix
