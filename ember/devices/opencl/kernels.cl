// ember's OpenCL kernels: a transformer block's math on float32 activations, weights in their
// GGUF blocks (dequantized in the kernel), keys and values in half precision.
// Compile-time constants (build options): WG, the work-group size of every kernel here; ROWS,
// the activation rows one matmul work-group multiplies; MAXG, the query heads one key/value
// head serves at most; MAXDPT, the value dims one work-item of the attention owns at most.

// ---------------------------------------------------------------------------------------------
// weight decoding: the 32 weights of chunk c of a row into w[0..3], 8 each (8-wide vectors:
// PoCL 3.0 miscompiles 16-wide ones on x86)

inline float f16at(global const uchar* p) { return vload_half(0, (global const half*)p); }

inline uint u32at(global const uchar* p) {
    return (uint)p[0] | ((uint)p[1] << 8) | ((uint)p[2] << 16) | ((uint)p[3] << 24);
}

inline int8 bytes8(global const uchar* p, int i) { return convert_int8(vload8(i, p)); }

// bit (lane + shift) of qh in each of 8 lanes, as 0 or 16
inline int8 bit4(uint qh, int shift) { return (((int8)((int)(qh >> shift)) >> (int8)(0, 1, 2, 3, 4, 5, 6, 7)) & 1) << 4; }

inline void deq_f32(global const uchar* row, int c, float8* w) {
    global const float* r = (global const float*)row + c * 32;
    for (int i = 0; i < 4; i++) w[i] = vload8(i, r);
}

inline void deq_f16(global const uchar* row, int c, float8* w) {
    global const half* r = (global const half*)row + c * 32;
    for (int i = 0; i < 4; i++) w[i] = vload_half8(i, r);
}

// Q4_0 / Q4_1 / Q5_0 / Q5_1: weight j is the low nibble of qs[j], weight j + 16 the high one;
// bit j of qh is bit 4 of weight j (Q5); the value d * (q - zero) + m
inline void nibbles(global const uchar* qs, uint qh, float d, float m, int zero, float8* w) {
    for (int i = 0; i < 2; i++) {
        int8 q = bytes8(qs, i);
        w[i] = d * convert_float8(((q & 15) | bit4(qh, 8 * i)) - zero) + m;
        w[i + 2] = d * convert_float8(((q >> 4) | bit4(qh, 16 + 8 * i)) - zero) + m;
    }
}

inline void deq_q4_0(global const uchar* row, int c, float8* w) {
    global const uchar* b = row + c * 18;
    nibbles(b + 2, 0, f16at(b), 0.0f, 8, w);
}

inline void deq_q4_1(global const uchar* row, int c, float8* w) {
    global const uchar* b = row + c * 20;
    nibbles(b + 4, 0, f16at(b), f16at(b + 2), 0, w);
}

inline void deq_q5_0(global const uchar* row, int c, float8* w) {
    global const uchar* b = row + c * 22;
    nibbles(b + 6, u32at(b + 2), f16at(b), 0.0f, 16, w);
}

inline void deq_q5_1(global const uchar* row, int c, float8* w) {
    global const uchar* b = row + c * 24;
    nibbles(b + 8, u32at(b + 4), f16at(b), f16at(b + 2), 0, w);
}

inline void deq_q8_0(global const uchar* row, int c, float8* w) {
    global const uchar* b = row + c * 34;
    float d = f16at(b);
    for (int i = 0; i < 4; i++) w[i] = d * convert_float8(convert_int8(vload8(i, (global const char*)(b + 2))));
}

// Q4_K / Q5_K: 256-weight blocks of 8 runs; run j: (d * scale_j) * q - dmin * min_j, scales
// and mins in a 12-byte 6-bit packing; weight l of run j is nibble j % 2 of qs[(j / 2) * 32 + l]
// and, for Q5_K, bit j of qh[l] its bit 4
inline void kq_run(global const uchar* b, int j, global const uchar* qs, global const uchar* qh, float8* w) {
    global const uchar* s = b + 4;
    int sc, mn;
    if (j < 4) {
        sc = s[j] & 63;
        mn = s[j + 4] & 63;
    } else {
        sc = (s[j + 4] & 15) | ((s[j - 4] >> 2) & 48);
        mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 48);
    }
    float dl = f16at(b) * (float)sc, ml = f16at(b + 2) * (float)mn;
    global const uchar* q = qs + (j >> 1) * 32;
    int shift = 4 * (j & 1);
    for (int i = 0; i < 4; i++) {
        int8 v = (bytes8(q, i) >> shift) & 15;
        if (qh) v |= ((bytes8(qh, i) >> j) & 1) << 4;
        w[i] = dl * convert_float8(v) - ml;
    }
}

inline void deq_q4_k(global const uchar* row, int c, float8* w) {
    global const uchar* b = row + (c >> 3) * 144;
    kq_run(b, c & 7, b + 16, 0, w);
}

inline void deq_q5_k(global const uchar* row, int c, float8* w) {
    global const uchar* b = row + (c >> 3) * 176;
    kq_run(b, c & 7, b + 48, b + 16, w);
}

// Q6_K: 256-weight blocks, group g = h * 4 + s of 32 weights uses scales 2g (weights 0-15) and
// 2g + 1; low 4 bits: nibble s / 2 of ql[h * 64 + (s % 2) * 32 + l]; high 2: field s of qh[h * 32 + l]
inline void deq_q6_k(global const uchar* row, int c, float8* w) {
    global const uchar* b = row + (c >> 3) * 210;
    int g = c & 7, h = g >> 2, s = g & 3;
    float d = f16at(b + 208);
    global const char* sc = (global const char*)(b + 192);
    global const uchar* ql = b + h * 64 + (s & 1) * 32;
    global const uchar* qh = b + 128 + h * 32;
    int ls = 4 * (s >> 1), hs = 2 * s;
    for (int i = 0; i < 4; i++) {
        int8 q = ((bytes8(ql, i) >> ls) & 15) | (((bytes8(qh, i) >> hs) & 3) << 4);
        w[i] = (d * (float)sc[2 * g + (i >> 1)]) * convert_float8(q - 32);
    }
}

inline float hsum(float8 v) {
    float4 b = v.lo + v.hi;
    float2 c = b.lo + b.hi;
    return c.x + c.y;
}

// ---------------------------------------------------------------------------------------------
// Y[r, o] = sum_i X[r, i] * W[o, i] (+ bias[o]): a work-group per output o and ROWS rows of X;
// its work-items take the row's 32-weight chunks in turn, decode each once for the ROWS rows.
// global (n_out * WG, ceil(n / ROWS)), local (WG, 1)

#define DOT32(w, x) (w[0] * vload8(0, x) + w[1] * vload8(1, x) + w[2] * vload8(2, x) + w[3] * vload8(3, x))

#define MATMUL(T)                                                                                   \
kernel void matmul_##T(global const uchar* W, int row_bytes, int n_in, global const float* X,     \
                       int n, global float* Y, int n_out, global const float* bias, int has_bias) { \
    int o = get_group_id(0), t = get_local_id(0), r0 = get_group_id(1) * ROWS;                     \
    int nr = min(ROWS, n - r0);                                                                    \
    global const uchar* row = W + (long)o * row_bytes;                                             \
    float8 acc[ROWS], w[4];                                                                        \
    for (int r = 0; r < ROWS; r++) acc[r] = 0.0f;                                                  \
    for (int c = t; c < n_in / 32; c += WG) {                                                      \
        deq_##T(row, c, w);                                                                        \
        for (int r = 0; r < nr; r++) acc[r] += DOT32(w, X + (long)(r0 + r) * n_in + c * 32);       \
    }                                                                                              \
    local float red[ROWS][WG];                                                                     \
    for (int r = 0; r < ROWS; r++) red[r][t] = hsum(acc[r]);                                       \
    barrier(CLK_LOCAL_MEM_FENCE);                                                                  \
    for (int half_ = WG / 2; half_ > 0; half_ >>= 1) {                                             \
        if (t < half_)                                                                             \
            for (int r = 0; r < ROWS; r++) red[r][t] += red[r][t + half_];                         \
        barrier(CLK_LOCAL_MEM_FENCE);                                                              \
    }                                                                                              \
    if (t < nr) Y[(long)(r0 + t) * n_out + o] = red[t][0] + (has_bias ? bias[o] : 0.0f);           \
}

// The same product with a work-item per output o and ROWS rows of X, each over the whole row: no
// barrier and few work-groups, the shape a CPU device runs well (its vectors are the chunks').
// global (n_out rounded up to WG, ceil(n / ROWS)), local (WG, 1)

#define MATROWS(T)                                                                                  \
kernel void matrows_##T(global const uchar* W, int row_bytes, int n_in, global const float* X,    \
                        int n, global float* Y, int n_out, global const float* bias, int has_bias) { \
    int o = get_global_id(0), r0 = get_global_id(1) * ROWS;                                        \
    if (o >= n_out) return;                                                                        \
    int nr = min(ROWS, n - r0);                                                                    \
    global const uchar* row = W + (long)o * row_bytes;                                             \
    float8 acc[ROWS], w[4];                                                                        \
    for (int r = 0; r < ROWS; r++) acc[r] = 0.0f;                                                  \
    for (int c = 0; c < n_in / 32; c++) {                                                          \
        deq_##T(row, c, w);                                                                        \
        for (int r = 0; r < nr; r++) acc[r] += DOT32(w, X + (long)(r0 + r) * n_in + c * 32);       \
    }                                                                                              \
    for (int r = 0; r < nr; r++) Y[(long)(r0 + r) * n_out + o] = hsum(acc[r]) + (has_bias ? bias[o] : 0.0f); \
}

#define BOTH(T) MATMUL(T) MATROWS(T)
BOTH(f32)
BOTH(f16)
BOTH(q4_0)
BOTH(q4_1)
BOTH(q5_0)
BOTH(q5_1)
BOTH(q8_0)
BOTH(q4_k)
BOTH(q5_k)
BOTH(q6_k)

// ---------------------------------------------------------------------------------------------
// elementwise and per-row

// Y[r] = X[r] / sqrt(mean(X[r]^2) + eps) * w: a work-group per row of `width`; Y may be X.
// global (rows * WG), local (WG)
kernel void rms_norm(global const float* X, global const float* w, global float* Y, int width, float eps) {
    int r = get_group_id(0), t = get_local_id(0);
    global const float* x = X + (long)r * width;
    local float red[WG];
    float s = 0.0f;
    for (int i = t; i < width; i += WG) s = fma(x[i], x[i], s);
    red[t] = s;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (int h = WG / 2; h > 0; h >>= 1) {
        if (t < h) red[t] += red[t + h];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    float inv = 1.0f / sqrt(red[0] / (float)width + eps);
    for (int i = t; i < width; i += WG) Y[(long)r * width + i] = x[i] * inv * w[i];
}

// X += Y, over n values
kernel void add(global float* X, global const float* Y) {
    int i = get_global_id(0);
    X[i] += Y[i];
}

// G = act(G) * U: act 0 is SiLU, 1 the tanh approximation of GELU
kernel void glu(global float* G, global const float* U, int act) {
    int i = get_global_id(0);
    float g = G[i];
    float a = act ? 0.5f * g * (1.0f + tanh(0.7978845608028654f * (g + 0.044715f * g * g * g))) : g / (1.0f + exp(-g));
    G[i] = a * U[i];
}

// RoPE in place on X [n, heads, head_dim], the first 2 * half dims, with tables cos/sin
// [n, half]; neox rotates (i, i + half), the other style (2i, 2i + 1).
// global (n * heads * half)
kernel void rope(global float* X, global const float* cs, global const float* sn, int heads, int head_dim,
                 int half_, int neox) {
    int id = get_global_id(0);
    int i = id % half_, rh = id / half_, r = rh / heads;
    global float* x = X + (long)rh * head_dim;
    int a = neox ? i : 2 * i, b = neox ? i + half_ : 2 * i + 1;
    float c = cs[r * half_ + i], s = sn[r * half_ + i];
    float xa = x[a], xb = x[b];
    x[a] = xa * c - xb * s;
    x[b] = xa * s + xb * c;
}

// keys and values of n new positions into a layer's cache [n_kv, cap, d] at `start` (halves,
// rounded to nearest even). global (n * n_kv * max(d, dv))
kernel void kv_store(global const float* K, global const float* V, global half* Kc, global half* Vc, int n_kv,
                     int d, int dv, int cap, int start) {
    int id = get_global_id(0), w = max(d, dv);
    int i = id % w, rh = id / w, h = rh % n_kv, r = rh / n_kv;
    long at = (long)h * cap + start + r;
    if (i < d) vstore_half_rte(K[(long)rh * d + i], at * d + i, Kc);
    if (i < dv) vstore_half_rte(V[(long)rh * dv + i], at * dv + i, Vc);
}

// ---------------------------------------------------------------------------------------------
// attention: query row r (position pos0 + r) sees keys j <= pos0 + r (and j > pos0 + r - window
// when window > 0). Split-K: a work-group per (row, key/value head, split of `split` keys) runs
// an online softmax over its keys in tiles of WG for the g query heads that share the key/value
// head, and leaves its unnormalized sums and (max, sum of exps); attn_merge combines the splits.
// Q [n, n_head, d]; Kc, Vc [n_kv, cap, d / dv]; Op [n, n_head, n_split, dv]; ML [n, n_head, n_split, 2].
// global (WG, n * n_kv, n_split), local (WG, 1, 1)

kernel void attn_split(global const float* Q, global const half* Kc, global const half* Vc, int n_head, int n_kv,
                       int d, int dv, int cap, int pos0, int window, float scale, int split, global float* Op,
                       global float* ML) {
    int t = get_local_id(0), rk = get_group_id(1), s = get_group_id(2), n_split = get_num_groups(2);
    int r = rk / n_kv, kh = rk % n_kv, g = n_head / n_kv;
    int p = pos0 + r;
    int lo = max(s * split, window > 0 ? p - window + 1 : 0), hi = min((s + 1) * split, p + 1);
    local float q[MAXG * 256];
    local float sc[MAXG][WG];
    local float mnew[MAXG], corr[MAXG];
    float m[MAXG], l[MAXG], acc[MAXG][MAXDPT];
    for (int h = 0; h < g; h++) {
        m[h] = -INFINITY;
        l[h] = 0.0f;
        for (int e = 0; e < MAXDPT; e++) acc[h][e] = 0.0f;
        for (int i = t; i < d; i += WG) q[h * d + i] = Q[((long)r * n_head + kh * g + h) * d + i];
    }
    barrier(CLK_LOCAL_MEM_FENCE);
    global const half* K = Kc + (long)kh * cap * d;
    global const half* V = Vc + (long)kh * cap * dv;
    for (int j0 = lo; j0 < hi; j0 += WG) {
        int j = j0 + t, nt = min(WG, hi - j0);
        if (t < nt) {
            for (int h = 0; h < g; h++) {
                float x = 0.0f;
                for (int i = 0; i < d; i++) x = fma(q[h * d + i], vload_half((long)j * d + i, K), x);
                sc[h][t] = x * scale;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (t < g) {  // one work-item a head: the tile's max, the factor on what came before
            float mx = m[t];
            for (int u = 0; u < nt; u++) mx = fmax(mx, sc[t][u]);
            mnew[t] = mx;
            corr[t] = exp(m[t] - mx);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int h = 0; h < g; h++) {
            if (t < nt) sc[h][t] = exp(sc[h][t] - mnew[h]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (int h = 0; h < g; h++) {
            float sum = 0.0f;
            for (int u = 0; u < nt; u++) sum += sc[h][u];
            l[h] = l[h] * corr[h] + sum;
            m[h] = mnew[h];
            for (int e = 0; e < MAXDPT; e++) {
                int i = t + e * WG;
                if (i < dv) {
                    float a = acc[h][e] * corr[h];
                    for (int u = 0; u < nt; u++) a = fma(sc[h][u], vload_half((long)(j0 + u) * dv + i, V), a);
                    acc[h][e] = a;
                }
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    for (int h = 0; h < g; h++) {
        long o = ((long)r * n_head + kh * g + h) * n_split + s;
        for (int e = 0; e < MAXDPT; e++) {
            int i = t + e * WG;
            if (i < dv) Op[o * dv + i] = acc[h][e];
        }
        if (t == 0) {
            ML[2 * o] = m[h];
            ML[2 * o + 1] = l[h];
        }
    }
}

// The same split-K attention with a work-item per (row, query head, split), over one key at a time
// in 8-wide vectors: no barrier, the shape a CPU device runs well. head_dim and head_dim_v are
// multiples of 8, at most MAXD. global (nq = n * n_head rounded up to RWG, n_split), local (RWG, 1):
// PoCL runs a work-group's items on one stack, ~2 KB of private vectors each (a work-group it
// chose itself, 64 x 7 items, overflowed it)

kernel void attn_rows(global const float* Q, global const half* Kc, global const half* Vc, int n_head, int n_kv,
                      int d, int dv, int cap, int pos0, int window, float scale, int split, global float* Op,
                      global float* ML, int nq) {
    int rh = get_global_id(0), s = get_global_id(1), n_split = get_global_size(1);
    if (rh >= nq) return;
    int r = rh / n_head, kh = (rh % n_head) / (n_head / n_kv);
    int p = pos0 + r;
    int lo = max(s * split, window > 0 ? p - window + 1 : 0), hi = min((s + 1) * split, p + 1);
    float8 q[MAXD / 8], acc[MAXD / 8];
    for (int i = 0; i < d / 8; i++) q[i] = vload8(i, Q + (long)rh * d);
    for (int i = 0; i < dv / 8; i++) acc[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;
    global const half* K = Kc + (long)kh * cap * d;
    global const half* V = Vc + (long)kh * cap * dv;
    float e[KT];
    for (int j0 = lo; j0 < hi; j0 += KT) {  // tiles of KT keys: one rescale a tile
        int nt = min(KT, hi - j0);
        float mx = m;
        for (int u = 0; u < nt; u++) {
            float8 x = 0.0f;
            for (int i = 0; i < d / 8; i++) x += q[i] * vload_half8(i, K + (long)(j0 + u) * d);
            e[u] = hsum(x) * scale;
            mx = fmax(mx, e[u]);
        }
        float corr = exp(m - mx);
        l *= corr;
        for (int i = 0; i < dv / 8; i++) acc[i] *= corr;
        m = mx;
        for (int u = 0; u < nt; u++) {
            e[u] = exp(e[u] - mx);
            l += e[u];
        }
        for (int u = 0; u < nt; u++)
            for (int i = 0; i < dv / 8; i++) acc[i] += e[u] * vload_half8(i, V + (long)(j0 + u) * dv);
    }
    long o = (long)rh * n_split + s;
    for (int i = 0; i < dv / 8; i++) vstore8(acc[i], i, Op + o * dv);
    ML[2 * o] = m;
    ML[2 * o + 1] = l;
}

// O [n, n_head * dv] from the splits. global (dv, n * n_head)
kernel void attn_merge(global const float* Op, global const float* ML, int n_split, int dv, global float* O) {
    int i = get_global_id(0), rh = get_global_id(1);
    long b = (long)rh * n_split;
    float mx = -INFINITY;
    for (int s = 0; s < n_split; s++) mx = fmax(mx, ML[2 * (b + s)]);
    float l = 0.0f, a = 0.0f;
    for (int s = 0; s < n_split; s++) {
        float ms = ML[2 * (b + s)];
        if (ms == -INFINITY) continue;  // a split with no key this row may see
        float f = exp(ms - mx);
        l = fma(ML[2 * (b + s) + 1], f, l);
        a = fma(Op[(b + s) * dv + i], f, a);
    }
    O[(long)rh * dv + i] = a / l;
}
