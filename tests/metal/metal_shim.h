// Just enough of the Metal Shading Language, as C++17 declarations, for `g++ -fsyntax-only` to
// type-check the kernels' generated Metal source on CI (no Apple toolchain there). Address-space
// keywords become nothing, builtins are declared (never defined), vector types are structs.
// A typo, an undeclared name or a type error in a kernel body fails this compile.
#pragma once
#include <cstdint>
#define kernel
#define device
#define threadgroup
#define constant
#define INFINITY __builtin_inff()
typedef unsigned int uint;
typedef unsigned short ushort;
typedef unsigned long ulong;
struct half {
  half() = default;
  half(float);
  operator float() const;
};
typedef half float16_t;
struct bfloat {
  bfloat() = default;
  bfloat(float);
  operator float() const;
};
typedef bfloat bfloat16_t;
struct uint2 { uint x, y; };
struct uint3 { uint x, y, z; };
struct float2 { float x, y; };
struct float4 { float x, y, z, w; };
enum class mem_flags { mem_none, mem_device, mem_threadgroup };
void threadgroup_barrier(mem_flags);
void simdgroup_barrier(mem_flags);
template <typename T> T simd_shuffle_xor(T, ushort);
template <typename T> T simd_sum(T);
template <typename T> T simd_max(T);
namespace metal {
template <typename T> T max(T, T);
template <typename T> T min(T, T);
float sqrt(float);
float exp(float);
float log2(float);
float rint(float);
namespace fast { float exp(float); float exp2(float); float sqrt(float); }
namespace precise { float divide(float, float); float sqrt(float); }
}  // namespace metal
using namespace metal;
