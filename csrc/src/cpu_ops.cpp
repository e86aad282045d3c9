// cpu_ops.cpp — conversions of small dense tensors (norm weights, biases) to float32.
#include "cpu_ops.h"

#include "errors.h"

namespace pumice {
namespace cpu {

void dense_to_f32(const TensorEntry &entry, float *out) {
    auto it = entry.parts.find("weight");
    if (entry.kind != "dense" || it == entry.parts.end())
        throw FormatError("tensor '" + entry.name + "' must be stored with kind 'dense', found '" +
                          entry.kind + "'");
    const Part &p = it->second;
    const int64_t n = p.numel();
    switch (p.dtype) {
        case DType::F32:
            std::memcpy(out, p.data, static_cast<size_t>(n) * sizeof(float));
            break;
        case DType::F16:
            for (int64_t i = 0; i < n; ++i) out[i] = simd::f16_to_f32(simd::load_u16(p.data + 2 * i));
            break;
        case DType::BF16:
            for (int64_t i = 0; i < n; ++i) out[i] = simd::bf16_to_f32(simd::load_u16(p.data + 2 * i));
            break;
        default:
            throw FormatError("tensor '" + entry.name + "': dense weight has dtype " +
                              dtype_name(p.dtype) + ", expected f32, f16 or bf16");
    }
}

std::vector<float> load_dense_vector(const TensorEntry &entry, int64_t n) {
    if (entry.shape.size() != 1 || entry.shape[0] != n)
        throw FormatError("tensor '" + entry.name + "' must have shape [" + std::to_string(n) + "]");
    std::vector<float> out(static_cast<size_t>(n));
    dense_to_f32(entry, out.data());
    return out;
}

}  // namespace cpu
}  // namespace pumice
