// Pushing a row-parallel matmul's share of an all-reduce straight from the kernel that computes it.
//
// The NCCL communicator's fused one-shot all-reduce (comm/nccl/one_shot_kernel.cu) sends each member's row
// to the others as "LL" words: every float travels beside its call's tag in one aligned 8-byte pair, so
// that a receiver polls the words themselves. Nothing requires that kernel to be the sender: the matvec
// that produces the row can store the same words as each of its outputs is ready, and the all-reduce
// kernel then only receives. The send then overlaps the matvec's tail, the all-reduce kernel's launch and
// its first loads instead of following them (70B tp 4: waiting for every peer's data was most of the
// all-reduce's time in context; docs/BENCHMARKS.md, Decisions in the source). This header is the contract
// between the two kernels: where output i goes and with which tag. Host and device code include it; it has
// no CUDA dependency.
#pragma once

#include <cstddef>
#include <cstdint>

#if defined(__CUDACC__)
#define SHARDLM_HD __host__ __device__ __forceinline__
#else
#define SHARDLM_HD inline
#endif

namespace shardlm {

// Where member `rank` of a group of `world` pushes its share of one fused all-reduce of n floats.
struct DevicePush {
  static constexpr int kMaxRanks = 8;
  char* areas[kMaxRanks] = {};  // (world) member p's receive areas of the channel as mapped here; null at rank
  const uint32_t* epochs = nullptr;  // (blocks) the all-reduce's per-block call counters on this member
  size_t area_bytes = 0;        // one (parity, source) area
  int world = 0;                // 0: no push
  int rank = 0;
  int block_floats = 0;         // floats owned by one all-reduce block in a pass (threads x 4)
  int blocks = 0;               // all-reduce blocks of the channel (ownership repeats every blocks x block_floats)
};

// The all-reduce block that owns float i: the counter whose value tags i's word.
SHARDLM_HD int push_owner(const DevicePush& p, int64_t i) {
  return static_cast<int>((i / p.block_floats) % p.blocks);
}
// A block's call counter e as a tag. Odd, so never the 0 of a word nobody wrote yet. Words of one area are
// rewritten every second call that gives the block data, so an old tag is at most a few calls stale; a
// false match would need an area left untouched for 2^31 of the block's calls.
SHARDLM_HD uint32_t push_tag(uint32_t epoch) { return 2u * epoch + 1u; }
// Index of the area that receives member `src`'s words of a call with counter e: (parity e & 1, src).
SHARDLM_HD size_t push_area(uint32_t epoch, int world, int src) {
  return static_cast<size_t>(epoch & 1u) * static_cast<size_t>(world) + static_cast<size_t>(src);
}
// Byte offset of float i's (value, tag) pair from areas[p], for call counter e of its owner: our area,
// then 32 bytes per float4 group, 8 per float.
SHARDLM_HD size_t push_offset(const DevicePush& p, uint32_t epoch, int64_t i) {
  return push_area(epoch, p.world, p.rank) * p.area_bytes + 32 * static_cast<size_t>(i / 4) +
         8 * static_cast<size_t>(i % 4);
}

}  // namespace shardlm

#undef SHARDLM_HD
