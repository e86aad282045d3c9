// crc32.cpp — table-driven CRC-32, eight bytes per step ("slicing by 8").
//
// Checksums of every part are verified at open, so this runs over the whole weight file; one
// byte per step would make opening a large model slow. Slicing by 8 reads a 64-bit word and
// looks up eight independent tables, which runs at several bytes per cycle.
#include "crc32.h"

#include <cstring>

namespace pumice {

namespace {

struct Tables {
    uint32_t t[8][256];
    Tables() {
        for (uint32_t i = 0; i < 256; ++i) {
            uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? (0xEDB88320u ^ (c >> 1)) : (c >> 1);
            t[0][i] = c;
        }
        for (uint32_t i = 0; i < 256; ++i)
            for (int s = 1; s < 8; ++s) t[s][i] = (t[s - 1][i] >> 8) ^ t[0][t[s - 1][i] & 0xFF];
    }
};

const Tables &tables() {
    static const Tables instance;
    return instance;
}

}  // namespace

uint32_t crc32(uint32_t crc, const void *data, size_t length) {
    const auto &t = tables().t;
    const unsigned char *p = static_cast<const unsigned char *>(data);
    uint32_t c = ~crc;
    while (length && (reinterpret_cast<uintptr_t>(p) & 7)) {
        c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
        --length;
    }
    while (length >= 8) {
        uint64_t w;
        std::memcpy(&w, p, 8);  // little-endian host assumed, as the format is little-endian
        uint32_t lo = static_cast<uint32_t>(w) ^ c;
        uint32_t hi = static_cast<uint32_t>(w >> 32);
        c = t[7][lo & 0xFF] ^ t[6][(lo >> 8) & 0xFF] ^ t[5][(lo >> 16) & 0xFF] ^ t[4][lo >> 24] ^
            t[3][hi & 0xFF] ^ t[2][(hi >> 8) & 0xFF] ^ t[1][(hi >> 16) & 0xFF] ^ t[0][hi >> 24];
        p += 8;
        length -= 8;
    }
    while (length--) c = t[0][(c ^ *p++) & 0xFF] ^ (c >> 8);
    return ~c;
}

// Polynomials modulo P in the reflected representation: bit 31 holds x^0, bit 0 holds x^31.
namespace {

uint32_t multiply_mod_p(uint32_t a, uint32_t b) {
    uint32_t product = 0;
    for (uint32_t m = 1u << 31; m; m >>= 1) {
        if (a & m) product ^= b;
        b = (b & 1) ? (b >> 1) ^ 0xEDB88320u : b >> 1;  // b *= x
    }
    return product;
}

// x^(8 n) mod P: appending n zero bytes multiplies a CRC's polynomial by it.
uint32_t x_pow_8n_mod_p(uint64_t n) {
    uint32_t result = 1u << 31;         // 1
    uint32_t square = 1u << (31 - 8);   // x^8
    for (; n; n >>= 1) {
        if (n & 1) result = multiply_mod_p(square, result);
        square = multiply_mod_p(square, square);
    }
    return result;
}

}  // namespace

uint32_t crc32_combine(uint32_t crc_a, uint32_t crc_b, uint64_t length_b) {
    return multiply_mod_p(x_pow_8n_mod_p(length_b), crc_a) ^ crc_b;
}

}  // namespace pumice
