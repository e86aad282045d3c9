// errors.h — exceptions used inside the library; the C ABI turns each into a pumice_status.
#pragma once
#include <stdexcept>
#include <string>

#include "pumice.h"

namespace pumice {

struct Error : std::runtime_error {
    pumice_status status;
    Error(pumice_status s, const std::string &msg) : std::runtime_error(msg), status(s) {}
};
struct IoError : Error { explicit IoError(const std::string &m) : Error(PUMICE_ERR_IO, m) {} };
struct FormatError : Error { explicit FormatError(const std::string &m) : Error(PUMICE_ERR_FORMAT, m) {} };
struct UnsupportedError : Error { explicit UnsupportedError(const std::string &m) : Error(PUMICE_ERR_UNSUPPORTED, m) {} };
struct InvalidArgument : Error { explicit InvalidArgument(const std::string &m) : Error(PUMICE_ERR_INVALID_ARGUMENT, m) {} };
struct ContextFull : Error { explicit ContextFull(const std::string &m) : Error(PUMICE_ERR_CONTEXT_FULL, m) {} };
struct DeviceError : Error { explicit DeviceError(const std::string &m) : Error(PUMICE_ERR_DEVICE, m) {} };

}  // namespace pumice
