// json.h — a small strict JSON reader (RFC 8259) for the .pumice header; no writer needed.
#pragma once
#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace pumice {

class Json {
public:
    enum class Type { Null, Bool, Number, String, Array, Object };

    // Parses a whole document; throws FormatError with the byte offset of the problem.
    // Nesting deeper than 64 levels is rejected (the header never needs more).
    static Json parse(const char *data, size_t length);

    Type type() const { return type_; }
    bool is_null() const { return type_ == Type::Null; }
    bool is_object() const { return type_ == Type::Object; }
    bool is_array() const { return type_ == Type::Array; }
    bool is_number() const { return type_ == Type::Number; }
    bool is_string() const { return type_ == Type::String; }

    // Typed accessors; each throws FormatError naming the expected type on a mismatch.
    bool as_bool() const;
    double as_number() const;
    int64_t as_int() const;  // also rejects non-integral numbers
    const std::string &as_string() const;
    const std::vector<Json> &as_array() const;
    const std::map<std::string, Json> &as_object() const;

    const Json &at(const std::string &key) const;  // throws FormatError "missing key 'key'"
    const Json *find(const std::string &key) const;  // nullptr if absent (or not an object)
    size_t size() const;  // elements of an array or object, else 0

private:
    Type type_ = Type::Null;
    bool bool_ = false;
    double number_ = 0.0;
    std::string string_;
    std::vector<Json> array_;
    std::map<std::string, Json> object_;
    friend class JsonParser;
};

}  // namespace pumice
