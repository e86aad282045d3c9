// model_file.h — a validated, memory-mapped .pumice file (docs/FORMAT.md).
#pragma once
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "json.h"

namespace pumice {

enum class DType { F32, F16, BF16, I8, U8, I16, U16, I32, U32 };
size_t dtype_size(DType t);
const char *dtype_name(DType t);

// One byte region of the data section, already bounds- and CRC-checked.
struct Part {
    DType dtype;
    std::vector<int64_t> shape;
    const uint8_t *data = nullptr;  // points into the mapping
    uint64_t length = 0;
    int64_t numel() const;
};

struct TensorEntry {
    std::string name;
    std::string kind;
    std::vector<int64_t> shape;
    Json params;                       // the entry's "params" object
    std::map<std::string, Part> parts;  // by part name (composite kinds use "q.codes" etc.)
};

// A view of a tensor's parts under a prefix, so that composite kinds (caldera = Q + L + R) can
// build their sub-operators with the same code as a top-level tensor of that kind.
struct TensorView {
    const TensorEntry *entry;
    std::string prefix;   // "" for a top-level tensor, "q." for CALDERA's backbone, ...
    const Json *params;   // params object for this (sub-)tensor
    std::vector<int64_t> shape;
    // Throws FormatError naming the tensor if the part is missing or its dtype/shape differ.
    const Part &part(const std::string &name, DType dtype, const std::vector<int64_t> &shape) const;
    bool has_part(const std::string &name) const;
    // Parameter accessors that throw FormatError with the tensor name on a missing/bad value.
    int64_t int_param(const std::string &key) const;
    double float_param(const std::string &key) const;
    const std::string &name() const { return entry->name; }
};

class ModelFile {
public:
    // Maps and validates the file; throws IoError / FormatError with a clear message.
    static std::unique_ptr<ModelFile> open(const std::string &path, bool verify_checksums);
    ~ModelFile();

    const Json &metadata() const { return metadata_; }
    const Json &config() const { return metadata_.at("config"); }
    const TensorEntry *find(const std::string &name) const;  // nullptr if absent
    const TensorEntry &get(const std::string &name) const;   // throws FormatError if absent
    const std::vector<TensorEntry> &tensors() const { return tensors_; }
    uint64_t data_length() const { return data_length_; }

private:
    ModelFile() = default;
    void *map_ = nullptr;
    size_t map_size_ = 0;
    uint64_t data_length_ = 0;
    Json metadata_;
    std::vector<TensorEntry> tensors_;
    std::map<std::string, size_t> index_;
};

}  // namespace pumice
