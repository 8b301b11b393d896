// Native x86 kernels for moemix: GEMMs that read 2/3/4/8-bit packed weights directly.
//
// Why this shape: decode on CPU is memory-bound, so the win of a 2-bit expert only shows if
// the kernel streams 2 bits per weight from RAM. Weights are widened to uint8 in registers
// only (shift + mask), multiplied with int8 activations by AVX-512 VNNI (vpdpbusd: 64 MACs per
// instruction), and rescaled per 32-value block (activation scale) and per group (weight scale
// and zero point) in float32.
//
// Layout (made at load by vllm_moemix/layers/kernels/cpu.py, same bytes as the checkpoint):
//   qweight  int32 [N/64][R][64]  tile-major: 64 output columns, R = K*bits/32 packed rows.
//            Rows follow the GPTQ bit stream along K (value k at bits k*bits of a column's stream),
//            except 3-bit: rows [0, K/16) are the low 2 bits as a 2-bit stream and rows
//            [K/16, 3K/32) the high bit, ordered so one extraction lines up with the 2-bit one
//            (see hi_bit_position in cpu.py).
//   scales   fp16  [N/64][G][64], zeros uint8 [N/64][G][64] (absent when symmetric: 2^(bits-1)).
// Activations are quantized per 32-value block to int8 and permuted within 8/16-value windows so a
// 32-bit broadcast matches the 4 bytes one extraction yields per lane (see permute_window).
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kBlock = 32;  // activation quantization block along K
constexpr int64_t kTile = 64;   // output columns per weight tile: 4 AVX-512 int32 vectors
constexpr int kMaxRowsPerCall = 4;
constexpr int64_t kPrefetch = 8;  // blocks of K to prefetch ahead in a weight strip

struct PackedWeight {
  const int32_t* q;
  const uint16_t* scales;  // fp16 bits
  const uint8_t* zeros;    // nullptr: symmetric
  int bits;
  int64_t group;
  int64_t K;
  int64_t N;
  int64_t rows() const { return K * bits / 32; }
  int64_t groups() const { return K / group; }
};

struct QuantizedActs {
  const int8_t* q;       // [rows][K]
  const float* scale;    // [rows][K/32]
  const float* bsum;     // [rows][K/32]: scale * sum(q) over the block, for the zero-point term
  int64_t K;
};

// ---------------------------------------------------------------------------------------------
// AVX-512 VNNI section: plain pointers and intrinsics only (compiled for this target alone).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni,f16c,fma")

inline __m512i bcast4(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// One 32-value block of K for TT activation rows x 64 columns: acc[t][v] += w(u8) . x(s8).
template <int BITS, int TT>
inline void dot_block(const int32_t* lo, const int32_t* hi, const int8_t* const* xq, __m512i (&acc)[TT][4]) {
  if constexpr (BITS == 8) {
#pragma GCC unroll 8
    for (int r = 0; r < 8; ++r) {
      __m512i xb[TT];
      for (int t = 0; t < TT; ++t) xb[t] = bcast4(xq[t] + 4 * r);
      for (int v = 0; v < 4; ++v) {
        const __m512i w = _mm512_loadu_si512(lo + r * kTile + 16 * v);
        for (int t = 0; t < TT; ++t) acc[t][v] = _mm512_dpbusd_epi32(acc[t][v], w, xb[t]);
      }
    }
  } else if constexpr (BITS == 4) {
    const __m512i mask = _mm512_set1_epi32(0x0F0F0F0F);
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) {
      __m512i w[4];
      for (int v = 0; v < 4; ++v) w[v] = _mm512_loadu_si512(lo + r * kTile + 16 * v);
      for (int j = 0; j < 2; ++j) {
        __m512i xb[TT];
        for (int t = 0; t < TT; ++t) xb[t] = bcast4(xq[t] + 8 * r + 4 * j);
        for (int v = 0; v < 4; ++v) {
          const __m512i wb = _mm512_and_si512(_mm512_srli_epi32(w[v], 4 * j), mask);
          for (int t = 0; t < TT; ++t) acc[t][v] = _mm512_dpbusd_epi32(acc[t][v], wb, xb[t]);
        }
      }
    }
  } else if constexpr (BITS == 2) {
    const __m512i mask = _mm512_set1_epi32(0x03030303);
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r) {
      __m512i w[4];
      for (int v = 0; v < 4; ++v) w[v] = _mm512_loadu_si512(lo + r * kTile + 16 * v);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        __m512i xb[TT];
        for (int t = 0; t < TT; ++t) xb[t] = bcast4(xq[t] + 16 * r + 4 * j);
        for (int v = 0; v < 4; ++v) {
          const __m512i wb = _mm512_and_si512(_mm512_srli_epi32(w[v], 2 * j), mask);
          for (int t = 0; t < TT; ++t) acc[t][v] = _mm512_dpbusd_epi32(acc[t][v], wb, xb[t]);
        }
      }
    }
  } else {  // 3 bits: low 2 bits from two 2-bit rows, high bit from one row of the hi plane
    static_assert(BITS == 3, "unsupported width");
    const __m512i mask2 = _mm512_set1_epi32(0x03030303);
    const __m512i mask_hi = _mm512_set1_epi32(0x04040404);
    __m512i h[4];
    for (int v = 0; v < 4; ++v) h[v] = _mm512_loadu_si512(hi + 16 * v);
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r) {
      __m512i w[4];
      for (int v = 0; v < 4; ++v) w[v] = _mm512_loadu_si512(lo + r * kTile + 16 * v);
#pragma GCC unroll 4
      for (int j = 0; j < 4; ++j) {
        const int i = 4 * r + j;  // hi-plane bit index holding this extraction's high bits
        __m512i xb[TT];
        for (int t = 0; t < TT; ++t) xb[t] = bcast4(xq[t] + 16 * r + 4 * j);
        for (int v = 0; v < 4; ++v) {
          const __m512i low = _mm512_and_si512(_mm512_srli_epi32(w[v], 2 * j), mask2);
          const __m512i high = i >= 2 ? _mm512_srli_epi32(h[v], i - 2) : _mm512_slli_epi32(h[v], 2 - i);
          const __m512i wb = _mm512_ternarylogic_epi32(low, high, mask_hi, 0xF8);  // low | (high & mask)
          for (int t = 0; t < TT; ++t) acc[t][v] = _mm512_dpbusd_epi32(acc[t][v], wb, xb[t]);
        }
      }
    }
  }
}

// out[t][0:64] = (or += mult[t] *) sum_k W[k, tile cols] * x_t[k] for TT activation rows.
template <int BITS, int TT>
void gemm_tile(const PackedWeight& W, int64_t tile, const QuantizedActs& A, const int64_t* act_rows,
               float* const* out, const float* mult) {
  const int64_t R = W.rows(), G = W.groups(), nblocks = W.K / kBlock;
  const int64_t blocks_per_group = W.group / kBlock;
  const int32_t* tile_q = W.q + tile * R * kTile;
  const int32_t* hi_plane = tile_q + (W.K / 16) * kTile;  // 3-bit only
  const uint16_t* tile_s = W.scales + tile * G * kTile;
  const uint8_t* tile_z = W.zeros ? W.zeros + tile * G * kTile : nullptr;
  const __m512 sym_zero = _mm512_set1_ps(static_cast<float>(1 << (BITS - 1)));
  const int64_t rows_per_block = BITS == 3 ? 2 : BITS;  // rows of the (lo) stream per block

  const int8_t* xq[TT];
  const float* xs[TT];
  const float* xsum[TT];
  for (int t = 0; t < TT; ++t) {
    xq[t] = A.q + act_rows[t] * A.K;
    xs[t] = A.scale + act_rows[t] * nblocks;
    xsum[t] = A.bsum + act_rows[t] * nblocks;
  }
  __m512 res[TT][4];
  for (int t = 0; t < TT; ++t)
    for (int v = 0; v < 4; ++v) res[t][v] = _mm512_setzero_ps();

  for (int64_t g = 0; g < G; ++g) {
    __m512 fac[TT][4];
    float zterm[TT];
    for (int t = 0; t < TT; ++t) {
      zterm[t] = 0.f;
      for (int v = 0; v < 4; ++v) fac[t][v] = _mm512_setzero_ps();
    }
    for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) {
      __m512i acc[TT][4];
      for (int t = 0; t < TT; ++t)
        for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_setzero_si512();
      const int8_t* xb[TT];
      for (int t = 0; t < TT; ++t) xb[t] = xq[t] + b * kBlock;
      // The strip is contiguous, but each block is only a few cache lines: ask for the ones kPrefetch
      // blocks ahead so DRAM latency overlaps the arithmetic.
      const char* ahead = reinterpret_cast<const char*>(tile_q + (b + kPrefetch) * rows_per_block * kTile);
      for (int64_t line = 0; line < rows_per_block * kTile * 4; line += 64) _mm_prefetch(ahead + line, _MM_HINT_T0);
      if constexpr (BITS == 3) _mm_prefetch(reinterpret_cast<const char*>(hi_plane + (b + kPrefetch) * kTile), _MM_HINT_T0);
      dot_block<BITS, TT>(tile_q + b * rows_per_block * kTile, hi_plane + b * kTile, xb, acc);
      for (int t = 0; t < TT; ++t) {
        const __m512 s = _mm512_set1_ps(xs[t][b]);
        zterm[t] += xsum[t][b];
        for (int v = 0; v < 4; ++v) fac[t][v] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[t][v]), s, fac[t][v]);
      }
    }
    for (int v = 0; v < 4; ++v) {
      const __m512 sw = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(tile_s + g * kTile + 16 * v)));
      const __m512 zw = tile_z ? _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(
                                     _mm_loadu_si128(reinterpret_cast<const __m128i*>(tile_z + g * kTile + 16 * v))))
                               : sym_zero;
      for (int t = 0; t < TT; ++t) {
        const __m512 centered = _mm512_fnmadd_ps(zw, _mm512_set1_ps(zterm[t]), fac[t][v]);
        res[t][v] = _mm512_fmadd_ps(sw, centered, res[t][v]);
      }
    }
  }
  for (int t = 0; t < TT; ++t) {
    for (int v = 0; v < 4; ++v) {
      float* dst = out[t] + 16 * v;
      if (mult) {
        _mm512_storeu_ps(dst, _mm512_fmadd_ps(_mm512_set1_ps(mult[t]), res[t][v], _mm512_loadu_ps(dst)));
      } else {
        _mm512_storeu_ps(dst, res[t][v]);
      }
    }
  }
}

#pragma GCC pop_options
// ---------------------------------------------------------------------------------------------

template <int BITS>
void gemm_rows_bits(const PackedWeight& W, int64_t tile, const QuantizedActs& A, const int64_t* act_rows,
                    int64_t n, float* const* out, const float* mult) {
  for (int64_t i = 0; i < n;) {
    const int64_t left = n - i;
    const float* m = mult ? mult + i : nullptr;
    if (left >= 4) {
      gemm_tile<BITS, 4>(W, tile, A, act_rows + i, out + i, m);
      i += 4;
    } else if (left >= 2) {
      gemm_tile<BITS, 2>(W, tile, A, act_rows + i, out + i, m);
      i += 2;
    } else {
      gemm_tile<BITS, 1>(W, tile, A, act_rows + i, out + i, m);
      i += 1;
    }
  }
}

// One weight tile for n activation rows: the entry point both the MoE and the linear use.
void gemm_rows(const PackedWeight& W, int64_t tile, const QuantizedActs& A, const int64_t* act_rows, int64_t n,
               float* const* out, const float* mult) {
  switch (W.bits) {
    case 2: return gemm_rows_bits<2>(W, tile, A, act_rows, n, out, mult);
    case 3: return gemm_rows_bits<3>(W, tile, A, act_rows, n, out, mult);
    case 4: return gemm_rows_bits<4>(W, tile, A, act_rows, n, out, mult);
    case 8: return gemm_rows_bits<8>(W, tile, A, act_rows, n, out, mult);
    default: TORCH_CHECK(false, "moemix cpu kernel: unsupported width ", W.bits);
  }
}

// Position of value k (within its window) in the permuted activation row, so that the 4 bytes one
// weight extraction puts in a 32-bit lane meet their 4 activations in one broadcast.
inline int64_t permute_window(int64_t k, int bits) {
  if (bits == 8) return k;
  const int64_t window = bits == 4 ? 8 : 16, stride = window / 4;  // values j, j+s, j+2s, j+3s
  const int64_t base = k - k % window, off = k % window;
  return base + 4 * (off % stride) + off / stride;
}

// Quantize one float row to int8 per 32-value block, permuted for a weight width.
void quantize_row(const float* x, int64_t K, int bits, int8_t* q, float* scale, float* bsum) {
  for (int64_t b = 0; b < K / kBlock; ++b) {
    const float* xb = x + b * kBlock;
    float amax = 0.f;
    for (int64_t i = 0; i < kBlock; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t i = 0; i < kBlock; ++i) {
      const int32_t v = static_cast<int32_t>(std::nearbyint(xb[i] * inv));
      q[permute_window(b * kBlock + i, bits)] = static_cast<int8_t>(v);
      sum += v;
    }
    scale[b] = s;
    bsum[b] = s * static_cast<float>(sum);
  }
}

// Row-quantized activations owned by the caller.
struct ActBuffer {
  std::vector<int8_t> q;
  std::vector<float> scale, bsum;
  int64_t K;
  ActBuffer(int64_t rows, int64_t K_) : q(rows * K_), scale(rows * K_ / kBlock), bsum(rows * K_ / kBlock), K(K_) {}
  void quantize(int64_t row, const float* x, int bits) {
    quantize_row(x, K, bits, q.data() + row * K, scale.data() + row * (K / kBlock), bsum.data() + row * (K / kBlock));
  }
  QuantizedActs view() const { return {q.data(), scale.data(), bsum.data(), K}; }
};

int bits_slot(int bits) { return bits == 8 ? 2 : bits == 4 ? 1 : 0; }  // 2/3-bit share a permutation

PackedWeight weight_view(const at::Tensor& q, const at::Tensor& s, const at::Tensor& z, int64_t slot, int bits,
                         int64_t group, int64_t K, int64_t N) {
  const int64_t qstride = K * bits / 32 * N, sstride = K / group * N;
  const bool has_zeros = z.numel() > 0;
  return {q.data_ptr<int32_t>() + slot * qstride,
          reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>()) + slot * sstride,
          has_zeros ? z.data_ptr<uint8_t>() + slot * sstride : nullptr,
          bits, group, K, N};
}

at::Tensor as_float_rows(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

}  // namespace

// y[T, N] = x[T, K] @ W for one packed weight (a quantized nn.Linear).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2, "moemix packed_linear expects [tokens, K]");
  const int64_t T = x.size(0), K = x.size(1), N = qweight.numel() * 32 / (K * bits);
  const at::Tensor xf = as_float_rows(x);
  ActBuffer acts(T, K);
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) acts.quantize(t, xf.data_ptr<float>() + t * K, bits);
  });
  at::Tensor out = at::empty({T, N}, x.options().dtype(at::kFloat));
  const PackedWeight W = weight_view(qweight, scales, zeros, 0, bits, group, K, N);
  const QuantizedActs A = acts.view();
  const int64_t tiles = N / kTile, chunks = (T + kMaxRowsPerCall * 8 - 1) / (kMaxRowsPerCall * 8);
  at::parallel_for(0, tiles * chunks, 1, [&](int64_t b, int64_t e) {
    std::vector<int64_t> rows;
    std::vector<float*> outs;
    for (int64_t task = b; task < e; ++task) {
      const int64_t tile = task % tiles, chunk = task / tiles;
      const int64_t t0 = chunk * kMaxRowsPerCall * 8, t1 = std::min(T, t0 + kMaxRowsPerCall * 8);
      rows.clear();
      outs.clear();
      for (int64_t t = t0; t < t1; ++t) {
        rows.push_back(t);
        outs.push_back(out.data_ptr<float>() + t * N + tile * kTile);
      }
      gemm_rows(W, tile, A, rows.data(), t1 - t0, outs.data(), nullptr);
    }
  });
  return out.to(x.scalar_type());
}

// SwiGLU experts of mixed widths: sum_k topk_weights[t,k] * expert_{ids[t,k]}(x[t]).
// Experts live in per-width groups; *_where[e] = (group, slot). expert_map maps global ids to
// local ones (-1: another rank), empty = identity. routed_tokens[e] counts this call's tokens.
at::Tensor fused_moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                     const at::Tensor& expert_map, at::Tensor& routed_tokens, const at::Tensor& w13_where,
                     const at::Tensor& w2_where, at::TensorList w13_q, at::TensorList w13_s, at::TensorList w13_z,
                     at::IntArrayRef w13_bits, at::IntArrayRef w13_group, at::TensorList w2_q,
                     at::TensorList w2_s, at::TensorList w2_z, at::IntArrayRef w2_bits, at::IntArrayRef w2_group,
                     int64_t intermediate) {
  const int64_t T = x.size(0), H = x.size(1), top_k = topk_ids.size(1), E = w13_where.size(0);
  const int64_t I = intermediate, N13 = 2 * I;
  const at::Tensor xf = as_float_rows(x);
  const at::Tensor ids = topk_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const at::Tensor map = expert_map.numel() ? expert_map.to(at::kLong).contiguous() : expert_map;
  const auto where13 = w13_where.accessor<int64_t, 2>();
  const auto where2 = w2_where.accessor<int64_t, 2>();

  // Sort (token, expert) pairs by local expert: pair p = rows [start[e], start[e+1]).
  std::vector<int64_t> count(E + 1, 0), start(E + 1, 0);
  std::vector<int64_t> local(T * top_k);
  for (int64_t i = 0; i < T * top_k; ++i) {
    int64_t e = ids.data_ptr<int64_t>()[i];
    if (map.numel()) e = map.data_ptr<int64_t>()[e];
    local[i] = e;
    if (e >= 0) ++count[e];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] = start[e] + count[e];
  const int64_t P = start[E];
  std::vector<int64_t> pair_token(P);
  std::vector<float> pair_weight(P);
  {
    std::vector<int64_t> fill(start.begin(), start.end() - 1);
    for (int64_t i = 0; i < T * top_k; ++i) {
      if (local[i] < 0) continue;
      const int64_t p = fill[local[i]]++;
      pair_token[p] = i / top_k;
      pair_weight[p] = wts.data_ptr<float>()[i];
    }
  }
  auto routed = routed_tokens.accessor<int64_t, 1>();
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e) {
    routed[e] += count[e];
    if (count[e]) active.push_back(e);
  }
  at::Tensor out = at::zeros({T, H}, x.options().dtype(at::kFloat));
  if (P == 0) return out.to(x.scalar_type());

  // Stage 0: quantize each token once per activation permutation its experts need.
  bool need[3] = {false, false, false};
  for (int64_t e : active) need[bits_slot(w13_bits[where13[e][0]])] = true;
  const int perm_bits[3] = {2, 4, 8};
  std::vector<ActBuffer> xacts;
  for (int s = 0; s < 3; ++s) xacts.emplace_back(need[s] ? T : 0, H);
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int s = 0; s < 3; ++s)
        if (need[s]) xacts[s].quantize(t, xf.data_ptr<float>() + t * H, perm_bits[s]);
  });

  // Stage 1: gate_up[p] = x[token(p)] @ W13[expert(p)], tasks = (active expert, column tile).
  std::vector<float> gate_up(P * N13);
  const int64_t tiles13 = N13 / kTile;
  at::parallel_for(0, static_cast<int64_t>(active.size()) * tiles13, 1, [&](int64_t b, int64_t e_) {
    std::vector<float*> outs;
    for (int64_t task = b; task < e_; ++task) {
      const int64_t e = active[task / tiles13], tile = task % tiles13;
      const int64_t g = where13[e][0];
      const int bits = static_cast<int>(w13_bits[g]);
      const PackedWeight W = weight_view(w13_q[g], w13_s[g], w13_z[g], where13[e][1], bits, w13_group[g], H, N13);
      outs.clear();
      for (int64_t p = start[e]; p < start[e + 1]; ++p) outs.push_back(gate_up.data() + p * N13 + tile * kTile);
      gemm_rows(W, tile, xacts[bits_slot(bits)].view(), pair_token.data() + start[e], count[e], outs.data(), nullptr);
    }
  });

  // Stage 2: h = silu(gate) * up, quantized for the pair's w2 width.
  ActBuffer hacts(P, I);
  std::vector<int64_t> pair_rows(P);
  at::parallel_for(0, static_cast<int64_t>(active.size()), 1, [&](int64_t b, int64_t e_) {
    std::vector<float> h(I);
    for (int64_t a = b; a < e_; ++a) {
      const int64_t e = active[a];
      const int bits = static_cast<int>(w2_bits[where2[e][0]]);
      for (int64_t p = start[e]; p < start[e + 1]; ++p) {
        const float* gu = gate_up.data() + p * N13;
        for (int64_t i = 0; i < I; ++i) h[i] = gu[i] / (1.f + std::exp(-gu[i])) * gu[I + i];
        hacts.quantize(p, h.data(), bits);
        pair_rows[p] = p;
      }
    }
  });

  // Stage 3: out[token] += weight * h @ W2, tasks = column tiles of H (each owns its columns).
  const int64_t tiles2 = H / kTile;
  at::parallel_for(0, tiles2, 1, [&](int64_t b, int64_t e_) {
    std::vector<float*> outs;
    for (int64_t tile = b; tile < e_; ++tile) {
      for (int64_t e : active) {
        const int64_t g = where2[e][0];
        const PackedWeight W = weight_view(w2_q[g], w2_s[g], w2_z[g], where2[e][1], static_cast<int>(w2_bits[g]),
                                           w2_group[g], I, H);
        outs.clear();
        for (int64_t p = start[e]; p < start[e + 1]; ++p)
          outs.push_back(out.data_ptr<float>() + pair_token[p] * H + tile * kTile);
        // Pairs of one expert have distinct tokens, so the accumulations never alias.
        gemm_rows(W, tile, hacts.view(), pair_rows.data() + start[e], count[e], outs.data(), pair_weight.data() + start[e]);
      }
    }
  });
  return out.to(x.scalar_type());
}

// Registered with the dispatcher (not pybind) so calls skip Python; fake (meta) implementations for
// torch.compile live in vllm_moemix/layers/kernels/cpu.py.
TORCH_LIBRARY_FRAGMENT(moemix, m) {
  m.def("cpu_linear(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, int bits, int group_size) -> Tensor");
  m.def(
      "cpu_fused_moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor expert_map, Tensor(a!) routed_tokens, "
      "Tensor w13_where, Tensor w2_where, Tensor[] w13_qweights, Tensor[] w13_scales, Tensor[] w13_qzeros, "
      "int[] w13_bits, int[] w13_groups, Tensor[] w2_qweights, Tensor[] w2_scales, Tensor[] w2_qzeros, "
      "int[] w2_bits, int[] w2_groups, int intermediate) -> Tensor");
}

TORCH_LIBRARY_IMPL(moemix, CPU, m) {
  m.impl("cpu_linear", &packed_linear);
  m.impl("cpu_fused_moe", &fused_moe);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moemix native CPU kernels (AVX-512 VNNI); importing registers torch.ops.moemix.cpu_*";
}
