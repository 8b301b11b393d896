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
//   kMaxRows, kWideBlocks                                rows per weight load; dot_block_wide or dot_block
//
// Math per output column n and token t, with x = sx * qx quantized per 32-value block b:
//   y = sum_g sw[g] * (sum_{b in g} sx[b] * dot_b(w, qx) - zw[g] * sum_{b in g} sx[b] * sum(qx_b))
#pragma once

#include <algorithm>
#include <type_traits>
#include <utility>

#include "kernel_api.h"

namespace moemix {
namespace {

constexpr int64_t kPrefetchBlocks = 8;  // blocks of K to prefetch ahead in a weight strip

// prefetcht0 as a volatile asm: GCC's dead-code elimination deletes __builtin_prefetch (and _mm_prefetch)
// loops whose only effect is the prefetch -- at -O2 this kernel had none at all.
inline void prefetch(const char* p) { __asm__ volatile("prefetcht0 %0" : : "m"(*p)); }

// Calls f(std::integral_constant<int, E>{}) for E = 0 .. N-1: a compile-time extraction index, so each
// extraction's shifts and masks are constants.
template <class F, int... E>
inline void unrolled(F&& f, std::integer_sequence<int, E...>) {
  (f(std::integral_constant<int, E>{}), ...);
}

// Bit-field moves within every byte (kernel_api.h: byte_mask), by shift and mask on 32-bit lanes: the shift
// crosses bytes, the mask drops what came from a neighbour. field: WIDTH bits at FROM go to TO, the rest zero;
// or_field: low | field(a) (one vpternlogd on AVX-512).
template <class Isa, int S>
inline typename Isa::I shift_right(typename Isa::I a) {
  if constexpr (S > 0) return Isa::srli(a, S);
  else if constexpr (S < 0) return Isa::slli(a, -S);
  else return a;
}

template <class Isa, int FROM, int TO, int WIDTH>
inline typename Isa::I field(typename Isa::I a) {
  return Isa::and_(shift_right<Isa, FROM - TO>(a), Isa::set1(static_cast<int32_t>(byte_mask(TO, WIDTH))));
}

template <class Isa, int FROM, int TO, int WIDTH>
inline typename Isa::I or_field(typename Isa::I low, typename Isa::I a) {
  return Isa::or_masked(low, shift_right<Isa, FROM - TO>(a), Isa::set1(static_cast<int32_t>(byte_mask(TO, WIDTH))));
}

// The packed words of one vector's columns for one 32-value block of K, loaded once, and the 8 extractions
// they hold: extraction E gives 4 u8 weights per lane, meeting activations xq[4E, 4E + 4) (permuted order).
template <class Isa, int BITS>
struct Strip {
  using I = typename Isa::I;
  static constexpr int kRows = BITS == 3 ? 2 : BITS;  // rows of the (lo) stream per block
  I w[kRows];
  I h;  // 3-bit: the hi plane's row

  Strip(const int32_t* lo, const int32_t* hi, int v) {
    constexpr int L = Isa::kLanes, tile = L * kVectorsPerTile;
    for (int r = 0; r < kRows; ++r) w[r] = Isa::load(lo + r * tile + L * v);
    if constexpr (BITS == 3) h = Isa::load(hi + L * v);
  }

  template <int E>
  I extraction() const {
    if constexpr (BITS == 8) {
      return w[E];
    } else if constexpr (BITS == 4) {
      return field<Isa, 4 * (E % 2), 0, 4>(w[E / 2]);
    } else {
      const I low = field<Isa, 2 * (E % 4), 0, 2>(w[E / 4]);
      if constexpr (BITS == 2) return low;
      // 3 bits: the high bit of this extraction's values sits at bit E of each byte of the hi plane
      return or_field<Isa, E, 2, 1>(low, h);
    }
  }
};

// One 32-value block of K for TT activation rows x one tile: fac[t][v] += xscale[t] * (w . qx) per column.
// One vector of columns at a time, so only TT block accumulators and one strip are live (fits 16 ymm).
template <class Isa, int BITS, int TT>
inline void dot_block(const int32_t* lo, const int32_t* hi, const int8_t* const* xq, const typename Isa::F* xscale,
                      typename Isa::F (&fac)[TT][kVectorsPerTile]) {
  using I = typename Isa::I;
#pragma GCC unroll 4
  for (int v = 0; v < kVectorsPerTile; ++v) {
    const Strip<Isa, BITS> strip(lo, hi, v);
    I sums[TT];
    if constexpr (BITS == 8) {
      for (int t = 0; t < TT; ++t) sums[t] = Isa::zero();
      unrolled([&](auto e) {
        for (int t = 0; t < TT; ++t) Isa::dot8(sums[t], strip.template extraction<e>(), Isa::bcast4(xq[t] + 4 * e));
      }, std::make_integer_sequence<int, 8>{});
    } else {
      typename Isa::Acc acc[TT];
      for (int t = 0; t < TT; ++t) acc[t] = Isa::acc_zero();
      unrolled([&](auto e) {
        const I wb = strip.template extraction<e>();
        for (int t = 0; t < TT; ++t) Isa::dot(acc[t], wb, Isa::bcast4(xq[t] + 4 * e));
      }, std::make_integer_sequence<int, 8>{});
      for (int t = 0; t < TT; ++t) sums[t] = Isa::finish(acc[t]);
    }
    for (int t = 0; t < TT; ++t) fac[t][v] = Isa::fmadd(Isa::cvt(sums[t]), xscale[t], fac[t][v]);
  }
}

// dot_block with all of the tile's vectors at once, for ISAs with 32 registers: each activation broadcast feeds
// kVectorsPerTile dot products instead of one (TT x 4 accumulators live), so fewer load and unpack uops per
// multiply-add. Measured on one Ice Lake server core, packed linear K4096 x N4096, 64 token rows: 2-bit 131 -> 171
// GMAC/s, 3-bit 124 -> 138, 4-bit 124 -> 168, 8-bit 123 -> 146; M=1 streaming unchanged.
template <class Isa, int BITS, int TT>
inline void dot_block_wide(const int32_t* lo, const int32_t* hi, const int8_t* const* xq,
                           const typename Isa::F* xscale, typename Isa::F (&fac)[TT][kVectorsPerTile]) {
  using I = typename Isa::I;
  constexpr int V = kVectorsPerTile;
  I sums[TT][V];
  if constexpr (BITS == 8) {
    for (int t = 0; t < TT; ++t)
      for (int v = 0; v < V; ++v) sums[t][v] = Isa::zero();
  } else {
    for (int t = 0; t < TT; ++t)
      for (int v = 0; v < V; ++v) sums[t][v] = Isa::acc_zero();
  }
  unrolled([&](auto e) {
    I wb[V];
    for (int v = 0; v < V; ++v) wb[v] = Strip<Isa, BITS>(lo, hi, v).template extraction<e>();
    for (int t = 0; t < TT; ++t) {
      const I x = Isa::bcast4(xq[t] + 4 * e);
      for (int v = 0; v < V; ++v) {
        if constexpr (BITS == 8) Isa::dot8(sums[t][v], wb[v], x);
        else Isa::dot(sums[t][v], wb[v], x);
      }
    }
  }, std::make_integer_sequence<int, 8>{});
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < V; ++v) {
      const I s = BITS == 8 ? sums[t][v] : Isa::finish(sums[t][v]);
      fac[t][v] = Isa::fmadd(Isa::cvt(s), xscale[t], fac[t][v]);
    }
}

template <class Isa, int BITS, int TT>
void gemm_tile(const PackedWeight& W, int64_t tile, const QuantizedActs& A, const int64_t* act_rows,
               float* const* out, const float* mult) {
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

  // Every line a block reads (lo rows, 3-bit hi-plane row, at a group start the group's scales and zeros) is
  // asked for kPrefetchBlocks ahead, and a strip's first blocks at its start. Measured on an Ice Lake server (one
  // core streaming from RAM): 2-bit 81% -> 95% of the core's bandwidth, 4-bit 93% -> 111% of a torch sum; distances
  // of 2-8 blocks equal, 16-32 worse.
  const auto prefetch_lines = [](const void* p, int64_t bytes) {
    for (int64_t line = 0; line < bytes; line += 64) prefetch(static_cast<const char*>(p) + line);
  };
  const auto prefetch_block = [&](int64_t b) {
    prefetch_lines(tile_q + b * rows_per_block * width, rows_per_block * width * 4);
    if constexpr (BITS == 3) prefetch_lines(hi_plane + b * width, width * 4);
    if (b % blocks_per_group == 0) {
      prefetch_lines(tile_s + b / blocks_per_group * width, width * 2);
      if (tile_z) prefetch_lines(tile_z + b / blocks_per_group * width, width);
    }
  };
  for (int64_t b = 0; b < std::min(kPrefetchBlocks, nblocks); ++b) prefetch_block(b);

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
      if (b + kPrefetchBlocks < nblocks) prefetch_block(b + kPrefetchBlocks);
      F xscale[TT];
      for (int t = 0; t < TT; ++t) {
        xscale[t] = Isa::set1f(xs[t][b]);
        zterm[t] += xsum[t][b];
      }
      if constexpr (Isa::kWideBlocks)
        dot_block_wide<Isa, BITS, TT>(tile_q + b * rows_per_block * width, hi_plane + b * width, xb, xscale, fac);
      else
        dot_block<Isa, BITS, TT>(tile_q + b * rows_per_block * width, hi_plane + b * width, xb, xscale, fac);
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
