// The packed-weight GEMM micro-kernel, written once over an ISA traits type.
//
// Include this only from an isa_*.cpp file, after its `#pragma GCC target(...)` and its traits struct:
// every function here is then compiled for that target alone (and has internal linkage, so the variants
// of different translation units never mix).
//
// A traits type `Isa` provides (I: int32 vector, F: float vector, kLanes int32 lanes per vector):
//   load/set1/bcast4/zero, and_/or_masked/srli/slli      integer vector plumbing
//   Acc, acc_zero, dot(acc, w_u8, x_s8), finish(acc)     4 u8 x s8 products per lane, for weights < 8 bits;
//                                                        finish turns a block's Acc into int32 sums
//   dot8(acc32, w_u8, x_s8), kWeight8Offset              the same for 8-bit weights (which may be offset
//                                                        by kWeight8Offset to stay exact)
//   cvt, set1f, zerof, fmadd, fnmadd, load_fp16, load_u8, loadf, storef    the fp32 epilogue
//
// Math per output column n and token t, with x = sx * qx quantized per 32-value block b:
//   y = sum_g sw[g] * (sum_{b in g} sx[b] * dot_b(w, qx) - zw[g] * sum_{b in g} sx[b] * sum(qx_b))
#pragma once

#include "kernel_api.h"

namespace moemix {
namespace {

constexpr int64_t kPrefetchBlocks = 8;  // blocks of K to prefetch ahead in a weight strip

template <class Isa>
inline typename Isa::I extract(typename Isa::I w, int shift, typename Isa::I mask) {
  return Isa::and_(Isa::srli(w, shift), mask);
}

// One 32-value block of K for weights below 8 bits: the Acc of each (row, vector) sees 8 extractions.
template <class Isa, int BITS, int TT>
inline void dot_block_narrow(const int32_t* lo, const int32_t* hi, const int8_t* const* xq,
                             typename Isa::I (&sums)[TT][kVectorsPerTile]) {
  using I = typename Isa::I;
  constexpr int L = Isa::kLanes, V = kVectorsPerTile, tile = L * V;
  typename Isa::Acc acc[TT][V];
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < V; ++v) acc[t][v] = Isa::acc_zero();
  if constexpr (BITS == 4) {
    const I mask = Isa::set1(0x0F0F0F0F);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      I w[V];
      for (int v = 0; v < V; ++v) w[v] = Isa::load(lo + r * tile + L * v);
      for (int j = 0; j < 2; ++j) {
        I xb[TT];
        for (int t = 0; t < TT; ++t) xb[t] = Isa::bcast4(xq[t] + 8 * r + 4 * j);
        for (int v = 0; v < V; ++v) {
          const I wb = extract<Isa>(w[v], 4 * j, mask);
          for (int t = 0; t < TT; ++t) Isa::dot(acc[t][v], wb, xb[t]);
        }
      }
    }
  } else if constexpr (BITS == 2) {
    const I mask = Isa::set1(0x03030303);
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r) {
      I w[V];
      for (int v = 0; v < V; ++v) w[v] = Isa::load(lo + r * tile + L * v);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        I xb[TT];
        for (int t = 0; t < TT; ++t) xb[t] = Isa::bcast4(xq[t] + 16 * r + 4 * j);
        for (int v = 0; v < V; ++v) {
          const I wb = extract<Isa>(w[v], 2 * j, mask);
          for (int t = 0; t < TT; ++t) Isa::dot(acc[t][v], wb, xb[t]);
        }
      }
    }
  } else {  // 3 bits: low 2 bits from two 2-bit rows, high bit from one row of the hi plane
    static_assert(BITS == 3, "unsupported width");
    const I mask2 = Isa::set1(0x03030303);
    const I mask_hi = Isa::set1(0x04040404);
    I h[V];
    for (int v = 0; v < V; ++v) h[v] = Isa::load(hi + L * v);
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r) {
      I w[V];
      for (int v = 0; v < V; ++v) w[v] = Isa::load(lo + r * tile + L * v);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int i = 4 * r + j;  // hi-plane bit index holding this extraction's high bits
        I xb[TT];
        for (int t = 0; t < TT; ++t) xb[t] = Isa::bcast4(xq[t] + 16 * r + 4 * j);
        for (int v = 0; v < V; ++v) {
          const I low = extract<Isa>(w[v], 2 * j, mask2);
          const I high = i >= 2 ? Isa::srli(h[v], i - 2) : Isa::slli(h[v], 2 - i);
          const I wb = Isa::or_masked(low, high, mask_hi);
          for (int t = 0; t < TT; ++t) Isa::dot(acc[t][v], wb, xb[t]);
        }
      }
    }
  }
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < V; ++v) sums[t][v] = Isa::finish(acc[t][v]);
}

// One 32-value block of K for TT activation rows x one tile: sums[t][v] = int32 dot products.
template <class Isa, int BITS, int TT>
inline void dot_block(const int32_t* lo, const int32_t* hi, const int8_t* const* xq,
                      typename Isa::I (&sums)[TT][kVectorsPerTile]) {
  using I = typename Isa::I;
  constexpr int L = Isa::kLanes, V = kVectorsPerTile, tile = L * V;
  if constexpr (BITS == 8) {
    for (int t = 0; t < TT; ++t)
      for (int v = 0; v < V; ++v) sums[t][v] = Isa::zero();
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      I xb[TT];
      for (int t = 0; t < TT; ++t) xb[t] = Isa::bcast4(xq[t] + 4 * r);
      for (int v = 0; v < V; ++v) {
        const I w = Isa::load(lo + r * tile + L * v);
        for (int t = 0; t < TT; ++t) Isa::dot8(sums[t][v], w, xb[t]);
      }
    }
  } else {
    dot_block_narrow<Isa, BITS, TT>(lo, hi, xq, sums);
  }
}

template <class Isa, int BITS, int TT>
void gemm_tile(const PackedWeight& W, int64_t tile, const QuantizedActs& A, const int64_t* act_rows,
               float* const* out, const float* mult) {
  using I = typename Isa::I;
  using F = typename Isa::F;
  constexpr int L = Isa::kLanes, V = kVectorsPerTile;
  constexpr int64_t width = L * V;
  const int64_t R = W.rows(), G = W.groups(), nblocks = W.K / kBlock;
  const int64_t blocks_per_group = W.group / kBlock;
  const int32_t* tile_q = W.q + tile * R * width;
  const int32_t* hi_plane = tile_q + (W.K / 16) * width;  // 3-bit only
  const uint16_t* tile_s = W.scales + tile * G * width;
  const uint8_t* tile_z = W.zeros ? W.zeros + tile * G * width : nullptr;
  // The dot products may see weights offset by kWeight8Offset (8-bit); fold it into the zero point.
  const float offset = BITS == 8 ? static_cast<float>(Isa::kWeight8Offset) : 0.f;
  const F sym_zero = Isa::set1f(static_cast<float>(1 << (BITS - 1)) - offset);
  const F zero_offset = Isa::set1f(offset), one = Isa::set1f(1.f);
  constexpr int64_t rows_per_block = BITS == 3 ? 2 : BITS;  // rows of the (lo) stream per block

  const int8_t* xq[TT];
  const float* xs[TT];
  const float* xsum[TT];
  for (int t = 0; t < TT; ++t) {
    xq[t] = A.q + act_rows[t] * A.K;
    xs[t] = A.scale + act_rows[t] * nblocks;
    xsum[t] = A.bsum + act_rows[t] * nblocks;
  }
  F res[TT][V];
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < V; ++v) res[t][v] = Isa::zerof();

  for (int64_t g = 0; g < G; ++g) {
    F fac[TT][V];
    float zterm[TT];
    for (int t = 0; t < TT; ++t) {
      zterm[t] = 0.f;
      for (int v = 0; v < V; ++v) fac[t][v] = Isa::zerof();
    }
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      const int8_t* xb[TT];
      for (int t = 0; t < TT; ++t) xb[t] = xq[t] + b * kBlock;
      // The strip is contiguous, but each block is only a few cache lines: ask for the ones
      // kPrefetchBlocks ahead so DRAM latency overlaps the arithmetic.
      const char* ahead = reinterpret_cast<const char*>(tile_q + (b + kPrefetchBlocks) * rows_per_block * width);
      for (int64_t line = 0; line < rows_per_block * width * 4; line += 64) __builtin_prefetch(ahead + line, 0, 3);
      if constexpr (BITS == 3) __builtin_prefetch(hi_plane + (b + kPrefetchBlocks) * width, 0, 3);
      I sums[TT][V];
      dot_block<Isa, BITS, TT>(tile_q + b * rows_per_block * width, hi_plane + b * width, xb, sums);
      for (int t = 0; t < TT; ++t) {
        const F s = Isa::set1f(xs[t][b]);
        zterm[t] += xsum[t][b];
        for (int v = 0; v < V; ++v) fac[t][v] = Isa::fmadd(Isa::cvt(sums[t][v]), s, fac[t][v]);
      }
    }
    for (int v = 0; v < V; ++v) {
      const F sw = Isa::load_fp16(tile_s + g * width + L * v);
      const F zw = tile_z ? Isa::fnmadd(one, zero_offset, Isa::load_u8(tile_z + g * width + L * v)) : sym_zero;
      for (int t = 0; t < TT; ++t) {
        const F centered = Isa::fnmadd(zw, Isa::set1f(zterm[t]), fac[t][v]);
        res[t][v] = Isa::fmadd(sw, centered, res[t][v]);
      }
    }
  }
  for (int t = 0; t < TT; ++t) {
    for (int v = 0; v < V; ++v) {
      float* dst = out[t] + L * v;
      if (mult) {
        Isa::storef(dst, Isa::fmadd(Isa::set1f(mult[t]), res[t][v], Isa::loadf(dst)));
      } else {
        Isa::storef(dst, res[t][v]);
      }
    }
  }
}

template <class Isa, int BITS>
void gemm_rows_bits(const PackedWeight& W, int64_t tile, const QuantizedActs& A, const int64_t* act_rows, int64_t n,
                    float* const* out, const float* mult) {
  for (int64_t i = 0; i < n;) {
    const int64_t left = n - i;
    const float* m = mult ? mult + i : nullptr;
    if constexpr (Isa::kMaxRows >= 4) {
      if (left >= 4) {
        gemm_tile<Isa, BITS, 4>(W, tile, A, act_rows + i, out + i, m);
        i += 4;
        continue;
      }
    }
    if (left >= 2) {
      gemm_tile<Isa, BITS, 2>(W, tile, A, act_rows + i, out + i, m);
      i += 2;
    } else {
      gemm_tile<Isa, BITS, 1>(W, tile, A, act_rows + i, out + i, m);
      i += 1;
    }
  }
}

// The variant's entry point: dispatch on the weight width (checked by the core before any call).
template <class Isa>
void gemm_rows(const PackedWeight& W, int64_t tile, const QuantizedActs& A, const int64_t* act_rows, int64_t n,
               float* const* out, const float* mult) {
  switch (W.bits) {
    case 2: return gemm_rows_bits<Isa, 2>(W, tile, A, act_rows, n, out, mult);
    case 3: return gemm_rows_bits<Isa, 3>(W, tile, A, act_rows, n, out, mult);
    case 4: return gemm_rows_bits<Isa, 4>(W, tile, A, act_rows, n, out, mult);
    default: return gemm_rows_bits<Isa, 8>(W, tile, A, act_rows, n, out, mult);
  }
}

}  // namespace
}  // namespace moemix
