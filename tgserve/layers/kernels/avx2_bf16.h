/* Vector helpers shared by the AVX2 kernels (CPUs with AVX2 and FMA but no AVX-512 BF16, e.g. AMD
 * Zen 3; included, not compiled on its own): bf16 in and out of 8 float32 lanes, and SiLU with its
 * own exp, so that the element-wise pass and the GEMM that fuses it give the same bits. The
 * AVX-512 BF16 twins are in avx512_bf16.h. */
#ifndef TGSERVE_AVX2_BF16_H
#define TGSERVE_AVX2_BF16_H
#include <immintrin.h>
#include <stdint.h>

static inline __m256 bf16x8_in(const uint16_t* p) {  /* 8 bf16 values as float32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}

/* float32 lanes to bf16 bits, rounded to nearest even (NaN stays a quiet NaN), as 32-bit lanes */
static inline __m256i bf16_bits8(__m256 x) {
    const __m256i u = _mm256_castps_si256(x);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
}
static inline __m128i bf16x8_out(__m256 x) {  /* 8 bf16 values, ready to store */
    const __m256i r = bf16_bits8(x);
    return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}
static inline __m256 round_bf16_8(__m256 x) {  /* the bf16 value nearest x, as float32 */
    return _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(x), 16));
}

/* e^x for float32 lanes, within ~1 ulp: x = n ln2 + r (|r| <= ln2 / 2), e^r by its Taylor series to
 * r^7, times 2^n built in two exponent-field halves (so that n up to +-145 overflows to inf and
 * underflows to 0 as expf does). x is clamped to +-100 first (e^+-100 is already inf / ~0 in
 * float32); NaN stays NaN. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_set1_ps(100.f), _mm256_max_ps(_mm256_set1_ps(-100.f), x));  /* NaN is kept */
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);  /* ln2's first 11 bits: n * it is exact */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);     /* ln2 - 0.693359375 */
    __m256 p = _mm256_set1_ps(1.f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.f));
    const __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256 s1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, _mm256_set1_epi32(127)), 23));
    const __m256 s2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, _mm256_set1_epi32(127)), 23));
    __m256 t = _mm256_mul_ps(p, s1);
    __asm__("" : "+x"(t));  /* -ffast-math would multiply s1 * s2 = 2^n first: inf for n = 128 */
    return _mm256_mul_ps(t, s2);
}

/* silu(g) * u as SiluAndMul computes it in bf16 (see silu_mul_ps in avx512_bf16.h): silu rounded to
 * bf16, then the product, returned unrounded. */
static inline __m256 silu_mul8(__m256 g, __m256 u) {
    const __m256 neg = _mm256_castsi256_ps(_mm256_xor_si256(_mm256_castps_si256(g), _mm256_set1_epi32((int)0x80000000u)));
    const __m256 d = _mm256_add_ps(_mm256_set1_ps(1.f), exp8(neg));
    __m256 s;  /* g / d by vdivps itself, not -ffast-math's refined reciprocal (see avx512_bf16.h) */
    __asm__("vdivps %2, %1, %0" : "=x"(s) : "x"(g), "x"(d));
    return _mm256_mul_ps(round_bf16_8(s), u);
}

#endif
