/* Vector helpers shared by the AVX-512 BF16 kernels (included, not compiled on its own): bf16 in and
 * out of float32 lanes, and SiLU with its own exp, so that every kernel computing silu(gate) * up
 * (the element-wise pass and the GEMM that fuses it) gives the same bits. */
#ifndef TGSERVE_AVX512_BF16_H
#define TGSERVE_AVX512_BF16_H
#include <immintrin.h>
#include <stdint.h>

static inline __m512 bf16x16_in(const uint16_t* p) {  /* 16 bf16 values as float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
static inline __m512 round_bf16(__m512 x) {  /* the bf16 value nearest x (ties to even), as float32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(x)), 16));
}

static inline __m512 negate(__m512 x) {  /* -x, zeros included (0 - x would give +0 for +0) */
    return _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u)));
}

/* e^x for float32 lanes, within ~1 ulp: x = n ln2 + r (|r| <= ln2 / 2, ln2 split in two for an exact
 * product), e^r by its Taylor series to r^7 (truncation ~5e-9 relative), times 2^n by vscalefps,
 * which overflows to inf and underflows to 0 as expf does. x is clamped to +-200 first (e^+-200 is
 * already inf / 0 in float32) so that +-inf give inf / 0, not NaN; NaN stays NaN. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_min_ps(_mm512_set1_ps(200.f), _mm512_max_ps(_mm512_set1_ps(-200.f), x));  /* NaN is kept */
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);  /* ln2's first 11 bits: n * it is exact */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);     /* ln2 - 0.693359375 */
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* silu(g) * u as SiluAndMul computes it in bf16: g and u are bf16 values (as float32); silu(g) =
 * g / (1 + e^-g) rounded to bf16, then the product; returned unrounded (the caller stores it as bf16). */
static inline __m512 silu_mul_ps(__m512 g, __m512 u) {
    const __m512 d = _mm512_add_ps(_mm512_set1_ps(1.f), exp_ps(negate(g)));
    __m512 s;  /* g / d by vdivps itself: -ffast-math would use a refined reciprocal, which gives NaN
                  for g / inf and flushes g / 2.7e38 to zero where F.silu gives -0 and -3e-37 */
    __asm__("vdivps %2, %1, %0" : "=v"(s) : "v"(g), "v"(d));
    return _mm512_mul_ps(round_bf16(s), u);
}

#endif
