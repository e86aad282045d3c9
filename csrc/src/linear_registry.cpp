// linear_registry.cpp — storage kinds by name (see linear.h).
#include <map>
#include <mutex>

#include "errors.h"
#include "linear.h"

namespace pumice {

namespace {

// Function-local statics: kinds register from static initializers in other translation units,
// whose order relative to this one is unspecified.
std::map<std::string, LinearFactory> &registry() {
    static std::map<std::string, LinearFactory> kinds;
    return kinds;
}
std::mutex &registry_mutex() {
    static std::mutex m;
    return m;
}

std::string describe(const TensorView &view) {
    std::string name = view.entry ? view.entry->name : std::string("<unnamed>");
    if (!view.prefix.empty()) name += " (part prefix '" + view.prefix + "')";
    return name;
}

}  // namespace

bool register_linear_kind(const std::string &kind, LinearFactory factory) {
    std::lock_guard<std::mutex> lock(registry_mutex());
    registry()[kind] = std::move(factory);
    return true;
}

std::unique_ptr<LinearOp> make_linear(const TensorView &view, const std::string &kind) {
    LinearFactory factory;
    {
        std::lock_guard<std::mutex> lock(registry_mutex());
        auto it = registry().find(kind);
        if (it == registry().end()) {
            std::string known;
            for (const auto &k : registry()) known += (known.empty() ? "" : ", ") + k.first;
            throw UnsupportedError("tensor '" + describe(view) + "': storage kind '" + kind +
                                   "' is not supported by this build as a linear operator" +
                                   (known.empty() ? std::string() : " (known: " + known + ")"));
        }
        factory = it->second;
    }
    if (view.shape.size() != 2)
        throw FormatError("tensor '" + describe(view) + "' of kind '" + kind +
                          "' is used as a linear layer but is not 2-D");
    if (view.shape[0] <= 0 || view.shape[1] <= 0)
        throw FormatError("tensor '" + describe(view) + "' has an empty shape");
    std::unique_ptr<LinearOp> op = factory(view);
    if (!op) throw UnsupportedError("tensor '" + describe(view) + "': kind '" + kind +
                                    "' produced no operator");
    return op;
}

std::unique_ptr<LinearOp> make_linear(const TensorEntry &entry) {
    TensorView view{&entry, "", &entry.params, entry.shape};
    return make_linear(view, entry.kind);
}

}  // namespace pumice
