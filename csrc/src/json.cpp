// json.cpp — strict RFC 8259 reader for the .pumice header JSON.
//
// Strict on purpose: the header is machine-written, so anything unusual (trailing commas,
// comments, invalid UTF-8, lone surrogates, duplicate keys, trailing bytes) means corruption,
// and the sooner we say so (with the byte offset) the easier the file is to diagnose.
#include "json.h"

#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>

#include "errors.h"

namespace pumice {

namespace {

constexpr int kMaxDepth = 64;

const char *type_name(Json::Type t) {
    switch (t) {
        case Json::Type::Null: return "null";
        case Json::Type::Bool: return "a boolean";
        case Json::Type::Number: return "a number";
        case Json::Type::String: return "a string";
        case Json::Type::Array: return "an array";
        case Json::Type::Object: return "an object";
    }
    return "?";
}

[[noreturn]] void type_error(const char *expected, Json::Type got) {
    throw FormatError(std::string("JSON value is ") + type_name(got) + ", expected " + expected);
}

}  // namespace

class JsonParser {
public:
    JsonParser(const char *data, size_t length) : p_(data), begin_(data), end_(data + length) {}

    Json parse_document() {
        skip_ws();
        Json value = parse_value(0);
        skip_ws();
        if (p_ != end_) fail("unexpected data after the JSON value");
        return value;
    }

private:
    const char *p_;
    const char *begin_;
    const char *end_;

    [[noreturn]] void fail(const std::string &what) const {
        throw FormatError("invalid JSON at byte " + std::to_string(p_ - begin_) + ": " + what);
    }

    void skip_ws() {
        while (p_ < end_ && (*p_ == ' ' || *p_ == '\t' || *p_ == '\n' || *p_ == '\r')) ++p_;
    }

    bool at_end() const { return p_ >= end_; }

    void expect_literal(const char *word) {
        size_t n = std::strlen(word);
        if (static_cast<size_t>(end_ - p_) < n || std::memcmp(p_, word, n) != 0)
            fail(std::string("expected '") + word + "'");
        p_ += n;
    }

    Json parse_value(int depth) {
        if (at_end()) fail("unexpected end of input, expected a value");
        Json out;
        switch (*p_) {
            case '{': parse_object(out, depth + 1); break;
            case '[': parse_array(out, depth + 1); break;
            case '"':
                out.type_ = Json::Type::String;
                parse_string(out.string_);
                break;
            case 't': expect_literal("true"); out.type_ = Json::Type::Bool; out.bool_ = true; break;
            case 'f': expect_literal("false"); out.type_ = Json::Type::Bool; out.bool_ = false; break;
            case 'n': expect_literal("null"); out.type_ = Json::Type::Null; break;
            default:
                if (*p_ == '-' || (*p_ >= '0' && *p_ <= '9')) {
                    parse_number(out);
                } else {
                    fail(std::string("unexpected character '") + printable(*p_) + "'");
                }
        }
        return out;
    }

    static std::string printable(char c) {
        unsigned char u = static_cast<unsigned char>(c);
        if (u >= 0x20 && u < 0x7f) return std::string(1, c);
        char buf[8];
        std::snprintf(buf, sizeof buf, "\\x%02x", u);
        return buf;
    }

    void parse_object(Json &out, int depth) {
        if (depth > kMaxDepth) fail("nesting deeper than 64 levels");
        out.type_ = Json::Type::Object;
        ++p_;  // '{'
        skip_ws();
        if (!at_end() && *p_ == '}') { ++p_; return; }
        for (;;) {
            skip_ws();
            if (at_end() || *p_ != '"') fail("expected a string key");
            const char *key_pos = p_;
            std::string key;
            parse_string(key);
            skip_ws();
            if (at_end() || *p_ != ':') fail("expected ':' after an object key");
            ++p_;
            skip_ws();
            Json value = parse_value(depth);
            if (!out.object_.emplace(std::move(key), std::move(value)).second) {
                p_ = key_pos;
                fail("duplicate object key");
            }
            skip_ws();
            if (at_end()) fail("unexpected end of input inside an object");
            if (*p_ == ',') { ++p_; continue; }
            if (*p_ == '}') { ++p_; return; }
            fail("expected ',' or '}' in an object");
        }
    }

    void parse_array(Json &out, int depth) {
        if (depth > kMaxDepth) fail("nesting deeper than 64 levels");
        out.type_ = Json::Type::Array;
        ++p_;  // '['
        skip_ws();
        if (!at_end() && *p_ == ']') { ++p_; return; }
        for (;;) {
            skip_ws();
            out.array_.push_back(parse_value(depth));
            skip_ws();
            if (at_end()) fail("unexpected end of input inside an array");
            if (*p_ == ',') { ++p_; continue; }
            if (*p_ == ']') { ++p_; return; }
            fail("expected ',' or ']' in an array");
        }
    }

    unsigned parse_hex4() {
        if (end_ - p_ < 4) fail("truncated \\u escape");
        unsigned v = 0;
        for (int i = 0; i < 4; ++i) {
            char c = p_[i];
            v <<= 4;
            if (c >= '0' && c <= '9') v |= unsigned(c - '0');
            else if (c >= 'a' && c <= 'f') v |= unsigned(c - 'a' + 10);
            else if (c >= 'A' && c <= 'F') v |= unsigned(c - 'A' + 10);
            else fail("bad hex digit in \\u escape");
        }
        p_ += 4;
        return v;
    }

    static void append_utf8(std::string &s, uint32_t cp) {
        if (cp < 0x80) {
            s += char(cp);
        } else if (cp < 0x800) {
            s += char(0xC0 | (cp >> 6));
            s += char(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            s += char(0xE0 | (cp >> 12));
            s += char(0x80 | ((cp >> 6) & 0x3F));
            s += char(0x80 | (cp & 0x3F));
        } else {
            s += char(0xF0 | (cp >> 18));
            s += char(0x80 | ((cp >> 12) & 0x3F));
            s += char(0x80 | ((cp >> 6) & 0x3F));
            s += char(0x80 | (cp & 0x3F));
        }
    }

    // Copies one well-formed UTF-8 sequence starting at p_ (a byte >= 0x80) into s.
    void copy_utf8_sequence(std::string &s) {
        const unsigned char *u = reinterpret_cast<const unsigned char *>(p_);
        size_t avail = static_cast<size_t>(end_ - p_);
        unsigned char c0 = u[0];
        size_t n;
        uint32_t cp;
        if (c0 >= 0xC2 && c0 <= 0xDF) { n = 2; cp = c0 & 0x1F; }
        else if (c0 >= 0xE0 && c0 <= 0xEF) { n = 3; cp = c0 & 0x0F; }
        else if (c0 >= 0xF0 && c0 <= 0xF4) { n = 4; cp = c0 & 0x07; }
        else fail("invalid UTF-8 byte in a string");
        if (avail < n) fail("truncated UTF-8 sequence in a string");
        for (size_t i = 1; i < n; ++i) {
            if ((u[i] & 0xC0) != 0x80) fail("invalid UTF-8 continuation byte in a string");
            cp = (cp << 6) | (u[i] & 0x3F);
        }
        // Reject overlong forms, surrogates and code points past U+10FFFF.
        if ((n == 3 && cp < 0x800) || (n == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
            (cp >= 0xD800 && cp <= 0xDFFF))
            fail("invalid UTF-8 sequence in a string");
        s.append(p_, n);
        p_ += n;
    }

    void parse_string(std::string &s) {
        ++p_;  // opening quote
        for (;;) {
            if (at_end()) fail("unterminated string");
            unsigned char c = static_cast<unsigned char>(*p_);
            if (c == '"') { ++p_; return; }
            if (c < 0x20) fail("unescaped control character in a string");
            if (c == '\\') {
                ++p_;
                if (at_end()) fail("unterminated escape in a string");
                char e = *p_++;
                switch (e) {
                    case '"': s += '"'; break;
                    case '\\': s += '\\'; break;
                    case '/': s += '/'; break;
                    case 'b': s += '\b'; break;
                    case 'f': s += '\f'; break;
                    case 'n': s += '\n'; break;
                    case 'r': s += '\r'; break;
                    case 't': s += '\t'; break;
                    case 'u': {
                        uint32_t cp = parse_hex4();
                        if (cp >= 0xDC00 && cp <= 0xDFFF) fail("lone low surrogate in \\u escape");
                        if (cp >= 0xD800 && cp <= 0xDBFF) {
                            if (end_ - p_ < 2 || p_[0] != '\\' || p_[1] != 'u')
                                fail("high surrogate not followed by a low surrogate");
                            p_ += 2;
                            uint32_t lo = parse_hex4();
                            if (lo < 0xDC00 || lo > 0xDFFF)
                                fail("high surrogate not followed by a low surrogate");
                            cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                        }
                        append_utf8(s, cp);
                        break;
                    }
                    default:
                        --p_;
                        fail(std::string("invalid escape '\\") + printable(e) + "'");
                }
                continue;
            }
            if (c >= 0x80) {
                copy_utf8_sequence(s);
                continue;
            }
            s += char(c);
            ++p_;
        }
    }

    void parse_number(Json &out) {
        const char *start = p_;
        if (*p_ == '-') ++p_;
        if (at_end()) fail("truncated number");
        if (*p_ == '0') {
            ++p_;
            if (!at_end() && *p_ >= '0' && *p_ <= '9') fail("leading zero in a number");
        } else if (*p_ >= '1' && *p_ <= '9') {
            while (!at_end() && *p_ >= '0' && *p_ <= '9') ++p_;
        } else {
            fail("expected a digit");
        }
        if (!at_end() && *p_ == '.') {
            ++p_;
            if (at_end() || !(*p_ >= '0' && *p_ <= '9')) fail("expected a digit after '.'");
            while (!at_end() && *p_ >= '0' && *p_ <= '9') ++p_;
        }
        if (!at_end() && (*p_ == 'e' || *p_ == 'E')) {
            ++p_;
            if (!at_end() && (*p_ == '+' || *p_ == '-')) ++p_;
            if (at_end() || !(*p_ >= '0' && *p_ <= '9')) fail("expected a digit in an exponent");
            while (!at_end() && *p_ >= '0' && *p_ <= '9') ++p_;
        }
        // The literal text is kept so that as_int() can read 64-bit integers exactly.
        out.type_ = Json::Type::Number;
        out.string_.assign(start, p_);
        errno = 0;
        double v = std::strtod(out.string_.c_str(), nullptr);
        if (!std::isfinite(v)) {
            p_ = start;
            fail("number out of range");
        }
        out.number_ = v;
    }
};

Json Json::parse(const char *data, size_t length) {
    JsonParser parser(data, length);
    return parser.parse_document();
}

bool Json::as_bool() const {
    if (type_ != Type::Bool) type_error("a boolean", type_);
    return bool_;
}

double Json::as_number() const {
    if (type_ != Type::Number) type_error("a number", type_);
    return number_;
}

int64_t Json::as_int() const {
    if (type_ != Type::Number) type_error("an integer", type_);
    bool plain = string_.find_first_of(".eE") == std::string::npos;
    if (plain) {
        errno = 0;
        char *end = nullptr;
        long long v = std::strtoll(string_.c_str(), &end, 10);
        if (errno == ERANGE) throw FormatError("integer " + string_ + " does not fit in 64 bits");
        return static_cast<int64_t>(v);
    }
    // Written as 1.0 or 1e3: accept only if exactly integral and exactly representable.
    if (std::floor(number_) != number_ || std::fabs(number_) > 9007199254740992.0)
        throw FormatError("number " + string_ + " is not an integer");
    return static_cast<int64_t>(number_);
}

const std::string &Json::as_string() const {
    if (type_ != Type::String) type_error("a string", type_);
    return string_;
}

const std::vector<Json> &Json::as_array() const {
    if (type_ != Type::Array) type_error("an array", type_);
    return array_;
}

const std::map<std::string, Json> &Json::as_object() const {
    if (type_ != Type::Object) type_error("an object", type_);
    return object_;
}

const Json &Json::at(const std::string &key) const {
    const Json *v = find(key);
    if (!v) {
        if (type_ != Type::Object) type_error("an object", type_);
        throw FormatError("missing key '" + key + "'");
    }
    return *v;
}

const Json *Json::find(const std::string &key) const {
    if (type_ != Type::Object) return nullptr;
    auto it = object_.find(key);
    return it == object_.end() ? nullptr : &it->second;
}

size_t Json::size() const {
    if (type_ == Type::Array) return array_.size();
    if (type_ == Type::Object) return object_.size();
    return 0;
}

}  // namespace pumice
