// Single-query GQA attention over a KV cache read in place; see
// kernels/cuda/decode_attention.cu for the contract. Metal variant: no
// split-KV, one threadgroup of NW simdgroups per (head, batch); each simdgroup
// takes every NW-th key, lanes split the head dim (D <= 256), online softmax in
// f32, simdgroups merged through threadgroup memory.
#include <metal_stdlib>
using namespace metal;
#if __METAL_VERSION__ >= 320
#pragma METAL fp math_mode(safe)
#pragma METAL fp contract(off)
#endif

#define NW 4
#define PER 8
// Finite "minus infinity": stays correct even where the compiler runs in fast
// math mode (which may assume no infinities), e.g. before MSL 3.2.
#define NEG_BIG (-1.0e30f)

struct DecodeAttnParams {
    uint n_heads;
    uint n_kv_heads;
    uint head_dim;
    uint kv_start;
    uint kv_end;
    uint q_sb;
    uint q_sh;
    uint k_sb;
    uint k_sh;
    uint k_ss;
    uint v_sb;
    uint v_sh;
    uint v_ss;
    float scale;
};

template <typename T>
inline void decode_attn_impl(device const T* q, device const T* k, device const T* v,
                             device T* out, constant DecodeAttnParams& p,
                             threadgroup float* sm_m, threadgroup float* sm_l,
                             threadgroup float* sm_acc, uint h, uint b, uint tid, uint ntg,
                             uint lane, uint warp) {
    const uint D = p.head_dim;
    const uint group = p.n_heads / p.n_kv_heads;
    const uint kvh = h / group;
    device const T* qp = q + ulong(b) * p.q_sb + ulong(h) * p.q_sh;
    device const T* kp = k + ulong(b) * p.k_sb + ulong(kvh) * p.k_sh;
    device const T* vp = v + ulong(b) * p.v_sb + ulong(kvh) * p.v_sh;

    float qr[PER];
    float acc[PER];
    for (uint i = 0; i < PER; ++i) {
        const uint d = lane + 32 * i;
        qr[i] = d < D ? float(qp[d]) : 0.0f;
        acc[i] = 0.0f;
    }
    float m = NEG_BIG;
    float l = 0.0f;
    for (uint j = p.kv_start + warp; j < p.kv_end; j += NW) {
        device const T* kr = kp + ulong(j) * p.k_ss;
        float s = 0.0f;
        for (uint i = 0; i < PER; ++i) {
            const uint d = lane + 32 * i;
            if (d < D) s += qr[i] * float(kr[d]);
        }
        s = simd_sum(s) * p.scale;
        const float m_new = max(m, s);
        const float corr = precise::exp(m - m_new);
        const float pj = precise::exp(s - m_new);
        l = l * corr + pj;
        device const T* vr = vp + ulong(j) * p.v_ss;
        for (uint i = 0; i < PER; ++i) {
            const uint d = lane + 32 * i;
            if (d < D) acc[i] = acc[i] * corr + pj * float(vr[d]);
        }
        m = m_new;
    }
    if (lane == 0) {
        sm_m[warp] = m;
        sm_l[warp] = l;
    }
    for (uint i = 0; i < PER; ++i) sm_acc[warp * PER * 32 + lane + 32 * i] = acc[i];
    threadgroup_barrier(mem_flags::mem_threadgroup);

    float mb = NEG_BIG;
    for (uint w = 0; w < NW; ++w) mb = max(mb, sm_m[w]);
    float wts[NW];
    float lb = 0.0f;
    for (uint w = 0; w < NW; ++w) {
        wts[w] = sm_m[w] <= NEG_BIG ? 0.0f : precise::exp(sm_m[w] - mb);
        lb += wts[w] * sm_l[w];
    }
    const ulong bh = ulong(b) * p.n_heads + h;
    for (uint d = tid; d < D; d += ntg) {
        float a = 0.0f;
        for (uint w = 0; w < NW; ++w) a += wts[w] * sm_acc[w * PER * 32 + d];
        out[bh * D + d] = T(precise::divide(a, lb));
    }
}

#define DECODE_ATTN(NAME, T)                                                          \
kernel void NAME(device const T* q [[buffer(0)]],                                     \
                 device const T* k [[buffer(1)]],                                     \
                 device const T* v [[buffer(2)]],                                     \
                 device T* out     [[buffer(3)]],                                     \
                 constant DecodeAttnParams& p [[buffer(4)]],                          \
                 uint3 tg [[threadgroup_position_in_grid]],                           \
                 uint tid [[thread_index_in_threadgroup]],                            \
                 uint ntg [[threads_per_threadgroup]],                                \
                 uint lane [[thread_index_in_simdgroup]],                             \
                 uint warp [[simdgroup_index_in_threadgroup]]) {                      \
    threadgroup float sm_m[NW];                                                       \
    threadgroup float sm_l[NW];                                                       \
    threadgroup float sm_acc[NW * PER * 32];                                          \
    decode_attn_impl<T>(q, k, v, out, p, sm_m, sm_l, sm_acc, tg.x, tg.z, tid, ntg, lane, warp); \
}

DECODE_ATTN(expanse_decode_attn_f32, float)
DECODE_ATTN(expanse_decode_attn_f16, half)
#if defined(__HAVE_BFLOAT__)
DECODE_ATTN(expanse_decode_attn_bf16, bfloat)
#endif
