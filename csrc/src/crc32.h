// crc32.h — CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), the same value as zlib's crc32.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pumice {

// Continues a running CRC: crc32(crc32(0, a, n), b, m) == crc32 of a followed by b.
uint32_t crc32(uint32_t crc, const void *data, size_t length);
inline uint32_t crc32(const void *data, size_t length) { return crc32(0, data, length); }

}  // namespace pumice
