// The contract between the ISA-neutral kernel core (cpu_kernels.cpp) and the per-ISA micro-kernels
// (isa_*.cpp). Only plain structs and a function pointer cross it, so the core is compiled for the
// baseline x86-64 target and never executes an instruction the CPU lacks.
#pragma once

#include <cstdint>

namespace moemix {

constexpr int64_t kBlock = 32;       // activation quantization block along K
constexpr int kVectorsPerTile = 4;   // a weight tile is 4 int32 vectors wide: 64 columns on zmm, 32 on ymm

// The mask of WIDTH bits at bit TO of every byte of a 32-bit lane (microkernel.h's bit-field moves).
constexpr uint32_t byte_mask(int to, int width) { return (((1u << width) - 1u) << to) * 0x01010101u; }

// One packed weight in the native layout (made at load by repack in cpu_kernels.cpp):
//   q       int32 [N/tile][R][tile]  tile-major: `tile` output columns per strip, R = K*bits/32 packed rows.
//           Rows follow the GPTQ bit stream along K (value k at bits k*bits of a column's stream), except
//           3-bit: rows [0, K/16) are the low 2 bits as a 2-bit stream and rows [K/16, 3K/32) the high bit,
//           placed so one shift + mask extracts them like the 2-bit values (hi_bit_position).
//   scales  fp16  [N/tile][G][tile], zeros uint8 [N/tile][G][tile] (nullptr when symmetric: 2^(bits-1)).
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

// Activations quantized to int8 per 32-value block and permuted for one weight width (permute_window).
struct QuantizedActs {
  const int8_t* q;     // [rows][K]
  const float* scale;  // [rows][K/32]
  const float* bsum;   // [rows][K/32]: scale * sum(q) over the block, for the zero-point term
  int64_t K;
};

// out[i][0:tile] = (or += mult[i] *) sum_k W[k, tile columns] * x_{act_rows[i]}[k], i < n.
using GemmRowsFn = void (*)(const PackedWeight& W, int64_t tile, const QuantizedActs& A, const int64_t* act_rows,
                            int64_t n, float* const* out, const float* mult);

// One compiled micro-kernel variant. `requires` are Linux /proc/cpuinfo flag names, so a refusal can say
// exactly which extension the CPU lacks.
struct IsaVariant {
  const char* name;
  int64_t tile;
  int max_rows;  // activation rows register-blocked per weight load
  GemmRowsFn gemm_rows;
  const char* const* requires;
  int num_requires;
};

extern const IsaVariant kAvx512VnniVariant;
extern const IsaVariant kAvxVnniVariant;
extern const IsaVariant kAvx2Variant;

}  // namespace moemix
