// llama_config.cpp — read and check a Llama model's hyper-parameters (FORMAT.md section 2.1).
#include "llama_config.h"

#include <cmath>
#include <limits>

#include "errors.h"

namespace pumice {

namespace {

const Json &require(const Json &config, const char *key) {
    const Json *v = config.find(key);
    if (!v) throw FormatError(std::string("config: missing key '") + key + "'");
    return *v;
}

int32_t positive_int(const Json &config, const char *key) {
    const Json &v = require(config, key);
    if (!v.is_number()) throw FormatError(std::string("config: '") + key + "' must be an integer");
    int64_t i;
    try {
        i = v.as_int();
    } catch (const FormatError &) {
        throw FormatError(std::string("config: '") + key + "' must be an integer");
    }
    if (i <= 0 || i > std::numeric_limits<int32_t>::max())
        throw FormatError(std::string("config: '") + key + "' is " + std::to_string(i) +
                          ", must be a positive 32-bit integer");
    return static_cast<int32_t>(i);
}

double positive_number(const Json &obj, const char *key, const char *where = "config") {
    const Json &v = obj.find(key) ? *obj.find(key)
                                  : throw FormatError(std::string(where) + ": missing key '" + key + "'");
    if (!v.is_number()) throw FormatError(std::string(where) + ": '" + key + "' must be a number");
    double d = v.as_number();
    if (!(d > 0) || !std::isfinite(d))
        throw FormatError(std::string(where) + ": '" + key + "' must be a positive number");
    return d;
}

bool boolean(const Json &config, const char *key) {
    const Json &v = require(config, key);
    if (v.type() != Json::Type::Bool) throw FormatError(std::string("config: '") + key + "' must be true or false");
    return v.as_bool();
}

}  // namespace

LlamaConfig LlamaConfig::from_metadata(const Json &metadata) {
    LlamaConfig c;
    const Json *arch = metadata.find("architecture");
    if (!arch) throw FormatError("metadata: missing key 'architecture'");
    if (!arch->is_string()) throw FormatError("metadata: 'architecture' must be a string");
    c.architecture = arch->as_string();
    if (c.architecture == "tensors") return c;
    if (c.architecture != "llama")
        throw UnsupportedError("architecture '" + c.architecture +
                               "' is not supported (this library runs 'llama' models)");

    const Json *config = metadata.find("config");
    if (!config) throw FormatError("metadata: missing key 'config'");
    if (!config->is_object()) throw FormatError("metadata: 'config' must be an object");
    const Json &cfg = *config;

    c.vocab_size = positive_int(cfg, "vocab_size");
    c.hidden_size = positive_int(cfg, "hidden_size");
    c.intermediate_size = positive_int(cfg, "intermediate_size");
    c.num_layers = positive_int(cfg, "num_hidden_layers");
    c.num_heads = positive_int(cfg, "num_attention_heads");
    c.num_kv_heads = positive_int(cfg, "num_key_value_heads");
    c.head_dim = positive_int(cfg, "head_dim");
    c.max_context = positive_int(cfg, "max_position_embeddings");
    c.rms_norm_eps = static_cast<float>(positive_number(cfg, "rms_norm_eps"));
    c.rope_theta = static_cast<float>(positive_number(cfg, "rope_theta"));
    c.tie_word_embeddings = boolean(cfg, "tie_word_embeddings");
    c.attention_bias = boolean(cfg, "attention_bias");
    c.mlp_bias = boolean(cfg, "mlp_bias");

    if (c.num_heads % c.num_kv_heads != 0)
        throw FormatError("config: num_key_value_heads " + std::to_string(c.num_kv_heads) +
                          " does not divide num_attention_heads " + std::to_string(c.num_heads));
    if (c.head_dim % 2 != 0)
        throw FormatError("config: head_dim " + std::to_string(c.head_dim) + " must be even for RoPE");
    if (int64_t(c.num_heads) * c.head_dim > std::numeric_limits<int32_t>::max())
        throw FormatError("config: num_attention_heads x head_dim is too large");

    const Json *scaling = cfg.find("rope_scaling");
    if (scaling && !scaling->is_null()) {
        if (!scaling->is_object()) throw FormatError("config: 'rope_scaling' must be an object or null");
        // Older Hugging Face configs name the field "type".
        const Json *type = scaling->find("rope_type");
        if (!type) type = scaling->find("type");
        if (!type || !type->is_string()) throw FormatError("config: rope_scaling has no 'rope_type' string");
        const std::string &t = type->as_string();
        const char *where = "config.rope_scaling";
        if (t == "default") {
            c.rope_type = "none";
        } else if (t == "linear") {
            c.rope_type = "linear";
            c.rope_factor = static_cast<float>(positive_number(*scaling, "factor", where));
        } else if (t == "llama3") {
            c.rope_type = "llama3";
            c.rope_factor = static_cast<float>(positive_number(*scaling, "factor", where));
            c.rope_low_freq_factor = static_cast<float>(positive_number(*scaling, "low_freq_factor", where));
            c.rope_high_freq_factor = static_cast<float>(positive_number(*scaling, "high_freq_factor", where));
            c.rope_original_max_position = positive_int(*scaling, "original_max_position_embeddings");
            if (!(c.rope_high_freq_factor > c.rope_low_freq_factor))
                throw FormatError("config.rope_scaling: high_freq_factor must exceed low_freq_factor");
        } else {
            throw UnsupportedError("rope_scaling type '" + t +
                                   "' is not supported (supported: llama3, linear, or none)");
        }
    }
    return c;
}

// Mirrors Hugging Face transformers step by step in float32 (default, linear and llama3 RoPE),
// so that positions map to the very same angles as in the reference implementation.
void LlamaConfig::rope_inv_freq(float *out) const {
    const int half = head_dim / 2;
    for (int i = 0; i < half; ++i) {
        float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
        float base_pow = static_cast<float>(std::pow(static_cast<double>(rope_theta), static_cast<double>(exponent)));
        out[i] = 1.0f / base_pow;
    }
    if (rope_type == "linear") {
        for (int i = 0; i < half; ++i) out[i] /= rope_factor;
    } else if (rope_type == "llama3") {
        const double old_len = static_cast<double>(rope_original_max_position);
        const float low_freq_wavelen = static_cast<float>(old_len / rope_low_freq_factor);
        const float high_freq_wavelen = static_cast<float>(old_len / rope_high_freq_factor);
        for (int i = 0; i < half; ++i) {
            const float inv = out[i];
            const float wavelen = static_cast<float>(2.0 * M_PI) / inv;
            float scaled = wavelen > low_freq_wavelen ? inv / rope_factor : inv;
            const float smooth = (static_cast<float>(old_len) / wavelen - rope_low_freq_factor) /
                                 (rope_high_freq_factor - rope_low_freq_factor);
            const float smoothed = (1.0f - smooth) * scaled / rope_factor + smooth * scaled;
            const bool medium = !(wavelen < high_freq_wavelen) && !(wavelen > low_freq_wavelen);
            out[i] = medium ? smoothed : scaled;
        }
    }
}

}  // namespace pumice
