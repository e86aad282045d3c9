// crc32.h — CRC-32 (IEEE 802.3, reflected polynomial 0xEDB88320), the same value as zlib's crc32.
#pragma once
#include <cstddef>
#include <cstdint>

namespace pumice {

// Continues a running CRC: crc32(crc32(0, a, n), b, m) == crc32 of a followed by b.
uint32_t crc32(uint32_t crc, const void *data, size_t length);
inline uint32_t crc32(const void *data, size_t length) { return crc32(0, data, length); }
// CRC of A followed by B from crc_a = crc32(A), crc_b = crc32(B) and B's length, so that
// slices of one buffer can be checksummed in parallel.
uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b);

}  // namespace pumice
