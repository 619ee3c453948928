// How the CUDA kernels split their work, in plain C++ (no CUDA or ATen types): the .cu files and a
// CPU-compiled translation unit (plan_py.cpp) include it, so the planning is tested on machines
// without a GPU (polyprune_ext._C._plan_taylor_reduce and friends). Functions marked POLYPRUNE_HD
// are the index maps the kernels themselves run; the CPU tests walk them to check that every
// element is read exactly once.
#pragma once

#include <algorithm>
#include <cstdint>

#if defined(__CUDACC__)
#define POLYPRUNE_HD __host__ __device__ __forceinline__
#else
#define POLYPRUNE_HD inline
#endif

namespace polyprune {

POLYPRUNE_HD int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// a / b for a >= 0, b > 0, in 32-bit arithmetic when both fit: on a GPU, 64-bit
// division is a called subroutine, slow and costly in registers, and the index maps below
// divide in every task.
POLYPRUNE_HD int64_t quot(int64_t a, int64_t b) {
  if (((a | b) >> 31) == 0) return static_cast<uint32_t>(a) / static_cast<uint32_t>(b);
  return a / b;
}

// a / b for a >= 0 and b a power of two: a shift (these divisions happen for every task too).
POLYPRUNE_HD int64_t quot_pow2(int64_t a, int64_t b) {
#if defined(__CUDA_ARCH__)
  return a >> (__ffsll(b) - 1);
#else
  return a >> __builtin_ctzll(static_cast<unsigned long long>(b));
#endif
}

inline int64_t pow2_at_least(int64_t x) {
  int64_t p = 1;
  while (p < x) p *= 2;
  return p;
}

inline int64_t pow2_at_most(int64_t x) {
  int64_t p = 1;
  while (p * 2 <= x) p *= 2;
  return p;
}

// ---------------------------------------------------------------------------------------------
// taylor_reduce: z[n, c] = sum_s act[n, c, s] * grad[n, c, s], then the batch reduction into out.

constexpr int kWarp = 32;
constexpr int kBlockThreads = 256;  // rows and channels kernels, the finish kernel
constexpr int kMixedWarps = 4;      // mixed kernel: 4 warps, each with a 32 x 33 shared tile
constexpr int kVectorBytes = 16;    // widest load of one thread (ld.global.nc.v4)
// Fewest loads (vectors, or positions) each lane makes in one task before the spatial axis may
// be split further: below that, a task's fixed costs (decoding, shuffles, a write) dominate.
constexpr int64_t kItemsPerLane = 8;
// A finish over at most this many partial sums runs in the stage-1 kernel's last block; a larger
// one in a kernel of its own, spread over the GPU (one block would take longer than a launch).
constexpr int64_t kLastBlockMaxPartials = 16384;
// The finish gives each output enough threads for about this many loads each, up to
// kFinishMaxLanes threads (every kernel's block holds at least that many).
constexpr int64_t kFinishLoads = 8;
constexpr int64_t kFinishMaxLanes = kMixedWarps * kWarp;

enum class ReduceKernel : int {
  Rows,      // positions contiguous (NCHW), or any strides: a group of `lanes` lanes per task
  Channels,  // channels contiguous in both (channels_last): a warp per task, `lanes` per position
  Mixed,     // one of each: a warp per task, transposing the NCHW operand through shared memory
};

enum class ReduceFinish : int {
  Direct,     // each output is one task's sum: the task adds it into out
  LastBlock,  // tasks write partial sums; the last block of the stage-1 kernel adds them up
  Kernel,     // tasks write partial sums; a finish kernel adds them up
};

// The per-sample scale as the kernels read it: none (a factor of 1, nothing read), or float32
// or float64 values `stride` elements apart, converted to the accumulation type when read.
struct ScaleArg {
  const void* data = nullptr;
  int64_t stride = 0;
  bool is_double = false;
};

template <typename Acc>
POLYPRUNE_HD Acc scaled(const ScaleArg& s, int64_t n, Acc z) {
  if (s.data == nullptr) return z;
  const Acc f = s.is_double ? static_cast<Acc>(static_cast<const double*>(s.data)[n * s.stride])
                            : static_cast<Acc>(static_cast<const float*>(s.data)[n * s.stride]);
  return f * z;
}

// One operand as (N, C, S) strides, in elements, and the address of its first element, in bytes.
struct OperandLayout {
  int64_t n_stride = 0, c_stride = 0, s_stride = 1;
  uint64_t address = 0;
};

struct ReducePlan {
  ReduceKernel kernel = ReduceKernel::Rows;
  ReduceFinish finish = ReduceFinish::Direct;
  int64_t N = 0, C = 0, S = 0;
  int vec = 1;           // elements per load (1: scalar loads)
  int lanes = 1;         // rows: lanes per task (1, 8, 16 or 32); channels: lanes per position
                         // (a power of two up to 32); mixed: 32
  int64_t tiles = 1;     // channels, mixed: channel tiles per sample (lanes * vec or 32 channels)
  int64_t head = 0;      // rows with vec > 1: act's address in elements, mod vec
  // Filled in by size_reduce_grid, once the occupancy of the chosen kernel is known:
  int64_t splits = 1, chunk = 0;  // the spatial axis in `splits` runs of `chunk` positions
  int64_t tasks = 0;              // rows: N * C * splits; channels, mixed: N * tiles * splits
  int64_t groups_per_block = 1;   // tasks a block works on at once
  int64_t blocks = 1;             // grid size: tasks are walked with a grid-stride loop
  // The finish (not Direct): finish_lanes threads per output, a power of two up to
  // kFinishMaxLanes: finish_split_lanes of them (up to a warp) share each sample's splits, the
  // rest share the samples (reducing modes; per_sample outputs have one sample).
  int finish_lanes = 1, finish_split_lanes = 1;
};

inline bool spatial_inner(const OperandLayout& o, int64_t S) { return o.s_stride == 1 && S > 1; }
inline bool channel_inner(const OperandLayout& o, int64_t C) { return o.c_stride == 1 && C > 1; }

// Everything that does not depend on the GPU: which kernel, vector width, lanes, tiles.
inline ReducePlan choose_reduce_kernel(int64_t N, int64_t C, int64_t S, int64_t element_size,
                                       const OperandLayout& a, const OperandLayout& g) {
  ReducePlan p;
  p.N = N, p.C = C, p.S = S;
  const int64_t widest = kVectorBytes / element_size;
  if (S > 1 && channel_inner(a, C) && channel_inner(g, C)) {
    p.kernel = ReduceKernel::Channels;
    // 16-byte loads need every vector on a 16-byte boundary: aligned starts, and channel counts
    // and strides in whole vectors. Otherwise scalar loads (still coalesced: channels are
    // adjacent).
    auto aligned = [&](const OperandLayout& o) {
      return o.address % kVectorBytes == 0 && o.s_stride % widest == 0 &&
             (N == 1 || o.n_stride % widest == 0);
    };
    p.vec = C % widest == 0 && aligned(a) && aligned(g) ? static_cast<int>(widest) : 1;
    const int64_t vectors = C / p.vec;  // per position
    // Lanes per position: a power of two, so that the positions of a warp are whole lane sets
    // (C = 16 in float16 is 2 lanes, 16 positions per warp load: the whole warp is busy).
    p.lanes = static_cast<int>(std::min<int64_t>(kWarp, pow2_at_least(vectors)));
    p.tiles = ceil_div(vectors, p.lanes);
  } else if (S > 1 && ((spatial_inner(a, S) && channel_inner(g, C)) ||
                       (channel_inner(a, C) && spatial_inner(g, S)))) {
    p.kernel = ReduceKernel::Mixed;
    p.lanes = kWarp;
    p.tiles = ceil_div(C, kWarp);
  } else {
    // Rows: NCHW, S = 1 (a thread per (n, c): (N, C) inputs are read like an elementwise op),
    // and any other strides (correct, not coalesced).
    p.kernel = ReduceKernel::Rows;
    if (S >= 8) {
      // Same offset mod 16 bytes for every row of both operands: then one head of scalar loads
      // brings both to a 16-byte boundary, and the rest of the row is read in vectors.
      const bool same_alignment =
          a.s_stride == 1 && g.s_stride == 1 && a.address % element_size == 0 &&
          (a.address - g.address) % kVectorBytes == 0 &&
          (N == 1 || (a.n_stride - g.n_stride) % widest == 0) &&
          (C == 1 || (a.c_stride - g.c_stride) % widest == 0);
      p.vec = same_alignment ? static_cast<int>(widest) : 1;
      // The narrowest group (8, 16, 32 lanes) that gives each lane at most kItemsPerLane loads.
      // Never fewer than 8 lanes: 8 lanes of 16-byte loads read one whole 128-byte line.
      const int64_t vectors = ceil_div(S, p.vec);
      p.lanes = vectors <= 8 * kItemsPerLane ? 8 : vectors <= 16 * kItemsPerLane ? 16 : kWarp;
      p.head = p.vec > 1 ? static_cast<int64_t>(a.address / element_size % p.vec) : 0;
    }  // else tiny rows (S < 8, 1x1 maps, (N, C) inputs): one lane per row, scalar loads
  }
  return p;
}

// Grid and spatial splits, given the GPU: `sms` multiprocessors and `blocks_per_sm` resident
// blocks of the chosen kernel (cudaOccupancyMaxActiveBlocksPerMultiprocessor). One wave of
// resident blocks walks all tasks; the spatial axis is split until there are at least as many
// tasks as resident groups, but never into runs shorter than kItemsPerLane loads per lane.
inline void size_reduce_grid(ReducePlan& p, bool per_sample, int64_t sms, int64_t blocks_per_sm) {
  const int64_t capacity = std::max<int64_t>(1, sms * blocks_per_sm);  // resident blocks
  int64_t base, min_chunk, round = 1;
  switch (p.kernel) {
    case ReduceKernel::Rows:
      p.groups_per_block = kBlockThreads / p.lanes;
      base = p.N * p.C;
      min_chunk = p.lanes * p.vec * kItemsPerLane;
      break;
    case ReduceKernel::Channels:
      p.groups_per_block = kBlockThreads / kWarp;
      base = p.N * p.tiles;
      min_chunk = (kWarp / p.lanes) * kItemsPerLane;  // positions: one per slot and load
      break;
    default:  // Mixed: whole 32-position tiles
      p.groups_per_block = kMixedWarps;
      base = p.N * p.tiles;
      min_chunk = kWarp * kItemsPerLane / 2;
      round = kWarp;
      break;
  }
  const int64_t target = capacity * p.groups_per_block;
  p.splits = 1;
  p.chunk = std::max<int64_t>(p.S, 0);
  if (p.S > 0 && base > 0) {
    const int64_t most = std::max<int64_t>(1, p.S / min_chunk);
    const int64_t want = std::clamp<int64_t>(ceil_div(target, base), 1, most);
    p.chunk = ceil_div(ceil_div(p.S, want), round) * round;
    p.splits = ceil_div(p.S, p.chunk);  // no empty split after rounding
  }
  p.tasks = base * p.splits;
  p.blocks = std::clamp<int64_t>(ceil_div(p.tasks, p.groups_per_block), 1, capacity);
  const bool summed = p.splits > 1 || (!per_sample && p.N > 1);  // an output from several tasks
  p.finish = !summed                                          ? ReduceFinish::Direct
             : p.N * p.C * p.splits <= kLastBlockMaxPartials ? ReduceFinish::LastBlock
                                                              : ReduceFinish::Kernel;
  // Enough threads per output for about kFinishLoads loads each: one lane per split as far as a
  // warp goes, then lanes over the samples.
  const int64_t values = per_sample ? p.splits : p.N * p.splits;  // per output
  const int64_t most = per_sample ? std::min<int64_t>(kWarp, pow2_at_most(p.splits))
                                  : kFinishMaxLanes;
  p.finish_lanes = static_cast<int>(
      pow2_at_most(std::clamp<int64_t>(values / kFinishLoads, 1, most)));
  p.finish_split_lanes = static_cast<int>(
      std::min<int64_t>({p.finish_lanes, kWarp, pow2_at_most(p.splits)}));
}

// One task: sample n, channel c (rows) or channel tile (channels, mixed), positions
// [begin, end) of split `split`. Consecutive channel tiles are consecutive tasks, so that
// neighbouring warps read neighbouring memory of a channels_last tensor.
struct ReduceTask {
  int64_t n, c, split, begin, end;  // c: the channel (rows) or the channel tile
};

POLYPRUNE_HD ReduceTask reduce_task(const ReducePlan& p, int64_t task) {
  ReduceTask t;
  if (p.kernel == ReduceKernel::Rows) {
    const int64_t row = quot(task, p.splits);
    t.split = task - row * p.splits;
    t.n = quot(row, p.C);
    t.c = row - t.n * p.C;
  } else {
    const int64_t rest = quot(task, p.tiles);
    t.c = task - rest * p.tiles;
    t.n = quot(rest, p.splits);
    t.split = rest - t.n * p.splits;
  }
  t.begin = t.split * p.chunk;
  t.end = t.begin + p.chunk < p.S ? t.begin + p.chunk : p.S;
  return t;
}

// A run of `length` contiguous positions of a row starting at element offset `offset` (of act;
// grad has the same offset mod vec) cut into scalar head, whole vectors, scalar tail. Lane l of
// the group reads head element l, vectors l, l + lanes, ..., and tail element l.
struct RowPieces {
  int64_t head, vectors, tail;
};

POLYPRUNE_HD RowPieces row_pieces(const ReducePlan& p, int64_t offset, int64_t length) {
  if (p.vec == 1) return {0, length, 0};
  const int64_t mask = p.vec - 1;  // vec is a power of two
  int64_t head = (p.vec - ((p.head + offset) & mask)) & mask;
  head = head < length ? head : length;
  const int64_t vectors = quot_pow2(length - head, p.vec);
  return {head, vectors, length - head - vectors * p.vec};
}

// Loads lane `lane` of a group of `lanes` (a power of two) makes from `count` items spaced one
// group apart.
POLYPRUNE_HD int64_t lane_items(int64_t count, int64_t lane, int64_t lanes) {
  return lane < count ? quot_pow2(count - lane + lanes - 1, lanes) : 0;
}

// ---------------------------------------------------------------------------------------------
// compact_: on CUDA, kept elements are gathered into a scratch buffer and copied to the front.

// Moves of up to this many bytes go through one block's shared memory (no scratch buffer, one
// launch); larger ones through the batched scratch buffer, at the bandwidth of the whole GPU.
constexpr int64_t kCompactOneBlockBytes = 256 * 1024;

// The first element, in the compacted memory order, that is not already in place; `total` (the
// number of elements kept) when nothing moves. The tensor is (outer, K, inner) in memory order
// and slices keep[0..kept) of K stay.
inline int64_t compact_first_moved(int64_t outer, int64_t K, int64_t inner, const int64_t* keep,
                                   int64_t kept) {
  if (outer == 0 || inner == 0) return 0;
  int64_t j = 0;
  while (j < kept && keep[j] == j) ++j;
  if (j < kept) return j * inner;  // slice j of the first outer block is the first to move
  if (kept == K || outer == 1) return outer * kept * inner;  // a prefix: nothing moves
  return kept * inner;  // the second outer block starts at kept * inner but is read from K * inner
}

// At most 1/8 of the tensor's bytes, and at least one element: the op promises no
// tensor-sized allocation.
inline int64_t compact_scratch_cap_bytes(int64_t numel, int64_t element_size) {
  return std::max<int64_t>(1, numel / 8) * element_size;
}

struct CompactCopy {
  int64_t word_bytes = 1;     // bytes per load and store: 1, 2, 4, 8 or 16
  int64_t inner_words = 0;    // one kept slice, in words
  int64_t first = 0, total = 0;  // words [first, total) of the compacted tensor are written
  bool one_block = false;     // through shared memory; else in batches through scratch
  int64_t scratch_words = 0;  // batched: the scratch buffer, in words
  int64_t batches = 0;        // launches of gather + copy (1 for one_block, 0 if nothing moves)
};

// Words are the widest power of two up to 16 bytes that divides a slice and the address (so
// complex128 is one word, and 4 float16 of a slice of 4 are one), and fit the scratch cap.
inline CompactCopy plan_compact_copy(int64_t outer, int64_t K, int64_t inner, int64_t kept,
                                     const int64_t* keep, int64_t element_size, uint64_t address,
                                     int64_t numel) {
  CompactCopy c;
  const int64_t first = compact_first_moved(outer, K, inner, keep, kept);
  const int64_t total = outer * kept * inner;
  const int64_t cap = compact_scratch_cap_bytes(numel, element_size);
  const int64_t slice_bytes = inner * element_size;
  int64_t w = 16;
  while (w > 1 && (slice_bytes % w != 0 || address % w != 0 || w > cap)) w /= 2;
  c.word_bytes = w;
  c.inner_words = slice_bytes / w;
  c.first = first * element_size / w;
  c.total = total * element_size / w;
  const int64_t moved = c.total - c.first;
  if (moved <= 0) return c;
  c.one_block = moved * w <= kCompactOneBlockBytes;
  c.scratch_words = c.one_block ? 0 : std::min<int64_t>(moved, cap / w);
  c.batches = c.one_block ? 1 : ceil_div(moved, c.scratch_words);
  return c;
}

// Where compacted word i comes from (the CUDA kernels' index map).
POLYPRUNE_HD int64_t compact_source(int64_t i, int64_t K, int64_t kept, int64_t inner_words,
                                    const int64_t* keep) {
  const int64_t slice = quot(i, inner_words), e = i - slice * inner_words;
  const int64_t o = quot(slice, kept), j = slice - o * kept;
  return (o * K + keep[j]) * inner_words + e;
}

}  // namespace polyprune
