// weights.cu — see weights.cuh.
#include "weights.cuh"

#include <cuda_fp16.h>

#include <cstring>

#include "kernels.cuh"
#include "linear.h"

namespace pumice {
namespace cuda {
namespace {

struct Format {
    int bits = 16;
    int group_size = 0;
    bool operator==(const Format &o) const { return bits == o.bits && group_size == o.group_size; }
};

float half_bits_to_float(uint16_t h) {
    __half_raw raw;
    raw.x = h;
    return __half2float(__half(raw));
}

// The stored format a tensor keeps on the GPU, or bits 0 if it needs the host fallback.
Format native_format(const TensorEntry &e) {
    if (e.kind == "dense" && e.shape.size() == 2) return {16, 0};
    if (e.kind == "rtn") {
        const Json *b = e.params.find("bits"), *g = e.params.find("group_size");
        if (b && g && b->is_number() && g->is_number()) {
            const int64_t bits = b->as_int(), group = g->as_int();
            if ((bits == 2 || bits == 3 || bits == 4 || bits == 8) && group >= 32 && group % 32 == 0)
                return {static_cast<int>(bits), static_cast<int>(group)};
        }
    }
    return {0, 0};
}

// Copies a host region into a fresh device buffer.
DeviceBuffer upload(const void *data, size_t bytes, const char *what, cudaStream_t stream) {
    DeviceBuffer buf(bytes == 0 ? 1 : bytes, what);
    if (bytes) PUMICE_CUDA_CHECK(cudaMemcpyAsync(buf.get(), data, bytes, cudaMemcpyHostToDevice, stream));
    return buf;
}

}  // namespace

std::string native_format_note(const TensorEntry &entry) {
    return native_format(entry).bits ? "" : "kind '" + entry.kind + "' is dequantized to f16 at load";
}

std::vector<float> dense_vector_f32(const TensorEntry &e) {
    if (e.kind != "dense") throw FormatError("tensor '" + e.name + "': expected kind dense, got " + e.kind);
    auto it = e.parts.find("weight");
    if (it == e.parts.end()) throw FormatError("tensor '" + e.name + "': missing part 'weight'");
    const Part &p = it->second;
    const int64_t n = p.numel();
    std::vector<float> out(static_cast<size_t>(n));
    switch (p.dtype) {
        case DType::F32: std::memcpy(out.data(), p.data, n * sizeof(float)); break;
        case DType::F16:
            for (int64_t i = 0; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, p.data + 2 * i, 2);
                out[i] = half_bits_to_float(h);
            }
            break;
        case DType::BF16:
            for (int64_t i = 0; i < n; ++i) {
                uint16_t h;
                std::memcpy(&h, p.data + 2 * i, 2);
                const uint32_t bits = static_cast<uint32_t>(h) << 16;
                std::memcpy(&out[i], &bits, 4);
            }
            break;
        default: throw FormatError("tensor '" + e.name + "': dense weight must be f32, f16 or bf16");
    }
    return out;
}

std::unique_ptr<TiledWeight> load_fused(const std::vector<FusePart> &parts, int64_t n_tiles_total,
                                        cudaStream_t stream, std::vector<LinearSlot> *slots) {
    if (parts.empty()) throw Error(PUMICE_ERR_INTERNAL, "load_fused: no parts");
    const int64_t k = parts[0].entry->shape.size() == 2 ? parts[0].entry->shape[1] : 0;
    Format fmt = native_format(*parts[0].entry);
    for (const FusePart &p : parts) {
        const TensorEntry &e = *p.entry;
        if (e.shape.size() != 2) throw FormatError("tensor '" + e.name + "' is not a matrix");
        if (e.shape[1] != k)
            throw FormatError("tensor '" + e.name + "' has in_features " + std::to_string(e.shape[1]) +
                              ", expected " + std::to_string(k));
        if (!(native_format(e) == fmt)) fmt = {0, 0};
    }
    const bool host_fallback = fmt.bits == 0;
    if (host_fallback) fmt = {16, 0};

    auto w = std::make_unique<TiledWeight>();
    WeightView &v = w->view;
    v.bits = fmt.bits;
    v.group_size = fmt.group_size;
    v.kp = round_up(k, unit_k(fmt.bits));
    v.units = v.kp / unit_k(fmt.bits);
    v.groups = fmt.group_size ? ceil_div(v.kp, fmt.group_size) : 0;
    w->n_tiles = n_tiles_total;
    w->k = k;
    const size_t slots_n = static_cast<size_t>(n_tiles_total * v.units * 32);
    w->codes.allocate(slots_n * sizeof(uint4), "weight codes");
    if (fmt.bits == 3) w->plane1.allocate(slots_n * sizeof(uint2), "weight codes (third bit)");
    if (fmt.bits != 16) w->scale_min.allocate(static_cast<size_t>(n_tiles_total * v.groups * 8) * sizeof(uint2), "weight scales");
    // Unwritten tiles (padding between parts) must read as zeros.
    w->codes.zero(stream);
    if (w->plane1) w->plane1.zero(stream);
    if (w->scale_min) w->scale_min.zero(stream);
    v.codes = w->codes.as<uint4>();
    v.plane1 = w->plane1.as<uint2>();
    v.scale_min = w->scale_min.as<uint2>();

    const size_t first_slot = slots ? slots->size() : 0;
    for (const FusePart &p : parts) {
        const TensorEntry &e = *p.entry;
        // Validates the parts (dtype, shape, params) with the CPU kind's own checks.
        std::unique_ptr<LinearOp> op = make_linear(e);
        RepackSource src;
        src.n = e.shape[0];
        src.k = k;
        src.perm_d = p.perm_d;
        src.tile_base = p.tile_base;
        src.tile_stride = p.tile_stride;
        DeviceBuffer d_weight, d_codes, d_scales, d_mins;
        if (host_fallback) {
            std::vector<float> dense(static_cast<size_t>(src.n * k));
            op->dequantize(dense.data());
            d_weight = upload(dense.data(), dense.size() * sizeof(float), "weight upload", stream);
            src.dense_dtype = 0;
            src.weight = d_weight.get();
            PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream));  // `dense` dies at scope end
        } else if (fmt.bits == 16) {
            const Part &wp = e.parts.at("weight");
            d_weight = upload(wp.data, wp.length, "weight upload", stream);
            src.dense_dtype = wp.dtype == DType::F32 ? 0 : wp.dtype == DType::F16 ? 1 : 2;
            if (wp.dtype != DType::F32 && wp.dtype != DType::F16 && wp.dtype != DType::BF16)
                throw FormatError("tensor '" + e.name + "': dense weight must be f32, f16 or bf16");
            src.weight = d_weight.get();
        } else {
            const Part &cp = e.parts.at("codes"), &sp = e.parts.at("scales"), &mp = e.parts.at("mins");
            d_codes = upload(cp.data, cp.length, "weight upload", stream);
            d_scales = upload(sp.data, sp.length, "weight upload", stream);
            d_mins = upload(mp.data, mp.length, "weight upload", stream);
            src.codes = d_codes.as<uint8_t>();
            src.scales = d_scales.as<__half>();
            src.mins = d_mins.as<__half>();
            src.code_row_bytes = cp.shape.size() == 2 ? cp.shape[1] : 0;
            src.src_groups = ceil_div(k, fmt.group_size);
            if (src.code_row_bytes != round_up(k, 32) * fmt.bits / 8)
                throw FormatError("tensor '" + e.name + "': codes rows have the wrong length");
        }
        launch_repack(src, v.codes ? const_cast<uint4 *>(v.codes) : nullptr, const_cast<uint2 *>(v.plane1),
                      const_cast<uint2 *>(v.scale_min), v, stream);
        // The temporaries are freed at scope end; the repack must finish reading them first.
        PUMICE_CUDA_CHECK(cudaStreamSynchronize(stream));
        if (slots) {
            LinearSlot s;
            s.tile_base = p.tile_base;
            s.tile_stride = p.tile_stride;
            s.n_tiles = ceil_div(src.n, 16);
            s.n_rows = src.n;
            s.k = k;
            s.perm_d = p.perm_d;
            slots->push_back(s);
        }
    }
    if (slots)
        for (size_t i = first_slot; i < slots->size(); ++i) (*slots)[i].weight = w.get();
    return w;
}

}  // namespace cuda
}  // namespace pumice
