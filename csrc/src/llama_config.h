// llama_config.h — the hyper-parameters of a Llama-family model, read from the file's metadata.
#pragma once
#include <cstdint>
#include <string>

#include "json.h"

namespace pumice {

struct LlamaConfig {
    // "llama", or "tensors": a file of tensors only (kernel tests, benchmarks). A "tensors"
    // config has zero sizes; a backend then serves linear_apply only and refuses sessions.
    std::string architecture = "llama";
    int32_t vocab_size = 0;
    int32_t hidden_size = 0;
    int32_t intermediate_size = 0;
    int32_t num_layers = 0;
    int32_t num_heads = 0;
    int32_t num_kv_heads = 0;
    int32_t head_dim = 0;
    int32_t max_context = 0;
    float rms_norm_eps = 1e-5f;
    float rope_theta = 10000.0f;
    // rope_scaling: "none", "llama3" or "linear"
    std::string rope_type = "none";
    float rope_factor = 1.0f;
    float rope_low_freq_factor = 1.0f;
    float rope_high_freq_factor = 4.0f;
    int32_t rope_original_max_position = 8192;
    bool tie_word_embeddings = false;
    bool attention_bias = false;
    bool mlp_bias = false;

    bool tensors_only() const { return architecture == "tensors"; }

    // Reads metadata["architecture"] and metadata["config"] (not needed for "tensors"); throws
    // FormatError / UnsupportedError naming the offending key.
    static LlamaConfig from_metadata(const Json &metadata);
    // Inverse frequencies of RoPE (head_dim / 2 values) with any scaling applied.
    void rope_inv_freq(float *out) const;
};

}  // namespace pumice
