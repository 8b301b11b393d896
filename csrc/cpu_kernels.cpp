// Native x86 kernels for moemix: GEMMs that read 2/3/4/8-bit packed weights directly.
//
// Why this shape: decode on CPU is memory-bound, so the win of a 2-bit expert only shows if the kernel
// streams 2 bits per weight from RAM. Weights are widened to uint8 in registers only (shift + mask),
// multiplied with int8 activations, and rescaled per 32-value block (activation scale) and per group
// (weight scale and zero point) in float32.
//
// This file is the ISA-neutral core, compiled for baseline x86-64: CPU feature detection, the weight
// layout (repack), activation quantization, expert sorting and the gate/up (+ bias) -> gated activation
// (SiLU or GPT-OSS swigluoai) -> down (+ bias) staging,
// threading and routing counts. Only the inner GEMM over one weight tile is per ISA (isa_*.cpp, one
// template in microkernel.h), reached through an IsaVariant chosen at run time: the binary never runs
// an instruction the CPU lacks, whatever it was built on.
#include <cpuid.h>
#ifdef __linux__
#include <sys/mman.h>
#endif
#include <emmintrin.h>
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

#include "kernel_api.h"

using moemix::IsaVariant;
using moemix::kBlock;
using moemix::PackedWeight;
using moemix::QuantizedActs;

namespace {

constexpr int kRowsPerTask = 32;  // activation rows one linear task walks per weight tile

// Tasks per thread so that each thread gets at least ~128K multiply-adds: below that, waking the other
// threads costs more than the work (tiny models, where per-step overhead sets decode speed), and
// at::parallel_for runs a range shorter than its grain inline.
constexpr int64_t kMinWorkPerThread = 1 << 17;

int64_t grain_for(int64_t work_per_task) {
  return std::max<int64_t>(1, kMinWorkPerThread / std::max<int64_t>(1, work_per_task));
}

// Estimated cost of one weight tile (K x tile) for `rows` activation rows, in multiply-adds: the rows'
// arithmetic plus streaming the weights, where a weight of b bits costs about b multiply-adds (a byte of DRAM
// bandwidth per ~8 int8 multiply-adds). At decode (1 row) the widths dominate, at prefill the rows.
double tile_cost(int bits, int64_t K, int64_t tile, int64_t rows) {
  return static_cast<double>(K) * static_cast<double>(tile) * static_cast<double>(rows + bits);
}

// Splits tasks [0, sum(units)) -- `units[g]` tasks of cost `unit_cost[g]` for each group g, in order --
// into contiguous ranges of about equal cost, one per thread (fewer when the work is small: waking a thread
// costs more than ~kMinWorkPerThread). Returns the range bounds.
std::vector<int64_t> balanced_ranges(const std::vector<double>& unit_cost, const std::vector<int64_t>& units) {
  double total = 0;
  int64_t tasks = 0;
  for (size_t g = 0; g < unit_cost.size(); ++g) {
    total += unit_cost[g] * static_cast<double>(units[g]);
    tasks += units[g];
  }
  const int64_t parts = std::clamp<int64_t>(static_cast<int64_t>(total / kMinWorkPerThread), 1,
                                            std::min<int64_t>(at::get_num_threads(), std::max<int64_t>(tasks, 1)));
  std::vector<int64_t> bounds{0};
  double done = 0;
  int64_t task = 0;
  for (size_t g = 0; g < unit_cost.size(); ++g) {
    for (int64_t j = 0; j < units[g]; ++j) {
      done += unit_cost[g];
      ++task;
      const auto next = static_cast<int64_t>(bounds.size());
      if (next < parts && done >= total * static_cast<double>(next) / static_cast<double>(parts))
        bounds.push_back(task);
    }
  }
  if (bounds.back() != tasks) bounds.push_back(tasks);
  return bounds;
}

// Runs fn(b, e) for each range [bounds[i], bounds[i + 1]) on its own thread.
template <class Fn>
void parallel_ranges(const std::vector<int64_t>& bounds, const Fn& fn) {
  const auto n = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
    for (int64_t r = b; r < e; ++r) fn(bounds[r], bounds[r + 1]);
  });
}

// ---------------------------------------------------------------------------------------------
// Run-time ISA selection: cpuid for the instructions, xgetbv for the OS saving the register state.

struct CpuFeatures {
  std::vector<std::string> flags;  // /proc/cpuinfo names of what this CPU and OS can run
  bool has(const char* flag) const { return std::find(flags.begin(), flags.end(), flag) != flags.end(); }
};

CpuFeatures detect_features() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool fma = c >> 12 & 1, osxsave = c >> 27 & 1, avx = c >> 28 & 1, f16c = c >> 29 & 1;
  uint64_t xcr0 = 0;
  if (osxsave) {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  }
  const bool os_ymm = (xcr0 & 0x6) == 0x6;     // SSE + AVX state
  const bool os_zmm = (xcr0 & 0xE6) == 0xE6;   // + opmask, ZMM_Hi256, Hi16_ZMM
  unsigned b7 = 0, c7 = 0, a71 = 0;
  if (__get_cpuid_count(7, 0, &a, &b, &c, &d)) {
    b7 = b;
    c7 = c;
  }
  if (__get_cpuid_count(7, 1, &a, &b, &c, &d)) a71 = a;
  auto add = [&](const char* name, bool ok) {
    if (ok) f.flags.emplace_back(name);
  };
  add("avx2", os_ymm && avx && (b7 >> 5 & 1));
  add("fma", os_ymm && fma);
  add("f16c", os_ymm && f16c);
  add("avx_vnni", os_ymm && (a71 >> 4 & 1));
  add("avx512f", os_zmm && (b7 >> 16 & 1));
  add("avx512bw", os_zmm && (b7 >> 30 & 1));
  add("avx512vl", os_zmm && (b7 >> 31 & 1));
  add("avx512_vnni", os_zmm && (c7 >> 11 & 1));
  return f;
}

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect_features();
  return features;
}

// Fastest first: the default choice is the first one the CPU supports.
const IsaVariant* const kVariants[] = {&moemix::kAvx512VnniVariant, &moemix::kAvxVnniVariant, &moemix::kAvx2Variant};

std::vector<std::string> missing_features(const IsaVariant& v) {
  std::vector<std::string> missing;
  for (int i = 0; i < v.num_requires; ++i)
    if (!cpu_features().has(v.requires[i])) missing.emplace_back(v.requires[i]);
  return missing;
}

int64_t variant_index(c10::string_view name) {
  for (size_t i = 0; i < std::size(kVariants); ++i)
    if (name == kVariants[i]->name) return static_cast<int64_t>(i);
  TORCH_CHECK(false, "unknown moemix cpu kernel variant '", std::string(name), "'");
}

const IsaVariant& find_variant(c10::string_view name) { return *kVariants[variant_index(name)]; }

// Variant `index` for an op call, refusing one this CPU cannot run (never reached through the Python selector,
// which only picks supported variants; this guards direct calls). Checked once per variant.
const IsaVariant& runnable_variant(int64_t index) {
  static const std::vector<std::vector<std::string>> missing = [] {
    std::vector<std::vector<std::string>> m;
    for (const IsaVariant* v : kVariants) m.push_back(missing_features(*v));
    return m;
  }();
  TORCH_CHECK(index >= 0 && index < static_cast<int64_t>(std::size(kVariants)), "moemix cpu kernel: variant index ",
              index, " out of range");
  TORCH_CHECK(missing[index].empty(), "moemix cpu kernel variant ", kVariants[index]->name, " needs ",
              c10::Join(", ", missing[index]), ", which this CPU lacks");
  return *kVariants[index];
}

const IsaVariant& variant(c10::string_view name) { return runnable_variant(variant_index(name)); }

void check_bits(int64_t bits) {
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "moemix cpu kernel: unsupported width ", bits);
}

// ---------------------------------------------------------------------------------------------
// Weight layout (the one owner of it; kernel_api.h describes it).

// Bit of the 32-bit hi-plane word holding value k's high bit (k within its 32-value chunk): the 2-bit
// plane's extraction j of word r yields, in byte t, value 16r + j + 4t; putting that value's high bit at
// bit 8t + 4r + j lets the kernel fetch it with the same byte mask after one shift.
inline int hi_bit_position(int k) {
  const int r = k / 16, rest = k % 16, j = rest % 4, t = rest / 4;
  return 8 * t + 4 * r + j;
}

// GPTQ 3-bit stream [3K/32, N] -> [2-bit plane (K/16 rows); hi plane (K/32 rows)], same size.
void split_3bit(const uint32_t* in, uint32_t* out, int64_t K, int64_t N) {
  uint32_t* low = out;
  uint32_t* high = out + (K / 16) * N;
  std::memset(out, 0, sizeof(uint32_t) * (K / 16 + K / 32) * N);
  for (int64_t k = 0; k < K; ++k) {
    const int64_t bit = 3 * k, word = bit / 32, shift = bit % 32;
    const uint32_t* row = in + word * N;
    const uint32_t* next = shift > 29 ? in + (word + 1) * N : nullptr;
    uint32_t* lo_row = low + (k / 16) * N;
    uint32_t* hi_row = high + (k / 32) * N;
    const int lo_shift = 2 * (k % 16), hi_shift = hi_bit_position(static_cast<int>(k % 32));
    for (int64_t n = 0; n < N; ++n) {
      uint64_t bits = row[n] >> shift;
      if (next) bits |= static_cast<uint64_t>(next[n]) << (32 - shift);
      const uint32_t v = static_cast<uint32_t>(bits) & 7u;
      lo_row[n] |= (v & 3u) << lo_shift;
      hi_row[n] |= (v >> 2) << hi_shift;
    }
  }
}

// A tensor whose pages are transparent huge pages where the kernel allows it (2 MB pages over the buffer's
// aligned interior, asked for before the first write). Decode streams every routed expert once per token from
// a fresh place: with 4 KB pages that is a TLB miss and page walk every 4 KB. Measured on an Ice Lake server
// (in-process A/B, 2.5-bit layers at M=1): Qwen3-30B-A3B, DeepSeek-V2-Lite and GLM-4.5-Air 2-7% faster.
// Linux only (and only where THP is not disabled); elsewhere plain memory.
at::Tensor empty_on_huge_pages(at::IntArrayRef shape, const at::TensorOptions& options) {
  at::Tensor t = at::empty(shape, options);
#ifdef __linux__
  constexpr uintptr_t kHuge = uintptr_t{1} << 21;
  const auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  const uintptr_t first = (begin + kHuge - 1) & ~(kHuge - 1), last = (begin + t.nbytes()) & ~(kHuge - 1);
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_HUGEPAGE);  // advice: may fail
#endif
  return t;
}

// [..., R, N] -> [..., N/tile, R, tile] contiguous: one column strip per tile streams sequentially. `gated`: the
// experts' gate/up columns [gate (I) | up (I)] are interleaved per activation block first -- [gate 0:32 | up 0:32 |
// gate 32:64 | up 32:64 | ...] -- so one 64-column chunk yields one 32-value block of the gated activation and the
// thread that computes a chunk also activates and quantizes it (fused_moe, stage 1). Both permutations are one
// strided view, so the copy into `dst` (contiguous, t's element count and dtype; else a fresh tensor on huge
// pages) is the only pass and no intermediate is made.
at::Tensor tile_major(const at::Tensor& t, int64_t tile, bool gated, const at::Tensor& dst) {
  const int64_t R = t.size(-2), N = t.size(-1);
  TORCH_CHECK(N % tile == 0, "moemix cpu repack: ", N, " columns are not a multiple of the tile width ", tile);
  std::vector<int64_t> lead(t.sizes().begin(), t.sizes().end() - 2), dims(lead.size());
  std::iota(dims.begin(), dims.end(), 0);
  const int64_t L = static_cast<int64_t>(lead.size());
  const auto shaped = [&](std::initializer_list<int64_t> tail) {
    std::vector<int64_t> shape = lead;
    shape.insert(shape.end(), tail);
    return t.reshape(shape);
  };
  const auto permuted = [&](const at::Tensor& v, std::initializer_list<int64_t> tail) {
    std::vector<int64_t> order = dims;
    for (int64_t d : tail) order.push_back(L + d);
    return v.permute(order);
  };
  at::Tensor strips;
  if (!gated) {
    strips = permuted(shaped({R, N / tile, tile}), {1, 0, 2});  // [..., N/tile, R, tile]
  } else {
    TORCH_CHECK(N % (2 * kBlock) == 0, "moemix cpu repack: gate/up width ", N, " is not a multiple of ", 2 * kBlock);
    TORCH_CHECK(tile == kBlock || tile == 2 * kBlock, "moemix cpu repack: gated tiles are 32 or 64 columns, not ", tile);
    const at::Tensor halves = shaped({R, 2, N / (2 * kBlock), kBlock});  // [..., R, gate|up, chunk, 32]
    strips = tile == 2 * kBlock ? permuted(halves, {2, 0, 1, 3})   // [..., chunk, R, gate|up, 32]: a tile per chunk
                                : permuted(halves, {2, 1, 0, 3});  // [..., chunk, gate|up, R, 32]: a tile per half
  }
  std::vector<int64_t> shape = lead;
  shape.insert(shape.end(), {N / tile, R, tile});
  at::Tensor out = dst.defined() ? dst : empty_on_huge_pages(shape, t.options());
  out.view(strips.sizes()).copy_(strips);
  return out.view(shape);
}

// One linear's (or a stack of experts') tensors in the layout of `isa`; scales and zeros keep their dtype.
// `gated`: the experts' gate/up projection, whose columns fused_moe reads interleaved (tile_major).
// `dst`: where to write the three (contiguous, the inputs' sizes and dtypes; pack_experts' buffer), else fresh.
std::vector<at::Tensor> repack_into(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& qzeros,
                                    int64_t bits, const std::string& isa, bool gated,
                                    const std::array<at::Tensor, 3>& dst) {
  check_bits(bits);
  const IsaVariant& v = find_variant(isa);  // pure data movement: any variant's layout can be made anywhere
  TORCH_CHECK(qweight.scalar_type() == at::kInt, "moemix cpu repack: qweight must be int32");
  at::Tensor q = qweight.contiguous();
  if (bits == 3) {
    const int64_t R = q.size(-2), N = q.size(-1), K = R * 32 / 3, mats = q.numel() / (R * N);
    at::Tensor split = at::empty_like(q);
    const auto* src = reinterpret_cast<const uint32_t*>(q.data_ptr<int32_t>());
    auto* dst = reinterpret_cast<uint32_t*>(split.data_ptr<int32_t>());
    at::parallel_for(0, mats, 1, [&](int64_t b, int64_t e) {
      for (int64_t m = b; m < e; ++m) split_3bit(src + m * R * N, dst + m * R * N, K, N);
    });
    q = split;
  }
  const auto layout = [&](const at::Tensor& t, const at::Tensor& to) { return tile_major(t, v.tile, gated, to); };
  return {layout(q, dst[0]), layout(scales, dst[1]), qzeros.numel() ? layout(qzeros, dst[2]) : qzeros};
}

std::vector<at::Tensor> repack(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& qzeros,
                               int64_t bits, const std::string& isa, bool gated) {
  return repack_into(qweight, scales, qzeros, bits, isa, gated, {});
}

// ---------------------------------------------------------------------------------------------
// Activations: int8 per 32-value block, permuted for a weight width.

// Position of value k (within its window) in the permuted activation row, so that the 4 bytes one
// weight extraction puts in a 32-bit lane meet their 4 activations in one broadcast.
inline int64_t permute_window(int64_t k, int bits) {
  if (bits == 8) return k;
  const int64_t window = bits == 4 ? 8 : 16, stride = window / 4;  // values j, j+s, j+2s, j+3s
  const int64_t base = k - k % window, off = k % window;
  return base + 4 * (off % stride) + off / stride;
}

// permute_window within one 32-value block (windows divide the block), per permutation (bits_slot order).
struct BlockPermutation {
  uint8_t pos[3][kBlock];
  BlockPermutation() {
    const int bits[3] = {2, 4, 8};
    for (int s = 0; s < 3; ++s)
      for (int k = 0; k < kBlock; ++k) pos[s][k] = static_cast<uint8_t>(permute_window(k, bits[s]));
  }
};
const BlockPermutation kBlockPermutation;

// SSE2 only (this file is built for baseline x86-64): decode quantizes every activation row once per layer,
// and a libm call per value (nearbyint) cost more than a 2-bit expert's whole GEMM at M=1. cvtps2dq rounds
// half to even under the default MXCSR, as nearbyint does. Quantizes `nblocks` consecutive 32-value blocks.
void quantize_blocks(const float* x, int64_t nblocks, int bits, int8_t* q, float* scale, float* bsum) {
  const uint8_t* pos = kBlockPermutation.pos[bits == 8 ? 2 : bits == 4 ? 1 : 0];
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < nblocks; ++b) {
    const float* xb = x + b * kBlock;
    __m128 vmax = _mm_setzero_ps();
    for (int64_t i = 0; i < kBlock; i += 4) vmax = _mm_max_ps(vmax, _mm_and_ps(_mm_loadu_ps(xb + i), abs_mask));
    vmax = _mm_max_ps(vmax, _mm_shuffle_ps(vmax, vmax, _MM_SHUFFLE(1, 0, 3, 2)));
    vmax = _mm_max_ps(vmax, _mm_shuffle_ps(vmax, vmax, _MM_SHUFFLE(2, 3, 0, 1)));
    const float amax = _mm_cvtss_f32(vmax);
    const float s = amax / 127.f, inv = amax > 0.f ? 127.f / amax : 0.f;
    alignas(16) int32_t v[kBlock];
    __m128i vsum = _mm_setzero_si128();
    for (int64_t i = 0; i < kBlock; i += 4) {
      const __m128i r = _mm_cvtps_epi32(_mm_mul_ps(_mm_loadu_ps(xb + i), _mm_set1_ps(inv)));
      _mm_store_si128(reinterpret_cast<__m128i*>(v + i), r);
      vsum = _mm_add_epi32(vsum, r);
    }
    alignas(16) int32_t sums[4];
    _mm_store_si128(reinterpret_cast<__m128i*>(sums), vsum);
    int8_t* qb = q + b * kBlock;
    for (int64_t i = 0; i < kBlock; ++i) qb[pos[i]] = static_cast<int8_t>(v[i]);
    scale[b] = s;
    bsum[b] = s * static_cast<float>(sums[0] + sums[1] + sums[2] + sums[3]);
  }
}

// Row-quantized activations owned by the caller.
struct ActBuffer {
  std::vector<int8_t> q;
  std::vector<float> scale, bsum;
  int64_t K;
  ActBuffer(int64_t rows, int64_t K_) : q(rows * K_), scale(rows * K_ / kBlock), bsum(rows * K_ / kBlock), K(K_) {}
  // Blocks [first, first + n) of `row` from x (those blocks' values).
  void quantize(int64_t row, const float* x, int bits, int64_t first = 0, int64_t n = -1) {
    const int64_t at = row * (K / kBlock) + first;
    quantize_blocks(x, n < 0 ? K / kBlock : n, bits, q.data() + at * kBlock, scale.data() + at, bsum.data() + at);
  }
  QuantizedActs view() const { return {q.data(), scale.data(), bsum.data(), K}; }
};

// Rows of x [T, K] (float32, bf16 or fp16) as float32: a pointer into x when it is float32, else the row
// converted into `buf`. Converting in the kernel saves an ATen op (and its cold dispatch path) per decode call.
class FloatRows {
 public:
  explicit FloatRows(const at::Tensor& x) : x_(x.contiguous()), K_(x.size(1)), type_(x.scalar_type()) {
    TORCH_CHECK(type_ == at::kFloat || type_ == at::kBFloat16 || type_ == at::kHalf,
                "moemix cpu kernels take float32, bfloat16 or float16 activations, got ", type_);
  }
  const float* row(int64_t t, std::vector<float>& buf) const {
    if (type_ == at::kFloat) return x_.data_ptr<float>() + t * K_;
    buf.resize(K_);
    if (type_ == at::kBFloat16) {
      const at::BFloat16* r = x_.data_ptr<at::BFloat16>() + t * K_;
      for (int64_t k = 0; k < K_; ++k) buf[k] = static_cast<float>(r[k]);
    } else {
      const at::Half* r = x_.data_ptr<at::Half>() + t * K_;
      for (int64_t k = 0; k < K_; ++k) buf[k] = static_cast<float>(r[k]);
    }
    return buf.data();
  }

 private:
  at::Tensor x_;
  int64_t K_;
  at::ScalarType type_;
};

// ---------------------------------------------------------------------------------------------
// Gated activations over one pair's gate_up row [gate (I) | up (I)] (halves), as in kernels/base.py.

enum class Activation { kSilu, kSwigluOai };

constexpr float kSwigluOaiAlpha = 1.702f, kSwigluOaiLimit = 7.0f;  // gpt_oss/torch/model.py

Activation parse_activation(c10::string_view name) {
  if (name == "silu") return Activation::kSilu;
  if (name == "swigluoai") return Activation::kSwigluOai;
  TORCH_CHECK(false, "moemix cpu kernel: unknown expert activation '", std::string(name), "' (silu, swigluoai)");
}

// e^x, 4 lanes, SSE2 (Cephes' expf: round-to-nearest range reduction and a degree-5 polynomial, relative error
// ~2e-7). Vectorised because libm's expf per value cost as much as a 2-bit expert's GEMM at decode.
inline __m128 exp_ps(__m128 x) {
  x = _mm_min_ps(_mm_max_ps(x, _mm_set1_ps(-87.0f)), _mm_set1_ps(88.3762626647949f));
  const __m128i n = _mm_cvtps_epi32(_mm_mul_ps(x, _mm_set1_ps(1.44269504088896341f)));
  const __m128 fn = _mm_cvtepi32_ps(n);
  x = _mm_sub_ps(x, _mm_mul_ps(fn, _mm_set1_ps(0.693359375f)));
  x = _mm_sub_ps(x, _mm_mul_ps(fn, _mm_set1_ps(-2.12194440e-4f)));
  __m128 y = _mm_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm_add_ps(_mm_mul_ps(y, x), _mm_set1_ps(c));
  y = _mm_add_ps(_mm_add_ps(_mm_mul_ps(y, _mm_mul_ps(x, x)), x), _mm_set1_ps(1.f));
  const __m128i pow2n = _mm_slli_epi32(_mm_add_epi32(n, _mm_set1_epi32(127)), 23);
  return _mm_mul_ps(y, _mm_castsi128_ps(pow2n));
}

// h[i] = gated(gu[i], gu[I + i]) for i < I, 4 at a time (the tail through the same lanes, zero-padded).
template <class Gated>
void gated_rows(const float* gu, int64_t I, float* h, const Gated& gated) {
  for (int64_t i = 0; i < I; i += 4) {
    if (i + 4 <= I) {
      _mm_storeu_ps(h + i, gated(_mm_loadu_ps(gu + i), _mm_loadu_ps(gu + I + i)));
    } else {
      alignas(16) float g[4] = {}, u[4] = {}, r[4];
      std::copy(gu + i, gu + I, g);
      std::copy(gu + I + i, gu + 2 * I, u);
      _mm_store_ps(r, gated(_mm_load_ps(g), _mm_load_ps(u)));
      std::copy(r, r + (I - i), h + i);
    }
  }
}

void silu_mul(const float* gu, int64_t I, float* h) {  // silu(gate) * up
  gated_rows(gu, I, h, [](__m128 gate, __m128 up) {
    const __m128 sig = _mm_add_ps(_mm_set1_ps(1.f), exp_ps(_mm_sub_ps(_mm_setzero_ps(), gate)));
    return _mm_mul_ps(_mm_div_ps(gate, sig), up);
  });
}

void swigluoai_mul(const float* gu, int64_t I, float* h) {  // (clamp(up) + 1) * gate * sigmoid(alpha * gate)
  gated_rows(gu, I, h, [](__m128 gate, __m128 up) {
    const __m128 limit = _mm_set1_ps(kSwigluOaiLimit);
    gate = _mm_min_ps(gate, limit);
    up = _mm_min_ps(_mm_max_ps(up, _mm_sub_ps(_mm_setzero_ps(), limit)), limit);
    const __m128 sig =
        _mm_add_ps(_mm_set1_ps(1.f), exp_ps(_mm_mul_ps(_mm_set1_ps(-kSwigluOaiAlpha), gate)));
    return _mm_mul_ps(_mm_add_ps(up, _mm_set1_ps(1.f)), _mm_div_ps(gate, sig));
  });
}

// A per-expert bias as float rows [E][width] (nullptr: none); the tensor kept alive by `holder`.
const float* bias_rows(const c10::optional<at::Tensor>& bias, int64_t E, int64_t width, const char* name,
                       at::Tensor& holder) {
  if (!bias.has_value() || !bias->defined()) return nullptr;
  TORCH_CHECK(bias->dim() == 2 && bias->size(0) >= E && bias->size(1) == width, "moemix pack_experts: ", name,
              " must be [local experts, ", width, "], got ", bias->sizes());
  holder = bias->to(at::kFloat).contiguous();
  return holder.data_ptr<float>();
}

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

// An op's output [T, N] in the activations' dtype, filled by (row range, column range) owners: float32 in place,
// other dtypes through a float32 scratch each owner converts when its range is done. Writing the dtype in the
// kernel saves an ATen op per call (at decode its dispatch, on cold caches, costs as much as a small expert).
class Output {
 public:
  Output(int64_t T, int64_t N, const at::Tensor& like) : out(at::empty({T, N}, like.options())), N_(N) {
    if (out.scalar_type() != at::kFloat) scratch_.reset(new float[T * N]);  // owners zero or fill their ranges
  }
  float* acc(int64_t t, int64_t col) { return (scratch_ ? scratch_.get() : out.data_ptr<float>()) + t * N_ + col; }
  void zero(int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
    for (int64_t t = t0; t < t1; ++t) std::fill(acc(t, c0), acc(t, c1), 0.f);
  }
  // Rows [t0, t1) x columns [c0, c1) are final: convert them to the output's dtype.
  void finish(int64_t t0, int64_t t1, int64_t c0, int64_t c1) {
    if (!scratch_) return;
    for (int64_t t = t0; t < t1; ++t) {
      const float* src = acc(t, 0);
      if (out.scalar_type() == at::kBFloat16) {
        at::BFloat16* dst = out.data_ptr<at::BFloat16>() + t * N_;
        for (int64_t c = c0; c < c1; ++c) dst[c] = at::BFloat16(src[c]);
      } else {
        at::Half* dst = out.data_ptr<at::Half>() + t * N_;
        for (int64_t c = c0; c < c1; ++c) dst[c] = at::Half(src[c]);
      }
    }
  }
  at::Tensor out;

 private:
  int64_t N_;
  std::unique_ptr<float[]> scratch_;
};

// ---------------------------------------------------------------------------------------------
// Introspection for Python: what this CPU can run, and the layout pieces tests check independently.

pybind11::list variants_info() {
  pybind11::list out;
  for (const IsaVariant* v : kVariants) {
    pybind11::dict d;
    d["name"] = v->name;
    d["tile"] = v->tile;
    d["max_rows"] = v->max_rows;
    std::vector<std::string> req(v->requires, v->requires + v->num_requires);
    d["requires"] = req;
    d["missing"] = missing_features(*v);
    out.append(d);
  }
  return out;
}

// (q [T, K] int8 in the kernel's permuted order, scale [T, K/32], bsum [T, K/32]) for one weight width.
std::vector<at::Tensor> quantize_activations(const at::Tensor& x, int64_t bits) {
  check_bits(bits);
  const FloatRows rows(x);
  const int64_t T = x.size(0), K = x.size(1);
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of ", kBlock);
  ActBuffer acts(T, K);
  std::vector<float> buf;
  for (int64_t t = 0; t < T; ++t) acts.quantize(t, rows.row(t, buf), static_cast<int>(bits));
  auto f = at::TensorOptions().dtype(at::kFloat);
  return {at::from_blob(acts.q.data(), {T, K}, at::TensorOptions().dtype(at::kChar)).clone(),
          at::from_blob(acts.scale.data(), {T, K / kBlock}, f).clone(),
          at::from_blob(acts.bsum.data(), {T, K / kBlock}, f).clone()};
}

}  // namespace

// y[T, N] = x[T, K] @ W for one packed weight (a quantized nn.Linear).
at::Tensor packed_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& scales,
                         const at::Tensor& zeros, int64_t bits, int64_t group, c10::string_view isa) {
  TORCH_CHECK(x.dim() == 2, "moemix packed_linear expects [tokens, K]");
  check_bits(bits);
  const IsaVariant& V = variant(isa);
  const int64_t T = x.size(0), K = x.size(1), N = qweight.numel() * 32 / (K * bits);
  const FloatRows rows(x);
  ActBuffer acts(T, K);
  at::parallel_for(0, T, grain_for(K), [&](int64_t b, int64_t e) {
    std::vector<float> buf;
    for (int64_t t = b; t < e; ++t) acts.quantize(t, rows.row(t, buf), bits);
  });
  Output out(T, N, x);
  const PackedWeight W = weight_view(qweight, scales, zeros, 0, bits, group, K, N);
  const QuantizedActs A = acts.view();
  const int64_t tiles = N / V.tile, chunks = (T + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tiles * chunks, grain_for(K * V.tile * std::min<int64_t>(T, kRowsPerTask)),
                   [&](int64_t b, int64_t e) {
    std::vector<int64_t> act_rows;
    std::vector<float*> outs;
    for (int64_t task = b; task < e; ++task) {
      const int64_t tile = task % tiles, chunk = task / tiles;
      const int64_t t0 = chunk * kRowsPerTask, t1 = std::min(T, t0 + kRowsPerTask);
      act_rows.clear();
      outs.clear();
      for (int64_t t = t0; t < t1; ++t) {
        act_rows.push_back(t);
        outs.push_back(out.acc(t, tile * V.tile));
      }
      V.gemm_rows(W, tile, A, act_rows.data(), t1 - t0, outs.data(), nullptr);
      out.finish(t0, t1, tile * V.tile, (tile + 1) * V.tile);
    }
  });
  return out.out;
}

namespace {

// Element i of an int32 or int64 tensor (router ids and vLLM's expert map come as either), read in place.
class IntView {
 public:
  IntView(const at::Tensor& t, const char* name) : t_(t.contiguous()), wide_(t.scalar_type() == at::kLong) {
    TORCH_CHECK(wide_ || t.scalar_type() == at::kInt, "moemix cpu_fused_moe: ", name, " must be int32 or int64, got ",
                t.scalar_type());
  }
  int64_t operator[](int64_t i) const {
    return wide_ ? t_.data_ptr<int64_t>()[i] : static_cast<int64_t>(t_.data_ptr<int32_t>()[i]);
  }
  int64_t size() const { return t_.numel(); }

 private:
  at::Tensor t_;
  bool wide_;
};

// One call's (token, expert) pairs sorted by local expert: pair p of expert e in [start[e], start[e + 1]).
struct Pairs {
  std::vector<int64_t> count, start, active, token;
  std::vector<float> weight;
  int64_t size() const { return start.back(); }
};

// Maps the router's ids to this rank's experts (expert_map: global -> local, -1 on another rank; none: ids are
// local), adds them to the layer's usage counts (routed_pairs [E + 1], the last slot for other ranks' pairs: the
// same counts ExpertsLayout.route keeps for the other kernels, taken here because each eager op a decode step
// runs costs microseconds), and sorts the pairs by expert.
Pairs sort_pairs(const at::Tensor& topk_weights, const at::Tensor& topk_ids, const c10::optional<at::Tensor>& expert_map,
                 at::Tensor& routed_pairs, int64_t E) {
  TORCH_CHECK(routed_pairs.scalar_type() == at::kLong && routed_pairs.numel() == E + 1 && routed_pairs.is_contiguous(),
              "moemix cpu_fused_moe: routed_pairs must be contiguous int64 [", E + 1, "]");
  TORCH_CHECK(topk_weights.sizes() == topk_ids.sizes(), "moemix cpu_fused_moe: topk_weights ", topk_weights.sizes(),
              " and topk_ids ", topk_ids.sizes(), " differ");
  const IntView ids(topk_ids, "topk_ids");
  const bool mapped = expert_map.has_value() && expert_map->defined();
  const IntView map = mapped ? IntView(*expert_map, "expert_map") : ids;
  const int64_t n = ids.size(), global = mapped ? map.size() : E;
  std::vector<int64_t> local(n);
  Pairs pairs;
  pairs.count.assign(E + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t g = ids[i];
    TORCH_CHECK(g < global, "moemix cpu_fused_moe: expert id ", g, " out of range (", global, " experts)");
    const int64_t e = g < 0 ? -1 : mapped ? map[g] : g;
    TORCH_CHECK(e < E, "moemix cpu_fused_moe: expert_map gives local id ", e, " (", E, " local experts)");
    local[i] = e;
    ++pairs.count[e < 0 ? E : e];
  }
  int64_t* usage = routed_pairs.data_ptr<int64_t>();
  for (int64_t e = 0; e <= E; ++e) usage[e] += pairs.count[e];
  pairs.start.assign(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    pairs.start[e + 1] = pairs.start[e] + pairs.count[e];
    if (pairs.count[e]) pairs.active.push_back(e);
  }
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();  // vLLM's are float32 already: no copy
  const float* w = wts.data_ptr<float>();
  const int64_t top_k = topk_ids.size(-1);
  pairs.token.resize(pairs.size());
  pairs.weight.resize(pairs.size());
  std::vector<int64_t> fill(pairs.start.begin(), pairs.start.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    if (local[i] < 0) continue;
    const int64_t p = fill[local[i]]++;
    pairs.token[p] = i / top_k;
    pairs.weight[p] = w[i];
  }
  return pairs;
}

// ---------------------------------------------------------------------------------------------
// A fused-MoE layer's experts in one buffer, made once at load (pack_experts) and read by every cpu_fused_moe
// call. Why: a decode call passing each width group's tensors as lists (a 22-argument schema with six tensor
// lists) spent ~85 us on cold caches (~20 us warm) in the dispatcher boxing its arguments -- as much as a small
// layer's whole GEMM; with two tensors for the experts the same call costs ~36 us (4 us warm).
//
//   experts  uint8 [bytes], on huge pages: each width group's repacked q, scales and zeros (64-byte aligned,
//            group by group, w13 first), then the float32 biases [E][2I] and [E][H] when the layer has them.
//   layout   int64 [kHeader + E * 2 * kPerWeight]: the header (LayoutField), then for each local expert e and
//            projection (0: w13 in the gated layout, 1: w2) its weight's byte offsets {q, scales, zeros
//            (-1: symmetric)} and {bits, group} (WeightField).

enum LayoutField : int64_t { kMagic, kBytes, kExperts, kHidden, kInter, kActivation, kVariant, kBias13, kBias2, kHeader };
enum WeightField : int64_t { kQ, kScales, kZeros, kBits, kGroup, kPerWeight };
constexpr int64_t kLayoutMagic = 0x6d6f656d69780001;  // "moemix", layout version 1
constexpr int64_t kSegmentAlign = 64;

class PackedExperts {
 public:
  PackedExperts(const at::Tensor& experts, const at::Tensor& layout) {
    TORCH_CHECK(layout.scalar_type() == at::kLong && layout.dim() == 1 && layout.is_contiguous() &&
                    layout.numel() >= kHeader,
                "moemix cpu_fused_moe: experts_layout must be the contiguous int64 tensor pack_experts made");
    d_ = layout.data_ptr<int64_t>();
    TORCH_CHECK(d_[kMagic] == kLayoutMagic, "moemix cpu_fused_moe: experts_layout was not made by this extension's "
                "pack_experts (repack the layer)");
    E = d_[kExperts];
    H = d_[kHidden];
    I = d_[kInter];
    TORCH_CHECK(layout.numel() == kHeader + E * 2 * kPerWeight, "moemix cpu_fused_moe: experts_layout holds ",
                layout.numel(), " values, its header says ", E, " experts");
    TORCH_CHECK(experts.scalar_type() == at::kByte && experts.is_contiguous() && experts.numel() == d_[kBytes],
                "moemix cpu_fused_moe: experts must be the contiguous uint8 buffer of ", d_[kBytes],
                " bytes pack_experts made with this layout");
    base_ = experts.data_ptr<uint8_t>();
    V = &runnable_variant(d_[kVariant]);
    TORCH_CHECK(d_[kActivation] == static_cast<int64_t>(Activation::kSilu) ||
                    d_[kActivation] == static_cast<int64_t>(Activation::kSwigluOai),
                "moemix cpu_fused_moe: experts_layout names no known activation (", d_[kActivation], ")");
    act = static_cast<Activation>(d_[kActivation]);
  }
  const int64_t* entry(int proj, int64_t e) const { return d_ + kHeader + (2 * e + proj) * kPerWeight; }
  int bits(int proj, int64_t e) const { return static_cast<int>(entry(proj, e)[kBits]); }
  PackedWeight weight(int proj, int64_t e) const {
    const int64_t* w = entry(proj, e);
    return {reinterpret_cast<const int32_t*>(base_ + w[kQ]), reinterpret_cast<const uint16_t*>(base_ + w[kScales]),
            w[kZeros] < 0 ? nullptr : base_ + w[kZeros], static_cast<int>(w[kBits]), w[kGroup],
            proj == 0 ? H : I, proj == 0 ? 2 * I : H};
  }
  const float* bias(int proj) const {
    const int64_t at = d_[proj == 0 ? kBias13 : kBias2];
    return at < 0 ? nullptr : reinterpret_cast<const float*>(base_ + at);
  }

  int64_t E, H, I;
  const IsaVariant* V;
  Activation act;

 private:
  const int64_t* d_;
  const uint8_t* base_;
};

// The experts' buffer and layout (PackedExperts) from each projection's width groups in checkpoint layout, each
// repacked for `isa` straight into its place in the buffer (gate/up gated): group g of a projection holds the
// experts whose where[e] = (g, slot), as vllm_moemix/layers/layout.py lays them out. Checks every group's size
// against the layer's shape. Repacking into the buffer, not into tensors then copied, saves a pass over the layer
// and a first touch of as much fresh memory. Measured on an Ice Lake server (2 threads), a Mixtral-8x7B layer at
// 2.5 bits: repack then copy 2.7 s, into the buffer 1.3-1.7 s; peak memory above the loaded layer +0.61 GB
// (Qwen3-30B-A3B's: 0.6-0.7 s, +0.26 GB).
std::vector<at::Tensor> pack_experts(const at::Tensor& w13_where, const at::Tensor& w2_where,
                                     const std::vector<at::Tensor>& w13_q, const std::vector<at::Tensor>& w13_s,
                                     const std::vector<at::Tensor>& w13_z, const std::vector<int64_t>& w13_bits,
                                     const std::vector<int64_t>& w13_group, const std::vector<at::Tensor>& w2_q,
                                     const std::vector<at::Tensor>& w2_s, const std::vector<at::Tensor>& w2_z,
                                     const std::vector<int64_t>& w2_bits, const std::vector<int64_t>& w2_group,
                                     const c10::optional<at::Tensor>& w13_bias,
                                     const c10::optional<at::Tensor>& w2_bias, const std::string& activation,
                                     int64_t hidden, int64_t intermediate, const std::string& isa) {
  const int64_t E = w13_where.size(0), H = hidden, I = intermediate;
  TORCH_CHECK(w2_where.size(0) == E, "moemix pack_experts: w13 places ", E, " experts, w2 ", w2_where.size(0));
  TORCH_CHECK(I % kBlock == 0, "moemix pack_experts: intermediate size ", I, " is not a multiple of ", kBlock);
  struct Proj {
    const at::Tensor& where;
    const std::vector<at::Tensor>&q, &s, &z;
    const std::vector<int64_t>&bits, &group;
    int64_t K, N;
  };
  const Proj projs[2] = {{w13_where, w13_q, w13_s, w13_z, w13_bits, w13_group, H, 2 * I},
                         {w2_where, w2_q, w2_s, w2_z, w2_bits, w2_group, I, H}};
  // Byte offsets of every group's tensors, then the biases.
  int64_t bytes = 0;
  const auto place = [&](int64_t n) {
    const int64_t at = bytes;
    bytes += (n + kSegmentAlign - 1) / kSegmentAlign * kSegmentAlign;
    return at;
  };
  std::vector<std::array<int64_t, 3>> offsets[2];
  std::vector<std::array<at::Tensor, 3>> parts[2];
  for (int p = 0; p < 2; ++p) {
    const Proj& P = projs[p];
    const size_t groups = P.q.size();
    TORCH_CHECK(P.s.size() == groups && P.z.size() == groups && P.bits.size() == groups && P.group.size() == groups,
                "moemix pack_experts: projection ", p, " has differently many qweights, scales, zeros, widths and groups");
    for (size_t g = 0; g < groups; ++g) {
      check_bits(P.bits[g]);
      TORCH_CHECK(P.group[g] > 0 && P.K % P.group[g] == 0, "moemix pack_experts: group size ", P.group[g],
                  " does not divide ", P.K);
      const int64_t n = P.q[g].size(0), G = P.K / P.group[g];
      const auto expect = [&](const at::Tensor& t, at::ScalarType type, int64_t rows, const char* what) {
        TORCH_CHECK(t.scalar_type() == type && t.sizes() == at::IntArrayRef({n, rows, P.N}),
                    "moemix pack_experts: projection ", p, " group ", g, " ", what, " must be ", type, " [", n, ", ",
                    rows, ", ", P.N, "] (", P.bits[g], "-bit, ", P.K, "x", P.N, "), got ", t.scalar_type(), " ",
                    t.sizes());
        return t.contiguous();
      };
      std::array<at::Tensor, 3> t = {expect(P.q[g], at::kInt, P.K * P.bits[g] / 32, "qweight"),
                                     expect(P.s[g], at::kHalf, G, "scales"), at::Tensor()};
      if (P.z[g].numel()) t[2] = expect(P.z[g], at::kByte, G, "qzeros");
      offsets[p].push_back({place(t[0].nbytes()), place(t[1].nbytes()), t[2].defined() ? place(t[2].nbytes()) : -1});
      parts[p].push_back(t);
    }
  }
  at::Tensor b13_holder, b2_holder;
  const float* b13 = bias_rows(w13_bias, E, 2 * I, "w13_bias", b13_holder);
  const float* b2 = bias_rows(w2_bias, E, H, "w2_bias", b2_holder);
  const int64_t b13_at = b13 ? place(E * 2 * I * 4) : -1, b2_at = b2 ? place(E * H * 4) : -1;

  at::Tensor experts = empty_on_huge_pages({bytes}, at::TensorOptions().dtype(at::kByte));
  uint8_t* base = experts.data_ptr<uint8_t>();
  std::memset(base, 0, bytes);  // alignment padding too: the buffer's bytes are deterministic
  const auto segment = [&](const at::Tensor& like, int64_t at) {
    return at < 0 ? at::Tensor() : experts.narrow(0, at, like.nbytes()).view(like.scalar_type());
  };
  for (int p = 0; p < 2; ++p)
    for (size_t g = 0; g < parts[p].size(); ++g) {
      const auto& t = parts[p][g];
      const auto& at = offsets[p][g];
      const at::Tensor zeros = t[2].defined() ? t[2] : projs[p].z[g];  // empty: symmetric
      repack_into(t[0], t[1], zeros, projs[p].bits[g], isa, /*gated=*/p == 0,
                  {segment(t[0], at[0]), segment(t[1], at[1]), t[2].defined() ? segment(t[2], at[2]) : at::Tensor()});
    }
  if (b13) std::memcpy(base + b13_at, b13, E * 2 * I * 4);
  if (b2) std::memcpy(base + b2_at, b2, E * H * 4);

  at::Tensor layout = at::empty({kHeader + E * 2 * kPerWeight}, at::TensorOptions().dtype(at::kLong));
  int64_t* d = layout.data_ptr<int64_t>();
  const int64_t header[kHeader] = {kLayoutMagic, bytes, E, H, I, static_cast<int64_t>(parse_activation(activation)),
                                   variant_index(isa), b13_at, b2_at};
  std::copy(header, header + kHeader, d);
  for (int p = 0; p < 2; ++p) {
    const Proj& P = projs[p];
    TORCH_CHECK(P.where.dim() == 2 && P.where.size(1) == 2, "moemix pack_experts: where-maps must be [E, 2]");
    const at::Tensor where = P.where.to(at::kLong).contiguous();
    const int64_t* wh = where.data_ptr<int64_t>();
    for (int64_t e = 0; e < E; ++e) {
      const int64_t g = wh[2 * e], slot = wh[2 * e + 1];
      TORCH_CHECK(g >= 0 && g < static_cast<int64_t>(parts[p].size()) && slot >= 0 && slot < parts[p][g][0].size(0),
                  "moemix pack_experts: projection ", p, " places expert ", e, " at (group ", g, ", slot ", slot,
                  "), which does not exist");
      const int bits = static_cast<int>(P.bits[g]);
      const int64_t G = P.K / P.group[g], q_bytes = P.K * bits / 32 * P.N * 4, s_count = G * P.N;
      int64_t* w = d + kHeader + (2 * e + p) * kPerWeight;
      w[kQ] = offsets[p][g][0] + slot * q_bytes;
      w[kScales] = offsets[p][g][1] + slot * s_count * 2;
      w[kZeros] = offsets[p][g][2] < 0 ? -1 : offsets[p][g][2] + slot * s_count;
      w[kBits] = bits;
      w[kGroup] = P.group[g];
    }
  }
  return {experts, layout};
}

}  // namespace

// Gated experts of mixed widths: sum_k topk_weights[t,k] * expert_{ids[t,k]}(x[t]), where
// expert_e(x) = act(x @ W13[e] + b13[e]) @ W2[e] + b2[e], the experts as pack_experts laid them out. topk_ids are
// the router's (mapped through expert_map when given; sort_pairs counts them into routed_pairs).
at::Tensor fused_moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& topk_ids,
                     const c10::optional<at::Tensor>& expert_map, at::Tensor& routed_pairs, const at::Tensor& experts,
                     const at::Tensor& experts_layout) {
  const PackedExperts pe(experts, experts_layout);
  const IsaVariant& V = *pe.V;
  const int64_t T = x.size(0), H = pe.H, E = pe.E, I = pe.I;
  TORCH_CHECK(x.dim() == 2 && x.size(1) == H, "moemix cpu_fused_moe: x must be [tokens, ", H, "], got ", x.sizes());
  const float* b13 = pe.bias(0);
  const float* b2 = pe.bias(1);
  const Pairs pairs = sort_pairs(topk_weights, topk_ids, expert_map, routed_pairs, E);
  const std::vector<int64_t>& active = pairs.active;
  const int64_t P = pairs.size();
  if (P == 0) return at::zeros({T, H}, x.options());

  // Stage 0: quantize each token once per activation permutation its experts need.
  bool need[3] = {false, false, false};
  for (int64_t e : active) need[bits_slot(pe.bits(0, e))] = true;
  const int perm_bits[3] = {2, 4, 8};
  std::vector<ActBuffer> xacts;
  for (int s = 0; s < 3; ++s) xacts.emplace_back(need[s] ? T : 0, H);
  const FloatRows xrows(x);
  at::parallel_for(0, T, grain_for(H), [&](int64_t b, int64_t e) {
    std::vector<float> buf;
    for (int64_t t = b; t < e; ++t) {
      const float* row = xrows.row(t, buf);
      for (int s = 0; s < 3; ++s)
        if (need[s]) xacts[s].quantize(t, row, perm_bits[s]);
    }
  });

  // Stage 1: h[p] = act(x[token(p)] @ W13[expert(p)] + b13), quantized for the pair's w2 width. In the gated
  // layout a 64-column chunk of W13 holds 32 gate and the same 32 up columns, so the thread that computes a chunk
  // activates and quantizes its block of h itself. Tasks are (active expert, chunk) in expert-major order -- an
  // expert's chunks are consecutive in memory, so a thread streams long runs -- split into one contiguous range
  // per thread of equal estimated cost, so experts of different widths (and token counts) keep every thread busy
  // to the end.
  constexpr int64_t kChunk = 2 * kBlock;
  const int64_t N13 = 2 * I, chunks = I / kBlock, tiles_per_chunk = kChunk / V.tile;
  ActBuffer hacts(P, I);
  void (*const act_mul)(const float*, int64_t, float*) = pe.act == Activation::kSilu ? silu_mul : swigluoai_mul;
  std::vector<double> cost13;
  for (int64_t e : active)
    cost13.push_back(tile_cost(pe.bits(0, e), H, kChunk, pairs.count[e]));
  parallel_ranges(balanced_ranges(cost13, std::vector<int64_t>(active.size(), chunks)), [&](int64_t b, int64_t e_) {
    std::vector<float> gate_up;  // [pairs of the expert][gate 32 | up 32]
    std::vector<float*> outs;
    float h[kBlock];
    for (int64_t task = b; task < e_; ++task) {
      const int64_t e = active[task / chunks], chunk = task % chunks, n = pairs.count[e], p0 = pairs.start[e];
      const PackedWeight W = pe.weight(0, e);
      const int bits = W.bits;
      gate_up.resize(n * kChunk);
      for (int64_t s = 0; s < tiles_per_chunk; ++s) {
        outs.clear();
        for (int64_t i = 0; i < n; ++i) outs.push_back(gate_up.data() + i * kChunk + s * V.tile);
        V.gemm_rows(W, chunk * tiles_per_chunk + s, xacts[bits_slot(bits)].view(), pairs.token.data() + p0, n,
                    outs.data(), nullptr);
      }
      const int w2bits = pe.bits(1, e);
      for (int64_t i = 0; i < n; ++i) {
        float* gu = gate_up.data() + i * kChunk;
        if (b13) {  // biases stay in checkpoint order [gate (I) | up (I)]
          const float* bias = b13 + e * N13 + chunk * kBlock;
          for (int64_t j = 0; j < kBlock; ++j) {
            gu[j] += bias[j];
            gu[kBlock + j] += bias[I + j];
          }
        }
        act_mul(gu, kBlock, h);
        hacts.quantize(p0 + i, h, w2bits, chunk, 1);
      }
    }
  });

  // Stage 2: out[token] += weight * h @ W2. Each thread owns a range of output column tiles (no atomics) and
  // walks it expert by expert: every tile holds every expert, so equal ranges are equal work, and an expert's
  // tiles in a range are one contiguous run of memory.
  const int64_t tiles2 = H / V.tile;
  double cost2 = 0;
  for (int64_t e : active) cost2 += tile_cost(pe.bits(1, e), I, V.tile, pairs.count[e]);
  std::vector<int64_t> pair_rows(P);
  for (int64_t p = 0; p < P; ++p) pair_rows[p] = p;
  Output out(T, H, x);
  parallel_ranges(balanced_ranges({cost2}, {tiles2}), [&](int64_t t0, int64_t t1) {
    const int64_t c0 = t0 * V.tile, c1 = t1 * V.tile;
    out.zero(0, T, c0, c1);
    std::vector<float*> outs;
    for (int64_t e : active) {
      const int64_t p0 = pairs.start[e], p1 = pairs.start[e + 1];
      const PackedWeight W = pe.weight(1, e);
      for (int64_t tile = t0; tile < t1; ++tile) {
        outs.clear();
        for (int64_t p = p0; p < p1; ++p) outs.push_back(out.acc(pairs.token[p], tile * V.tile));
        // Pairs of one expert have distinct tokens, so the accumulations never alias.
        V.gemm_rows(W, tile, hacts.view(), pair_rows.data() + p0, p1 - p0, outs.data(), pairs.weight.data() + p0);
      }
      if (b2) {  // out += weight * b2[e] over this thread's columns
        for (int64_t p = p0; p < p1; ++p) {
          float* o = out.acc(pairs.token[p], 0);
          const float* bias = b2 + e * H;
          const float w = pairs.weight[p];
          for (int64_t c = c0; c < c1; ++c) o[c] += w * bias[c];
        }
      }
    }
    out.finish(0, T, c0, c1);
  });
  return out.out;
}

// Registered with the dispatcher (not pybind) so calls skip Python; fake (meta) implementations for
// torch.compile live in vllm_moemix/layers/kernels/cpu.py.
TORCH_LIBRARY_FRAGMENT(moemix, m) {
  m.def("cpu_linear(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, int bits, int group_size, str isa) -> Tensor");
  m.def(
      "cpu_fused_moe(Tensor x, Tensor topk_weights, Tensor topk_ids, Tensor? expert_map, Tensor(a!) routed_pairs, "
      "Tensor experts, Tensor experts_layout) -> Tensor");
}

TORCH_LIBRARY_IMPL(moemix, CPU, m) {
  m.impl("cpu_linear", &packed_linear);
  m.impl("cpu_fused_moe", &fused_moe);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moemix native CPU kernels; importing registers torch.ops.moemix.cpu_*";
  m.def("variants", &variants_info, "the compiled ISA variants, fastest first, with what this CPU lacks for each");
  m.def("repack", &repack, "qweight, scales, qzeros (empty: symmetric), bits, isa, gated -> the native layout of one "
        "ISA variant (gated: an experts' gate/up projection, columns interleaved per 32)");
  m.def("pack_experts", &pack_experts, "a fused-MoE layer's width groups in checkpoint layout (ExpertsLayout.op_args, "
        "then hidden, intermediate, isa) -> (experts, experts_layout): the two tensors cpu_fused_moe reads");
  m.def("quantize_activations", &quantize_activations, "x [T, K] -> permuted int8, scale, bsum (layout tests)");
}
