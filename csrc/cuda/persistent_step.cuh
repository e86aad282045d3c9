// persistent_step.cuh — a whole batch-1 decode step (embedding to logits) as one kernel.
//
// Why: a step of ~160 dependent launches pays ~2.5 us per launch before any weight moves
// (docs/CUDA.md, "The floor under a kernel-per-matrix step"); here one block per SM keeps its
// weights streaming through every dependency. Per SM, a producer thread copies the SM's work
// items (up to 32 units of one row block: codes, then scales) with cp.async.bulk into a ring of
// shared-memory stages and never waits for anything but a free stage; 16 consumer warps in two
// groups take the stages in turn and multiply them with int8 tensor-core mmas against an int8
// image of the activation held in shared memory. Matrices are separated by grid barriers; the
// attention of each layer is a phase between two of them.
//
// The int8 activation image: every 16 consecutive inputs ("a half", one row tile of the
// producing matrix) are quantized as q = rint(x / d), d = max|x| / 127, stored in the byte
// order the mma's B fragments want (see persistent_step.cu), with {d, 1.5 (X - d Q), X}
// (X the sum of x, Q of q). The producing epilogue writes them, so one tile's rows never need
// another SM's. Only for 2-bit rtn weights whose 32-input runs lie in one quantization group.
#pragma once
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cstdint>
#include <string>

#include "kernels.cuh"

namespace pumice {
namespace cuda {

// One matrix in the tiled layout: row blocks of `tiles_per_block` consecutive stored tiles
// (2 for gate/up: a gate tile and its up tile), each of `units` units.
struct PersistentMatrix {
    const uint4 *codes = nullptr;
    const unsigned char *scales = nullptr;  // scale_min as bytes
    int row_blocks = 0, tiles_per_block = 1, units = 0;
    int scale_bytes_per_unit = 0;  // 8192 / group_size
};

struct PersistentLayer {
    PersistentMatrix qkv, o, gate_up, down;
    const float *attn_norm = nullptr, *mlp_norm = nullptr;
};

struct PersistentStep {
    const PersistentLayer *layers = nullptr;  // device array
    int n_layers = 0;
    WeightView embed;                  // the token's row becomes the residual
    // The head in up to kPersistentHeadParts consecutive row ranges (no barrier between them: a
    // tall head would need more items per SM than shared memory holds); n_head_parts == 0: the
    // head runs as its own launch.
    PersistentMatrix head[4];
    int head_tile0[4] = {0, 0, 0, 0};  // first tile of each part
    int n_head_parts = 0;
    float *logits = nullptr;           // [vocab] when the head is in the kernel
    int vocab = 0;
    const StepColumn *cols = nullptr;  // column 0 only
    const float *final_norm = nullptr, *inv_freq = nullptr;
    __half *q = nullptr;               // rotated queries [q_rows]
    // Activation images: of the normed residual, attention's output, SwiGLU's output.
    uint4 *img_x = nullptr, *img_att = nullptr, *img_act = nullptr;
    float4 *runs_x = nullptr, *runs_att = nullptr, *runs_act = nullptr;
    float *sumsq = nullptr;            // per hidden tile: sum of squares of the residual rows
    float *part_o = nullptr;           // attention splits [head][kMaxPersistentSplits][head_dim]
    float2 *part_ml = nullptr;         // [head][kMaxPersistentSplits]
    int *att_counters = nullptr;       // [head], zero between steps
    // Otherwise what the head GEMV reads (its fused RMSNorm): half(resid * final_norm / 16), partials.
    __half *xn = nullptr;
    float *norm_partials = nullptr;
    unsigned *barrier = nullptr;       // zeroed before every launch
    int hidden = 0, q_rows = 0, kv_rows = 0, inter = 0, n_heads = 0, n_kv_heads = 0, head_dim = 0;
    float eps = 0.f;
    int stages = 0, stage_bytes = 0, image_bytes = 0;  // shared-memory layout
    bool skip_attention = false;       // timing of the GEMVs alone (wrong results)
    int skip = 0;                      // kPersistentSkip* bits: timing experiments (wrong results)
};

// Parts left out to see what they cost (benchmarks only: the results are wrong).
enum PersistentSkip : int {
    kPersistentSkipMath = 1,       // consumers take and hand back stages without multiplying
    kPersistentSkipEpilogue = 2,   // no epilogues (no outputs, images, residual updates)
    kPersistentSkipBarriers = 4,   // no grid barriers
    kPersistentSkipStaging = 8,    // no copies of the image into shared memory, no norm scales
    kPersistentSkipStream = 16,    // the producer hands over stages without copying weights into them
};

constexpr int kMaxPersistentSplits = 1024;
constexpr int kPersistentItemsPerMatrix = 24;  // items of one matrix on one SM (shared memory)
constexpr int kPersistentChunkUnits = 32;
constexpr int kPersistentHeadParts = 4;
constexpr int kPersistentOwnedTiles = 8;       // residual tiles of one SM (hidden <= 8 * 16 * SMs)

// Dynamic shared memory the kernel needs for this step's layout.
size_t persistent_smem_bytes(const PersistentStep &p);
// Whether this device can run p's layout on num_sms blocks (sm_90 or later, the shared memory,
// one resident block per SM); why not otherwise.
bool persistent_step_supported(int device, const PersistentStep &p, int num_sms, std::string *why);
// Grid: one block per SM. The caller zeroes p.barrier first (in the same stream).
void launch_persistent_step(const PersistentStep &p, int num_sms, cudaStream_t stream);

}  // namespace cuda
}  // namespace pumice
