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
#include <cmath>
#include <cstdint>
#include <cstring>
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

const IsaVariant& find_variant(c10::string_view name) {
  for (const IsaVariant* v : kVariants)
    if (name == v->name) return *v;
  TORCH_CHECK(false, "unknown moemix cpu kernel variant '", std::string(name), "'");
}

// The variant an op call asked for, refusing one this CPU cannot run (never reached through the Python
// selector, which only picks supported variants; this guards direct calls). Checked once per variant.
const IsaVariant& variant(c10::string_view name) {
  static const std::vector<std::vector<std::string>> missing = [] {
    std::vector<std::vector<std::string>> m;
    for (const IsaVariant* v : kVariants) m.push_back(missing_features(*v));
    return m;
  }();
  for (size_t i = 0; i < std::size(kVariants); ++i) {
    if (name == kVariants[i]->name) {
      TORCH_CHECK(missing[i].empty(), "moemix cpu kernel variant ", kVariants[i]->name, " needs ",
                  c10::Join(", ", missing[i]), ", which this CPU lacks");
      return *kVariants[i];
    }
  }
  return find_variant(name);  // unknown: raises
}

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

// [..., R, N] -> [..., N/tile, R, tile] contiguous: one column strip per tile streams sequentially.
at::Tensor tile_major(const at::Tensor& t, int64_t tile) {
  const int64_t R = t.size(-2), N = t.size(-1);
  TORCH_CHECK(N % tile == 0, "moemix cpu repack: ", N, " columns are not a multiple of the tile width ", tile);
  auto shape = t.sizes().vec();
  shape.back() = tile;
  shape.insert(shape.end() - 1, N / tile);  // [..., R, N/tile, tile]
  const at::Tensor strips = t.reshape(shape).transpose(-3, -2);
  return empty_on_huge_pages(strips.sizes(), t.options()).copy_(strips);
}

// One linear's (or a stack of experts') tensors in the layout of `isa`; scales and zeros keep their dtype.
std::vector<at::Tensor> repack(const at::Tensor& qweight, const at::Tensor& scales, const at::Tensor& qzeros,
                               int64_t bits, const std::string& isa) {
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
  return {tile_major(q, v.tile), tile_major(scales, v.tile), qzeros.numel() ? tile_major(qzeros, v.tile) : qzeros};
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
// half to even under the default MXCSR, as nearbyint does.
void quantize_row(const float* x, int64_t K, int bits, int8_t* q, float* scale, float* bsum) {
  const uint8_t* pos = kBlockPermutation.pos[bits == 8 ? 2 : bits == 4 ? 1 : 0];
  const __m128 abs_mask = _mm_castsi128_ps(_mm_set1_epi32(0x7FFFFFFF));
  for (int64_t b = 0; b < K / kBlock; ++b) {
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
  void quantize(int64_t row, const float* x, int bits) {
    quantize_row(x, K, bits, q.data() + row * K, scale.data() + row * (K / kBlock), bsum.data() + row * (K / kBlock));
  }
  QuantizedActs view() const { return {q.data(), scale.data(), bsum.data(), K}; }
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
  TORCH_CHECK(bias->dim() == 2 && bias->size(0) >= E && bias->size(1) == width, "moemix cpu_fused_moe: ", name,
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

at::Tensor as_float_rows(const at::Tensor& x) { return x.to(at::kFloat).contiguous(); }

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
  const at::Tensor xf = as_float_rows(x);
  const int64_t T = xf.size(0), K = xf.size(1);
  TORCH_CHECK(K % kBlock == 0, "K must be a multiple of ", kBlock);
  ActBuffer acts(T, K);
  for (int64_t t = 0; t < T; ++t) acts.quantize(t, xf.data_ptr<float>() + t * K, static_cast<int>(bits));
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
  const at::Tensor xf = as_float_rows(x);
  ActBuffer acts(T, K);
  at::parallel_for(0, T, grain_for(K), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) acts.quantize(t, xf.data_ptr<float>() + t * K, bits);
  });
  at::Tensor out = at::empty({T, N}, x.options().dtype(at::kFloat));
  const PackedWeight W = weight_view(qweight, scales, zeros, 0, bits, group, K, N);
  const QuantizedActs A = acts.view();
  const int64_t tiles = N / V.tile, chunks = (T + kRowsPerTask - 1) / kRowsPerTask;
  at::parallel_for(0, tiles * chunks, grain_for(K * V.tile * std::min<int64_t>(T, kRowsPerTask)),
                   [&](int64_t b, int64_t e) {
    std::vector<int64_t> rows;
    std::vector<float*> outs;
    for (int64_t task = b; task < e; ++task) {
      const int64_t tile = task % tiles, chunk = task / tiles;
      const int64_t t0 = chunk * kRowsPerTask, t1 = std::min(T, t0 + kRowsPerTask);
      rows.clear();
      outs.clear();
      for (int64_t t = t0; t < t1; ++t) {
        rows.push_back(t);
        outs.push_back(out.data_ptr<float>() + t * N + tile * V.tile);
      }
      V.gemm_rows(W, tile, A, rows.data(), t1 - t0, outs.data(), nullptr);
    }
  });
  return out.to(x.scalar_type());
}

// Gated experts of mixed widths: sum_k topk_weights[t,k] * expert_{ids[t,k]}(x[t]), where
// expert_e(x) = act(x @ W13[e] + b13[e]) @ W2[e] + b2[e] (biases optional, float32 [E, 2I] / [E, H]).
// Experts live in per-width groups; *_where[e] = (group, slot). local_ids are this rank's expert ids
// (-1: another rank's expert); mapping and routing counts are the layer's job (layers/layout.py).
at::Tensor fused_moe(const at::Tensor& x, const at::Tensor& topk_weights, const at::Tensor& local_ids,
                     const at::Tensor& w13_where,
                     const at::Tensor& w2_where, at::TensorList w13_q, at::TensorList w13_s, at::TensorList w13_z,
                     at::IntArrayRef w13_bits, at::IntArrayRef w13_group, at::TensorList w2_q,
                     at::TensorList w2_s, at::TensorList w2_z, at::IntArrayRef w2_bits, at::IntArrayRef w2_group,
                     const c10::optional<at::Tensor>& w13_bias, const c10::optional<at::Tensor>& w2_bias,
                     c10::string_view activation, int64_t intermediate, c10::string_view isa) {
  const IsaVariant& V = variant(isa);
  const Activation act = parse_activation(activation);
  for (int64_t b : w13_bits) check_bits(b);
  for (int64_t b : w2_bits) check_bits(b);
  const int64_t T = x.size(0), H = x.size(1), top_k = local_ids.size(1), E = w13_where.size(0);
  const int64_t I = intermediate, N13 = 2 * I;
  const at::Tensor xf = as_float_rows(x);
  const at::Tensor ids = local_ids.to(at::kLong).contiguous();
  const at::Tensor wts = topk_weights.to(at::kFloat).contiguous();
  const auto where13 = w13_where.accessor<int64_t, 2>();
  const auto where2 = w2_where.accessor<int64_t, 2>();
  at::Tensor b13_holder, b2_holder;
  const float* b13 = bias_rows(w13_bias, E, N13, "w13_bias", b13_holder);
  const float* b2 = bias_rows(w2_bias, E, H, "w2_bias", b2_holder);

  // Sort (token, expert) pairs by local expert: pair p = rows [start[e], start[e+1]).
  std::vector<int64_t> count(E + 1, 0), start(E + 1, 0);
  std::vector<int64_t> local(T * top_k);
  for (int64_t i = 0; i < T * top_k; ++i) {
    const int64_t e = ids.data_ptr<int64_t>()[i];
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
  std::vector<int64_t> active;
  for (int64_t e = 0; e < E; ++e)
    if (count[e]) active.push_back(e);
  at::Tensor out = at::zeros({T, H}, x.options().dtype(at::kFloat));
  if (P == 0) return out.to(x.scalar_type());

  // Stage 0: quantize each token once per activation permutation its experts need.
  bool need[3] = {false, false, false};
  for (int64_t e : active) need[bits_slot(w13_bits[where13[e][0]])] = true;
  const int perm_bits[3] = {2, 4, 8};
  std::vector<ActBuffer> xacts;
  for (int s = 0; s < 3; ++s) xacts.emplace_back(need[s] ? T : 0, H);
  at::parallel_for(0, T, grain_for(H), [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t)
      for (int s = 0; s < 3; ++s)
        if (need[s]) xacts[s].quantize(t, xf.data_ptr<float>() + t * H, perm_bits[s]);
  });

  // Stage 1: gate_up[p] = x[token(p)] @ W13[expert(p)]. Tasks are (active expert, column tile) in expert-major
  // order -- an expert's tiles are consecutive in memory, so a thread streams long runs -- split into one
  // contiguous range per thread of equal estimated cost, so experts of different widths (and token counts)
  // keep every thread busy to the end.
  std::vector<float> gate_up(P * N13);
  const int64_t tiles13 = N13 / V.tile;
  std::vector<double> cost13;
  for (int64_t e : active) cost13.push_back(tile_cost(static_cast<int>(w13_bits[where13[e][0]]), H, V.tile, count[e]));
  parallel_ranges(balanced_ranges(cost13, std::vector<int64_t>(active.size(), tiles13)), [&](int64_t b, int64_t e_) {
    std::vector<float*> outs;
    for (int64_t task = b; task < e_; ++task) {
      const int64_t e = active[task / tiles13], tile = task % tiles13;
      const int64_t g = where13[e][0];
      const int bits = static_cast<int>(w13_bits[g]);
      const PackedWeight W = weight_view(w13_q[g], w13_s[g], w13_z[g], where13[e][1], bits, w13_group[g], H, N13);
      outs.clear();
      for (int64_t p = start[e]; p < start[e + 1]; ++p) outs.push_back(gate_up.data() + p * N13 + tile * V.tile);
      V.gemm_rows(W, tile, xacts[bits_slot(bits)].view(), pair_token.data() + start[e], count[e], outs.data(), nullptr);
    }
  });

  // Stage 2: h = act(gate_up + b13), quantized for the pair's w2 width.
  const int64_t rows_per_expert = (P + static_cast<int64_t>(active.size()) - 1) / static_cast<int64_t>(active.size());
  ActBuffer hacts(P, I);
  std::vector<int64_t> pair_rows(P);
  void (*const act_mul)(const float*, int64_t, float*) = act == Activation::kSilu ? silu_mul : swigluoai_mul;
  at::parallel_for(0, static_cast<int64_t>(active.size()), grain_for(I * rows_per_expert), [&](int64_t b, int64_t e_) {
    std::vector<float> h(I);
    for (int64_t a = b; a < e_; ++a) {
      const int64_t e = active[a];
      const int bits = static_cast<int>(w2_bits[where2[e][0]]);
      for (int64_t p = start[e]; p < start[e + 1]; ++p) {
        float* gu = gate_up.data() + p * N13;
        if (b13) {
          const float* bias = b13 + e * N13;
          for (int64_t n = 0; n < N13; ++n) gu[n] += bias[n];
        }
        act_mul(gu, I, h.data());
        hacts.quantize(p, h.data(), bits);
        pair_rows[p] = p;
      }
    }
  });

  // Stage 3: out[token] += weight * h @ W2. Each thread owns a range of output column tiles (no atomics) and
  // walks it expert by expert: every tile holds every expert, so equal ranges are equal work, and an expert's
  // tiles in a range are one contiguous run of memory.
  const int64_t tiles2 = H / V.tile;
  double cost2 = 0;
  for (int64_t e : active) cost2 += tile_cost(static_cast<int>(w2_bits[where2[e][0]]), I, V.tile, count[e]);
  parallel_ranges(balanced_ranges({cost2}, {tiles2}), [&](int64_t t0, int64_t t1) {
    std::vector<float*> outs;
    for (int64_t e : active) {
      const int64_t g = where2[e][0];
      const PackedWeight W = weight_view(w2_q[g], w2_s[g], w2_z[g], where2[e][1], static_cast<int>(w2_bits[g]),
                                         w2_group[g], I, H);
      for (int64_t tile = t0; tile < t1; ++tile) {
        outs.clear();
        for (int64_t p = start[e]; p < start[e + 1]; ++p)
          outs.push_back(out.data_ptr<float>() + pair_token[p] * H + tile * V.tile);
        // Pairs of one expert have distinct tokens, so the accumulations never alias.
        V.gemm_rows(W, tile, hacts.view(), pair_rows.data() + start[e], count[e], outs.data(), pair_weight.data() + start[e]);
        if (b2) {  // out += weight * b2[e] over this tile's columns
          const float* bias = b2 + e * H + tile * V.tile;
          for (int64_t p = start[e]; p < start[e + 1]; ++p) {
            float* o = out.data_ptr<float>() + pair_token[p] * H + tile * V.tile;
            const float w = pair_weight[p];
            for (int64_t n = 0; n < V.tile; ++n) o[n] += w * bias[n];
          }
        }
      }
    }
  });
  return out.to(x.scalar_type());
}

// Registered with the dispatcher (not pybind) so calls skip Python; fake (meta) implementations for
// torch.compile live in vllm_moemix/layers/kernels/cpu.py.
TORCH_LIBRARY_FRAGMENT(moemix, m) {
  m.def("cpu_linear(Tensor x, Tensor qweight, Tensor scales, Tensor qzeros, int bits, int group_size, str isa) -> Tensor");
  m.def(
      "cpu_fused_moe(Tensor x, Tensor topk_weights, Tensor local_ids, Tensor w13_where, Tensor w2_where, "
      "Tensor[] w13_qweights, Tensor[] w13_scales, Tensor[] w13_qzeros, int[] w13_bits, int[] w13_groups, Tensor[] w2_qweights, Tensor[] w2_scales, Tensor[] w2_qzeros, "
      "int[] w2_bits, int[] w2_groups, Tensor? w13_bias, Tensor? w2_bias, str activation, int intermediate, str isa) -> Tensor");
}

TORCH_LIBRARY_IMPL(moemix, CPU, m) {
  m.impl("cpu_linear", &packed_linear);
  m.impl("cpu_fused_moe", &fused_moe);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "moemix native CPU kernels; importing registers torch.ops.moemix.cpu_*";
  m.def("variants", &variants_info, "the compiled ISA variants, fastest first, with what this CPU lacks for each");
  m.def("repack", &repack, "qweight, scales, qzeros (empty: symmetric) -> the native layout of one ISA variant");
  m.def("quantize_activations", &quantize_activations, "x [T, K] -> permuted int8, scale, bsum (layout tests)");
}
