// device_linear.cu — choosing a tensor's GPU form, and the tiled form run on its own.
#include "device_linear.cuh"

#include "kernels.cuh"
#include "weights.cuh"

namespace pumice {
namespace cuda {
namespace {

// A tiled weight (rtn/dense natively, other kinds through the host f16 fallback) of one tensor.
class TiledDeviceLinear final : public DeviceLinear {
public:
    TiledDeviceLinear(const TensorEntry &e, int perm_d, cudaStream_t stream) : perm_d_(perm_d), num_sms_(num_sms()) {
        std::vector<LinearSlot> slots;
        weight_ = load_fused({FusePart{&e, perm_d, 0, 1}}, ceil_div(e.shape.at(0), 16), stream, &slots);
        slot_ = slots.at(0);
    }
    int64_t out_features() const override { return slot_.n_rows; }
    int64_t in_features() const override { return slot_.k; }
    int64_t bytes() const override { return weight_->bytes(); }

    void apply(const __half *x, int64_t ldx, int n_cols, float *out, int64_t ldo, const RowMap &map,
               cudaStream_t stream) const override {
        check_map(map);
        GemvCall c;
        c.w = weight_->view;
        c.n_tiles = slot_.n_tiles;
        c.x = x;
        c.ldx = ldx;
        c.batch = n_cols;
        c.epi.mode = EPI_F32_TILES;
        c.epi.n_rows = slot_.n_rows;
        c.epi.out_f32 = out;
        c.epi.ldo = ldo;
        c.epi.out_tile_base = map.tile_base;
        c.epi.out_tile_stride = map.tile_stride;
        launch_gemv(c, num_sms_, stream);
    }

    void dequantize_f16(__half *out, int64_t ldo, const RowMap &map, void *, cudaStream_t stream) const override {
        check_map(map);
        launch_dequantize_f16(weight_->view, slot_.n_tiles, out, ldo, map.tile_base, map.tile_stride, stream);
    }

private:
    // The rows are stored permuted at load; a map must ask for that same permutation.
    void check_map(const RowMap &map) const {
        if (map.perm_d != perm_d_) throw Error(PUMICE_ERR_INTERNAL, "tiled linear: row permutation differs from load");
    }
    static int num_sms() {
        int device = 0, sms = 1;
        PUMICE_CUDA_CHECK(cudaGetDevice(&device));
        PUMICE_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
        return sms;
    }
    int perm_d_;
    int num_sms_;
    std::unique_ptr<TiledWeight> weight_;
    LinearSlot slot_;
};

}  // namespace

std::unique_ptr<DeviceLinear> make_native_device_linear(const TensorEntry &entry, cudaStream_t stream) {
    if (entry.kind == "bcq") return make_bcq_device_linear(entry, stream);
    if (entry.kind == "caldera" || entry.kind == "lplr") return make_caldera_device_linear(entry, stream);
    return nullptr;
}

std::unique_ptr<DeviceLinear> make_device_linear(const TensorEntry &entry, int perm_d, cudaStream_t stream) {
    if (auto native = make_native_device_linear(entry, stream)) return native;
    return std::make_unique<TiledDeviceLinear>(entry, perm_d, stream);
}

}  // namespace cuda
}  // namespace pumice
