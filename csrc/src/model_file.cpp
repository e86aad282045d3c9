// model_file.cpp — map a .pumice file read-only and validate everything docs/FORMAT.md promises
// before any other code touches it: the fixed header (in the order section 1.1 prescribes), the
// header JSON, every tensor entry and every part (types, sizes, alignment, bounds, overlap,
// CRC-32). After open() succeeds, kinds and backends may trust offsets and lengths blindly.
#include "model_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <atomic>
#include <set>
#include <system_error>
#include <thread>

#include "crc32.h"
#include "errors.h"

namespace pumice {

namespace {

constexpr unsigned char kMagic[8] = {0x50, 0x55, 0x4D, 0x49, 0x43, 0x45, 0x00, 0x1A};
constexpr uint32_t kVersion = 1;
constexpr uint64_t kFixedHeaderSize = 64;

uint32_t read_u32(const unsigned char *p) {
    return uint32_t(p[0]) | uint32_t(p[1]) << 8 | uint32_t(p[2]) << 16 | uint32_t(p[3]) << 24;
}
uint64_t read_u64(const unsigned char *p) { return uint64_t(read_u32(p)) | uint64_t(read_u32(p + 4)) << 32; }

std::string hex32(uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
}

std::string shape_str(const std::vector<int64_t> &shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

bool parse_dtype(const std::string &name, DType &out) {
    static const std::pair<const char *, DType> table[] = {
        {"f32", DType::F32}, {"f16", DType::F16}, {"bf16", DType::BF16}, {"i8", DType::I8},
        {"u8", DType::U8},   {"i16", DType::I16}, {"u16", DType::U16},   {"i32", DType::I32},
        {"u32", DType::U32}};
    for (const auto &e : table)
        if (name == e.first) { out = e.second; return true; }
    return false;
}

struct CrcCheck {
    const uint8_t *data;
    uint64_t length;
    uint32_t expected;
    std::string where;
    uint32_t actual;
};

// Checksums every part; the work is split across threads in slices that are then combined in
// order, so one huge part (an embedding) does not serialise the check. The weights of a large
// model are gigabytes, which one core would need seconds to read through.
void verify_crcs(std::vector<CrcCheck> &checks) {
    constexpr uint64_t kSlice = 8u << 20;
    struct Slice {
        size_t check;
        uint64_t begin, end;
        uint32_t crc;
    };
    std::vector<Slice> slices;
    for (size_t i = 0; i < checks.size(); ++i) {
        const uint64_t n = checks[i].length;
        if (n == 0) slices.push_back({i, 0, 0, 0});
        for (uint64_t b = 0; b < n; b += kSlice) slices.push_back({i, b, std::min(n, b + kSlice), 0});
    }
    std::atomic<size_t> next{0};
    auto work = [&] {
        for (size_t s; (s = next.fetch_add(1)) < slices.size();) {
            Slice &sl = slices[s];
            sl.crc = crc32(checks[sl.check].data + sl.begin, static_cast<size_t>(sl.end - sl.begin));
        }
    };
    unsigned n_threads = std::min<unsigned>(std::max(1u, std::thread::hardware_concurrency()), 16);
    n_threads = static_cast<unsigned>(std::min<size_t>(n_threads, slices.size() / 2 + 1));
    std::vector<std::thread> threads;
    try {
        for (unsigned t = 1; t < n_threads; ++t) threads.emplace_back(work);
    } catch (const std::system_error &) {
        // No more threads: the ones we have (at least this one) finish the job.
    }
    work();
    for (auto &t : threads) t.join();
    for (CrcCheck &c : checks) c.actual = 0;
    for (const Slice &sl : slices)
        checks[sl.check].actual = sl.begin == 0 ? sl.crc
                                                : crc32_combine(checks[sl.check].actual, sl.crc,
                                                                sl.end - sl.begin);
}

// Closes a file descriptor on every path out of open().
struct FdGuard {
    int fd;
    ~FdGuard() { if (fd >= 0) ::close(fd); }
};

}  // namespace

size_t dtype_size(DType t) {
    switch (t) {
        case DType::F32: case DType::I32: case DType::U32: return 4;
        case DType::F16: case DType::BF16: case DType::I16: case DType::U16: return 2;
        case DType::I8: case DType::U8: return 1;
    }
    return 0;
}

const char *dtype_name(DType t) {
    switch (t) {
        case DType::F32: return "f32";
        case DType::F16: return "f16";
        case DType::BF16: return "bf16";
        case DType::I8: return "i8";
        case DType::U8: return "u8";
        case DType::I16: return "i16";
        case DType::U16: return "u16";
        case DType::I32: return "i32";
        case DType::U32: return "u32";
    }
    return "?";
}

int64_t Part::numel() const {
    int64_t n = 1;
    for (int64_t d : shape) n *= d;  // cannot overflow: checked at open against `length`
    return n;
}

// ---- TensorView -------------------------------------------------------------------------------

const Part &TensorView::part(const std::string &name, DType dtype,
                             const std::vector<int64_t> &want_shape) const {
    const std::string full = prefix + name;
    auto it = entry->parts.find(full);
    if (it == entry->parts.end())
        throw FormatError("tensor '" + entry->name + "' (kind '" + entry->kind + "'): missing part '" +
                          full + "'");
    const Part &p = it->second;
    if (p.dtype != dtype)
        throw FormatError("tensor '" + entry->name + "' part '" + full + "' has dtype " +
                          dtype_name(p.dtype) + ", expected " + dtype_name(dtype));
    if (p.shape != want_shape)
        throw FormatError("tensor '" + entry->name + "' part '" + full + "' has shape " +
                          shape_str(p.shape) + ", expected " + shape_str(want_shape));
    return p;
}

bool TensorView::has_part(const std::string &name) const {
    return entry->parts.count(prefix + name) != 0;
}

int64_t TensorView::int_param(const std::string &key) const {
    const Json *v = params ? params->find(key) : nullptr;
    if (!v) throw FormatError("tensor '" + entry->name + "': missing parameter '" + prefix + key + "'");
    if (!v->is_number())
        throw FormatError("tensor '" + entry->name + "': parameter '" + prefix + key + "' is not a number");
    try {
        return v->as_int();
    } catch (const FormatError &e) {
        throw FormatError("tensor '" + entry->name + "': parameter '" + prefix + key + "': " + e.what());
    }
}

double TensorView::float_param(const std::string &key) const {
    const Json *v = params ? params->find(key) : nullptr;
    if (!v) throw FormatError("tensor '" + entry->name + "': missing parameter '" + prefix + key + "'");
    if (!v->is_number())
        throw FormatError("tensor '" + entry->name + "': parameter '" + prefix + key + "' is not a number");
    return v->as_number();
}

// ---- ModelFile --------------------------------------------------------------------------------

ModelFile::~ModelFile() {
    if (map_) ::munmap(map_, map_size_);
}

const TensorEntry *ModelFile::find(const std::string &name) const {
    auto it = index_.find(name);
    return it == index_.end() ? nullptr : &tensors_[it->second];
}

const TensorEntry &ModelFile::get(const std::string &name) const {
    const TensorEntry *e = find(name);
    if (!e) throw FormatError("the file has no tensor named '" + name + "'");
    return *e;
}

std::unique_ptr<ModelFile> ModelFile::open(const std::string &path, bool verify_checksums) {
    const std::string where = "'" + path + "'";
    auto fail = [&](const std::string &msg) -> FormatError {
        return FormatError(where + ": " + msg);
    };

    // -- the file itself
    struct stat st;
    if (::stat(path.c_str(), &st) != 0)
        throw IoError("cannot open " + where + ": " + std::strerror(errno));
    if (S_ISDIR(st.st_mode)) throw IoError(where + " is a directory, not a .pumice file");
    if (!S_ISREG(st.st_mode)) throw IoError(where + " is not a regular file");
    FdGuard fd{::open(path.c_str(), O_RDONLY | O_CLOEXEC)};
    if (fd.fd < 0) throw IoError("cannot open " + where + ": " + std::strerror(errno));
    if (::fstat(fd.fd, &st) != 0) throw IoError("cannot stat " + where + ": " + std::strerror(errno));
    if (!S_ISREG(st.st_mode)) throw IoError(where + " is not a regular file");
    const uint64_t real_size = static_cast<uint64_t>(st.st_size);

    // Files shorter than the fixed header: still say "not a pumice file" if the magic is wrong.
    if (real_size < kFixedHeaderSize) {
        unsigned char head[8] = {0};
        size_t n = static_cast<size_t>(std::min<uint64_t>(real_size, 8));
        if (n && ::pread(fd.fd, head, n, 0) != static_cast<ssize_t>(n))
            throw IoError("cannot read " + where + ": " + std::strerror(errno));
        if (std::memcmp(head, kMagic, n) != 0 || n == 0)
            throw fail(n == 0 ? "the file is empty (not a .pumice file)"
                              : "not a .pumice file (bad magic bytes)");
        throw fail("truncated: " + std::to_string(real_size) +
                   " bytes, but the fixed header alone is 64 bytes");
    }

    std::unique_ptr<ModelFile> mf(new ModelFile());
    void *map = ::mmap(nullptr, static_cast<size_t>(real_size), PROT_READ, MAP_PRIVATE, fd.fd, 0);
    if (map == MAP_FAILED) throw IoError("cannot map " + where + ": " + std::strerror(errno));
    mf->map_ = map;
    mf->map_size_ = static_cast<size_t>(real_size);
    const unsigned char *base = static_cast<const unsigned char *>(map);

    // -- fixed header, in the order FORMAT.md 1.1 prescribes
    if (std::memcmp(base, kMagic, 8) != 0) throw fail("not a .pumice file (bad magic bytes)");
    const uint32_t fixed_crc = read_u32(base + 60);
    const uint32_t fixed_crc_actual = crc32(base, 60);
    if (fixed_crc != fixed_crc_actual)
        throw fail("fixed header checksum mismatch (stored " + hex32(fixed_crc) + ", computed " +
                   hex32(fixed_crc_actual) + "): the header is corrupt");
    const uint32_t version = read_u32(base + 8);
    if (version > kVersion)
        throw UnsupportedError(where + ": file format version " + std::to_string(version) +
                               " is newer than version " + std::to_string(kVersion) +
                               ", the newest this library reads; upgrade pumice");
    if (version != kVersion) throw fail("invalid format version " + std::to_string(version));
    const uint32_t alignment = read_u32(base + 12);
    const uint64_t json_offset = read_u64(base + 16);
    const uint64_t json_length = read_u64(base + 24);
    const uint64_t data_offset = read_u64(base + 32);
    const uint64_t data_length = read_u64(base + 40);
    const uint64_t file_length = read_u64(base + 48);
    const uint32_t json_crc = read_u32(base + 56);
    if (real_size != file_length)
        throw fail(real_size < file_length
                       ? "truncated: the file is " + std::to_string(real_size) +
                             " bytes, its header says " + std::to_string(file_length)
                       : "the file is " + std::to_string(real_size) + " bytes, its header says " +
                             std::to_string(file_length) + " (trailing data)");
    uint64_t data_end;
    if (__builtin_add_overflow(data_offset, data_length, &data_end) || data_end != file_length)
        throw fail("data_offset " + std::to_string(data_offset) + " + data_length " +
                   std::to_string(data_length) + " != file_length " + std::to_string(file_length));
    if (alignment < 64 || (alignment & (alignment - 1)) != 0)
        throw fail("alignment " + std::to_string(alignment) + " is not a power of two >= 64");
    if (json_offset != kFixedHeaderSize)
        throw fail("header_json_offset is " + std::to_string(json_offset) + ", must be 64");
    uint64_t json_end;
    if (__builtin_add_overflow(json_offset, json_length, &json_end) || json_end > data_offset)
        throw fail("header JSON (64 + " + std::to_string(json_length) +
                   " bytes) runs past data_offset " + std::to_string(data_offset));
    if (data_offset % alignment != 0)
        throw fail("data_offset " + std::to_string(data_offset) + " is not a multiple of alignment " +
                   std::to_string(alignment));
    const char *json_bytes = reinterpret_cast<const char *>(base + json_offset);
    const uint32_t json_crc_actual = crc32(json_bytes, static_cast<size_t>(json_length));
    if (json_crc != json_crc_actual)
        throw fail("header JSON checksum mismatch (stored " + hex32(json_crc) + ", computed " +
                   hex32(json_crc_actual) + "): the header is corrupt");

    // -- header JSON
    Json root;
    try {
        root = Json::parse(json_bytes, static_cast<size_t>(json_length));
    } catch (const FormatError &e) {
        throw fail(std::string("header JSON: ") + e.what());
    }
    if (!root.is_object()) throw fail("header JSON is not an object");
    for (const auto &kv : root.as_object())
        if (kv.first != "metadata" && kv.first != "tensors")
            throw fail("header JSON has an unknown top-level key '" + kv.first + "'");
    const Json *metadata = root.find("metadata");
    const Json *tensors = root.find("tensors");
    if (!metadata || !metadata->is_object()) throw fail("header JSON: 'metadata' must be an object");
    if (!tensors || !tensors->is_array()) throw fail("header JSON: 'tensors' must be an array");
    mf->data_length_ = data_length;
    const unsigned char *data = base + data_offset;

    struct Region {
        uint64_t offset, length;
        const std::string *tensor;
        std::string part;
    };
    std::vector<Region> regions;
    std::vector<CrcCheck> checks;

    // Reads a non-negative integer field, with a message naming where it sits.
    auto get_uint = [&](const Json &obj, const char *key, const std::string &ctx) -> uint64_t {
        const Json *v = obj.find(key);
        if (!v) throw fail(ctx + ": missing '" + key + "'");
        if (!v->is_number()) throw fail(ctx + ": '" + key + "' is not a number");
        int64_t i;
        try {
            i = v->as_int();
        } catch (const FormatError &e) {
            throw fail(ctx + ": '" + key + "': " + e.what());
        }
        if (i < 0) throw fail(ctx + ": '" + key + "' is negative");
        return static_cast<uint64_t>(i);
    };
    auto get_shape = [&](const Json &obj, const std::string &ctx) {
        const Json *v = obj.find("shape");
        if (!v) throw fail(ctx + ": missing 'shape'");
        if (!v->is_array()) throw fail(ctx + ": 'shape' is not an array");
        std::vector<int64_t> shape;
        for (const Json &d : v->as_array()) {
            if (!d.is_number()) throw fail(ctx + ": 'shape' holds a non-number");
            int64_t i;
            try {
                i = d.as_int();
            } catch (const FormatError &e) {
                throw fail(ctx + ": 'shape': " + e.what());
            }
            if (i < 0) throw fail(ctx + ": 'shape' holds a negative size");
            shape.push_back(i);
        }
        return shape;
    };

    const auto &entries = tensors->as_array();
    mf->tensors_.reserve(entries.size());
    for (size_t ti = 0; ti < entries.size(); ++ti) {
        const Json &ej = entries[ti];
        std::string ctx = "tensor #" + std::to_string(ti);
        if (!ej.is_object()) throw fail(ctx + " is not an object");
        const Json *name = ej.find("name");
        if (!name || !name->is_string() || name->as_string().empty())
            throw fail(ctx + ": 'name' must be a non-empty string");
        ctx = "tensor '" + name->as_string() + "'";
        for (const auto &kv : ej.as_object()) {
            static const std::set<std::string> known = {"name", "kind", "shape", "params", "parts"};
            if (!known.count(kv.first)) throw fail(ctx + ": unknown key '" + kv.first + "'");
        }
        const Json *kind = ej.find("kind");
        if (!kind || !kind->is_string() || kind->as_string().empty())
            throw fail(ctx + ": 'kind' must be a non-empty string");
        const Json *params = ej.find("params");
        if (!params || !params->is_object()) throw fail(ctx + ": 'params' must be an object");
        const Json *parts = ej.find("parts");
        if (!parts || !parts->is_object()) throw fail(ctx + ": 'parts' must be an object");

        TensorEntry entry;
        entry.name = name->as_string();
        entry.kind = kind->as_string();
        entry.shape = get_shape(ej, ctx);
        entry.params = *params;
        if (mf->index_.count(entry.name)) throw fail("two tensors are named '" + entry.name + "'");

        for (const auto &pkv : parts->as_object()) {
            const std::string pctx = ctx + " part '" + pkv.first + "'";
            const Json &pj = pkv.second;
            if (!pj.is_object()) throw fail(pctx + " is not an object");
            for (const auto &kv : pj.as_object()) {
                static const std::set<std::string> known = {"dtype", "shape", "offset", "length", "crc32"};
                if (!known.count(kv.first)) throw fail(pctx + ": unknown key '" + kv.first + "'");
            }
            const Json *dt = pj.find("dtype");
            if (!dt || !dt->is_string()) throw fail(pctx + ": 'dtype' must be a string");
            Part part;
            if (!parse_dtype(dt->as_string(), part.dtype))
                throw fail(pctx + ": unknown dtype '" + dt->as_string() + "'");
            part.shape = get_shape(pj, pctx);
            const uint64_t offset = get_uint(pj, "offset", pctx);
            const uint64_t length = get_uint(pj, "length", pctx);
            const uint64_t crc = get_uint(pj, "crc32", pctx);
            if (crc > 0xFFFFFFFFull) throw fail(pctx + ": 'crc32' does not fit in 32 bits");
            uint64_t expect = dtype_size(part.dtype);
            for (int64_t d : part.shape)
                if (__builtin_mul_overflow(expect, static_cast<uint64_t>(d), &expect))
                    throw fail(pctx + ": shape " + shape_str(part.shape) + " overflows 64 bits");
            if (expect != length)
                throw fail(pctx + ": length " + std::to_string(length) + " != " +
                           std::to_string(dtype_size(part.dtype)) + " bytes x shape " +
                           shape_str(part.shape) + " = " + std::to_string(expect));
            if (offset % alignment != 0)
                throw fail(pctx + ": offset " + std::to_string(offset) +
                           " is not a multiple of the alignment " + std::to_string(alignment));
            uint64_t end;
            if (__builtin_add_overflow(offset, length, &end) || end > data_length)
                throw fail(pctx + ": region [" + std::to_string(offset) + ", " + std::to_string(offset) +
                           " + " + std::to_string(length) + ") lies outside the data section (" +
                           std::to_string(data_length) + " bytes)");
            part.data = data + offset;
            part.length = length;
            if (verify_checksums) checks.push_back({part.data, length, static_cast<uint32_t>(crc), pctx, 0});
            entry.parts.emplace(pkv.first, std::move(part));
            regions.push_back({offset, length, nullptr, pkv.first});
        }

        // The two kinds defined by the format itself are checked here; other kinds check their
        // own parts when their LinearOp is built.
        if (entry.kind == "blob") {
            auto it = entry.parts.find("data");
            if (entry.parts.size() != 1 || it == entry.parts.end())
                throw fail(ctx + ": a blob has exactly one part, 'data'");
            if (entry.shape.size() != 1 || it->second.dtype != DType::U8 || it->second.shape != entry.shape)
                throw fail(ctx + ": a blob's part 'data' must be u8 with the tensor's 1-D shape");
        } else if (entry.kind == "dense") {
            auto it = entry.parts.find("weight");
            if (entry.parts.size() != 1 || it == entry.parts.end())
                throw fail(ctx + ": a dense tensor has exactly one part, 'weight'");
            DType t = it->second.dtype;
            if (t != DType::F32 && t != DType::F16 && t != DType::BF16)
                throw fail(ctx + ": dense weight has dtype " + dtype_name(t) + ", expected f32, f16 or bf16");
            if (it->second.shape != entry.shape)
                throw fail(ctx + ": dense weight has shape " + shape_str(it->second.shape) +
                           ", the tensor's shape is " + shape_str(entry.shape));
        }

        mf->index_.emplace(entry.name, mf->tensors_.size());
        mf->tensors_.push_back(std::move(entry));
        for (size_t r = regions.size(); r-- > 0 && regions[r].tensor == nullptr;)
            regions[r].tensor = &mf->tensors_.back().name;
    }

    // Regions must not overlap (empty parts occupy nothing).
    std::sort(regions.begin(), regions.end(),
              [](const Region &a, const Region &b) { return a.offset < b.offset; });
    const Region *prev = nullptr;
    for (const Region &r : regions) {
        if (r.length == 0) continue;
        if (prev && prev->offset + prev->length > r.offset)
            throw fail("tensor '" + *r.tensor + "' part '" + r.part + "' overlaps tensor '" +
                       *prev->tensor + "' part '" + prev->part + "'");
        prev = &r;
    }

    if (verify_checksums) {
        verify_crcs(checks);
        for (const CrcCheck &c : checks)  // report the first bad part in file order
            if (c.actual != c.expected)
                throw fail(c.where + ": CRC-32 mismatch (stored " + hex32(c.expected) + ", computed " +
                           hex32(c.actual) + "): the tensor data is corrupt");
    }

    mf->metadata_ = *metadata;
    return mf;
}

}  // namespace pumice
