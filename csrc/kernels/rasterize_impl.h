// Differentiable triangle rasterization (nvdiffrast's rasterize / interpolate / antialias), per element:
// one triangle for the z-buffer pass, one pixel for everything else. No torch headers.
//
// Conventions (as nvdiffrast): vertices are homogeneous clip coordinates (x, y, z, w); pixel (row r,
// column c) of an H x W image has its centre at NDC ((2c + 1) / W - 1, (2r + 1) / H - 1), so row 0 is
// NDC y = -1. Barycentrics are perspective-correct: the pixel's point is b0 v0 + b1 v1 + b2 v2 in clip
// space with b = k / sum(k), k = a x c, a_i = x_i - px w_i, c_i = y_i - py w_i (the two linear conditions
// x / w = px, y / w = py). A pixel is covered when all b_i >= 0 and its depth z / w lies in [-1, 1];
// triangles with a vertex at w <= 0 (crossing the camera plane) are not drawn.
#pragma once

#include "fastdream/common.h"

namespace fastdream {
namespace raster {

template <typename S>
FD_HOST_DEVICE FD_INLINE S pixel_ndc(int64_t i, int64_t n) {
    return (S(2) * S(i) + S(1)) / S(n) - S(1);
}

// Perspective-correct barycentrics of NDC point (px, py) in the triangle with clip vertices p0, p1, p2
// (4 values each). Writes b[3]; returns false when the triangle is degenerate at this point.
template <typename S>
FD_HOST_DEVICE FD_INLINE bool barycentrics(const S* p0, const S* p1, const S* p2, S px, S py, S* b) {
    const S a0 = p0[0] - px * p0[3], a1 = p1[0] - px * p1[3], a2 = p2[0] - px * p2[3];
    const S c0 = p0[1] - py * p0[3], c1 = p1[1] - py * p1[3], c2 = p2[1] - py * p2[3];
    const S k0 = a1 * c2 - a2 * c1, k1 = a2 * c0 - a0 * c2, k2 = a0 * c1 - a1 * c0;
    const S s = k0 + k1 + k2;
    if (s == S(0)) return false;
    b[0] = k0 / s, b[1] = k1 / s, b[2] = k2 / s;
    return true;
}

template <typename S>
FD_HOST_DEVICE FD_INLINE S depth_of(const S* p0, const S* p1, const S* p2, const S* b) {
    return (b[0] * p0[2] + b[1] * p1[2] + b[2] * p2[2]) / (b[0] * p0[3] + b[1] * p1[3] + b[2] * p2[3]);
}

// z-buffer key: depth mapped to [0, 1] as float bits (ordered like the floats for non-negative values) in
// the high word, the triangle id in the low word, so an atomic min keeps the nearest triangle and breaks
// depth ties by the lower id: the result does not depend on the order triangles are drawn in.
constexpr uint64_t kEmptyKey = ~uint64_t(0);

FD_HOST_DEVICE FD_INLINE uint64_t zkey(float depth01, int64_t t) {
    union {
        float f;
        uint32_t u;
    } v;
    v.f = depth01;
    return (uint64_t(v.u) << 32) | uint64_t(uint32_t(t));
}

FD_HOST_DEVICE FD_INLINE void atomic_min_u64(uint64_t* addr, uint64_t value) {
#if defined(__CUDA_ARCH__)
    atomicMin(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(value));
#else
    uint64_t cur = __atomic_load_n(addr, __ATOMIC_RELAXED);
    while (value < cur && !__atomic_compare_exchange_n(addr, &cur, value, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
    }
#endif
}

// Pass 1, one triangle t of view `view`: every covered pixel of its screen bounding box takes the atomic
// min of its z-buffer key. pos: this view's (V, 4) vertices; zbuf: this view's (H, W) keys.
template <typename S>
FD_HOST_DEVICE FD_INLINE void draw_triangle(int64_t t, const S* pos, const int64_t* tri, int64_t H, int64_t W,
                                            uint64_t* zbuf) {
    const S* p[3] = {pos + 4 * tri[3 * t], pos + 4 * tri[3 * t + 1], pos + 4 * tri[3 * t + 2]};
    if (!(p[0][3] > S(0) && p[1][3] > S(0) && p[2][3] > S(0))) return;
    S lo_x = p[0][0] / p[0][3], hi_x = lo_x, lo_y = p[0][1] / p[0][3], hi_y = lo_y;
    for (int i = 1; i < 3; ++i) {
        const S x = p[i][0] / p[i][3], y = p[i][1] / p[i][3];
        lo_x = fd_min(lo_x, x), hi_x = fd_max(hi_x, x), lo_y = fd_min(lo_y, y), hi_y = fd_max(hi_y, y);
    }
    if (!(lo_x <= S(1) && hi_x >= S(-1) && lo_y <= S(1) && hi_y >= S(-1))) return;  // also rejects NaN
    // Pixel centres inside the box: c with (2c + 1) / W - 1 in [lo, hi], one pixel of slack each side.
    const int64_t c0 = int64_t(fd_max(S(0), fd_floor((lo_x + S(1)) * S(W) * S(0.5) - S(0.5)))),
                  c1 = int64_t(fd_min(S(W - 1), fd_floor((hi_x + S(1)) * S(W) * S(0.5) - S(0.5)) + S(1))),
                  r0 = int64_t(fd_max(S(0), fd_floor((lo_y + S(1)) * S(H) * S(0.5) - S(0.5)))),
                  r1 = int64_t(fd_min(S(H - 1), fd_floor((hi_y + S(1)) * S(H) * S(0.5) - S(0.5)) + S(1)));
    for (int64_t r = r0; r <= r1; ++r) {
        const S py = pixel_ndc<S>(r, H);
        for (int64_t c = c0; c <= c1; ++c) {
            S b[3];
            if (!barycentrics(p[0], p[1], p[2], pixel_ndc<S>(c, W), py, b)) continue;
            if (!(b[0] >= S(0) && b[1] >= S(0) && b[2] >= S(0))) continue;
            const S d = depth_of(p[0], p[1], p[2], b);
            if (!(d >= S(-1) && d <= S(1))) continue;
            atomic_min_u64(zbuf + r * W + c, zkey(float((d + S(1)) * S(0.5)), t));
        }
    }
}

// Pass 2, one pixel: the winning triangle's id (-1 for none), barycentrics (b0, b1) and depth z / w.
template <typename S>
FD_HOST_DEVICE FD_INLINE void resolve_pixel(int64_t r, int64_t c, int64_t H, int64_t W, uint64_t key, const S* pos,
                                            const int64_t* tri, int64_t* tri_id, S* bary, S* depth) {
    if (key == kEmptyKey) {
        *tri_id = -1, bary[0] = S(0), bary[1] = S(0), *depth = S(0);
        return;
    }
    const int64_t t = int64_t(uint32_t(key & 0xffffffffu));
    const S *p0 = pos + 4 * tri[3 * t], *p1 = pos + 4 * tri[3 * t + 1], *p2 = pos + 4 * tri[3 * t + 2];
    S b[3] = {S(0), S(0), S(0)};
    barycentrics(p0, p1, p2, pixel_ndc<S>(c, W), pixel_ndc<S>(r, H), b);
    *tri_id = t, bary[0] = b[0], bary[1] = b[1], *depth = depth_of(p0, p1, p2, b);
}

// Backward of one covered pixel: gradients of (b0, b1) and depth to the triangle's three clip vertices
// (g[3][4], overwritten). Closed form of b = k / sum(k), k = a x c (see the top of the file).
template <typename S>
FD_HOST_DEVICE FD_INLINE void pixel_backward(int64_t r, int64_t c, int64_t H, int64_t W, const S* p0, const S* p1,
                                             const S* p2, S gu, S gv, S gd, S* g) {
    const S* p[3] = {p0, p1, p2};
    const S px = pixel_ndc<S>(c, W), py = pixel_ndc<S>(r, H);
    S a[3], cc[3];
    for (int i = 0; i < 3; ++i) a[i] = p[i][0] - px * p[i][3], cc[i] = p[i][1] - py * p[i][3];
    const S k[3] = {a[1] * cc[2] - a[2] * cc[1], a[2] * cc[0] - a[0] * cc[2], a[0] * cc[1] - a[1] * cc[0]};
    const S s = k[0] + k[1] + k[2];
    for (int i = 0; i < 12; ++i) g[i] = S(0);
    if (s == S(0)) return;
    const S b[3] = {k[0] / s, k[1] / s, k[2] / s};
    S gb[3] = {gu, gv, S(0)};
    // depth = N / D, N = sum b z, D = sum b w
    const S N = b[0] * p0[2] + b[1] * p1[2] + b[2] * p2[2], D = b[0] * p0[3] + b[1] * p1[3] + b[2] * p2[3];
    const S gN = gd / D, gD = -gd * N / (D * D);
    for (int i = 0; i < 3; ++i) {
        g[4 * i + 2] += gN * b[i];
        g[4 * i + 3] += gD * b[i];
        gb[i] += gN * p[i][2] + gD * p[i][3];
    }
    const S dot = gb[0] * b[0] + gb[1] * b[1] + gb[2] * b[2];
    const S gk[3] = {(gb[0] - dot) / s, (gb[1] - dot) / s, (gb[2] - dot) / s};
    // k = a x c: dL/da = c x gk, dL/dc = gk x a
    const S ga[3] = {cc[1] * gk[2] - cc[2] * gk[1], cc[2] * gk[0] - cc[0] * gk[2], cc[0] * gk[1] - cc[1] * gk[0]};
    const S gc[3] = {gk[1] * a[2] - gk[2] * a[1], gk[2] * a[0] - gk[0] * a[2], gk[0] * a[1] - gk[1] * a[0]};
    for (int i = 0; i < 3; ++i) {
        g[4 * i + 0] += ga[i];
        g[4 * i + 1] += gc[i];
        g[4 * i + 3] += -px * ga[i] - py * gc[i];
    }
}

// ---------------------------------------------------------------- interpolate
// out = b0 attr[v0] + b1 attr[v1] + (1 - b0 - b1) attr[v2] for a covered pixel, zeros elsewhere.
template <typename S>
FD_HOST_DEVICE FD_INLINE void interpolate_pixel(int64_t t, const S* bary, const S* attr, const int64_t* tri, int64_t C,
                                                S* out) {
    if (t < 0) {
        for (int64_t ch = 0; ch < C; ++ch) out[ch] = S(0);
        return;
    }
    const S* a0 = attr + C * tri[3 * t];
    const S* a1 = attr + C * tri[3 * t + 1];
    const S* a2 = attr + C * tri[3 * t + 2];
    const S b0 = bary[0], b1 = bary[1], b2 = S(1) - b0 - b1;
    for (int64_t ch = 0; ch < C; ++ch) out[ch] = b0 * a0[ch] + b1 * a1[ch] + b2 * a2[ch];
}

// Gradients of one pixel: to its barycentrics (g_bary[2]) and, per corner, the attribute gradient
// weights (w[3] = b0, b1, b2; the launcher scatters w_i * g_out to attr[v_i]).
template <typename S>
FD_HOST_DEVICE FD_INLINE void interpolate_pixel_backward(int64_t t, const S* bary, const S* attr, const int64_t* tri,
                                                         int64_t C, const S* g_out, S* g_bary) {
    g_bary[0] = S(0), g_bary[1] = S(0);
    if (t < 0) return;
    const S* a0 = attr + C * tri[3 * t];
    const S* a1 = attr + C * tri[3 * t + 1];
    const S* a2 = attr + C * tri[3 * t + 2];
    S gu = S(0), gv = S(0);
    for (int64_t ch = 0; ch < C; ++ch) gu += g_out[ch] * (a0[ch] - a2[ch]), gv += g_out[ch] * (a1[ch] - a2[ch]);
    g_bary[0] = gu, g_bary[1] = gv;
}

// ---------------------------------------------------------------- antialias
// For a pixel p and a neighbour q (4-neighbourhood) covered by different triangles (or one by none), the
// front one (smaller (depth, id); background is behind everything) is the occluder O. The segment from
// O's centre to the other centre leaves O's triangle through an edge at fraction alpha of its length
// (edge functions in NDC: the ratio is invariant under the viewport's affine map). The pixel area past the
// midpoint that the triangle does or does not cover is blended: p += w (c_q - c_p) with
// w = max(0, 1/2 - alpha) when p is the occluder, max(0, alpha - 1/2) otherwise, when the crossed edge is a
// silhouette (nvdiffrast's rule): no triangle continues the surface across it (adj, the edge adjacency of the
// topology: per triangle edge k, the edge opposite vertex k, the other triangle or -1), or the one that does
// folds back: its far vertex lies on O's side of the edge on screen (or on the edge), so the surface turns away
// from the viewer there. An edge inside the surface is never blended, whichever triangle covers q.
// The colour change is continuous in the vertex positions, so the silhouette receives gradients
// (Laine et al. 2020, nvdiffrast's antialias).
constexpr int kNeighbours = 4;

template <typename S>
struct EdgeHit {
    bool hit;
    S alpha, w;        // crossing fraction, blend weight of the neighbour's colour into p
    int64_t vi, vj;    // the crossed edge's vertex ids
    S sgn;             // orientation sign of the occluder's screen triangle
    bool p_occludes;
};

// Neighbour d of pixel (r, c): 0 left, 1 right, 2 down (row - 1), 3 up (row + 1); false outside the image.
FD_HOST_DEVICE FD_INLINE bool neighbour(int64_t r, int64_t c, int d, int64_t H, int64_t W, int64_t* qr, int64_t* qc) {
    const int dr[4] = {0, 0, -1, 1}, dc[4] = {-1, 1, 0, 0};
    *qr = r + dr[d], *qc = c + dc[d];
    return *qr >= 0 && *qr < H && *qc >= 0 && *qc < W;
}

template <typename S>
FD_HOST_DEVICE FD_INLINE S edge_fn(S vix, S viy, S vjx, S vjy, S x, S y) {
    return (vjx - vix) * (y - viy) - (vjy - viy) * (x - vix);
}

// Whether edge k (vertices vi, vj) of triangle T, whose screen orientation is sgn, is a silhouette.
template <typename S>
FD_HOST_DEVICE FD_INLINE bool is_silhouette(int64_t T, int k, int64_t vi, int64_t vj, S sgn, const S* pos,
                                            const int64_t* tri, const int64_t* adj) {
    const int64_t N = adj[3 * T + k];
    if (N < 0) return true;
    int64_t o = -1;
    for (int m = 0; m < 3; ++m)
        if (o < 0 && tri[3 * N + m] != vi && tri[3 * N + m] != vj) o = tri[3 * N + m];
    if (o < 0) return true;
    const S *Pi = pos + 4 * vi, *Pj = pos + 4 * vj, *Po = pos + 4 * o;
    const S ix = Pi[0] / Pi[3], iy = Pi[1] / Pi[3], jx = Pj[0] / Pj[3], jy = Pj[1] / Pj[3];
    const S ox = Po[0] / Po[3], oy = Po[1] / Po[3];
    // the edge function without FMA contraction: a discrete outcome, decided as the twin decides it
    const S e = sub_rn(mul_rn(sub_rn(jx, ix), sub_rn(oy, iy)), mul_rn(sub_rn(jy, iy), sub_rn(ox, ix)));
    return sgn * e >= S(0);
}

// The pair (p, q) as seen from p. pos: this view's (V, 4) vertices; adj: the (F, 3) edge adjacency.
template <typename S>
FD_HOST_DEVICE FD_INLINE EdgeHit<S> pair_hit(int64_t pr, int64_t pc, int64_t qr, int64_t qc, int64_t tp, int64_t tq,
                                             S dp, S dq, int64_t H, int64_t W, const S* pos, const int64_t* tri,
                                             const int64_t* adj) {
    EdgeHit<S> h{false, S(0), S(0), 0, 0, S(1), false};
    if (tp == tq) return h;
    const bool p_occ = tq < 0 || (tp >= 0 && (dp < dq || (dp == dq && tp < tq)));
    const int64_t T = p_occ ? tp : tq;
    const S ox = pixel_ndc<S>(p_occ ? pc : qc, W), oy = pixel_ndc<S>(p_occ ? pr : qr, H);
    const S nx = pixel_ndc<S>(p_occ ? qc : pc, W), ny = pixel_ndc<S>(p_occ ? qr : pr, H);
    S vx[3], vy[3];
    for (int i = 0; i < 3; ++i) {
        const S* v = pos + 4 * tri[3 * T + i];
        vx[i] = v[0] / v[3], vy[i] = v[1] / v[3];
    }
    const S area = (vx[1] - vx[0]) * (vy[2] - vy[0]) - (vy[1] - vy[0]) * (vx[2] - vx[0]);
    if (area == S(0)) return h;
    const S sgn = area > S(0) ? S(1) : S(-1);
    int best = -1;
    S best_alpha = S(2);
    for (int k = 0; k < 3; ++k) {
        const int i = (k + 1) % 3, j = (k + 2) % 3;
        const S eo = sgn * edge_fn(vx[i], vy[i], vx[j], vy[j], ox, oy);
        const S en = sgn * edge_fn(vx[i], vy[i], vx[j], vy[j], nx, ny);
        if (!(en < S(0) && eo >= S(0))) continue;
        const S alpha = eo / (eo - en);
        if (alpha < best_alpha) best_alpha = alpha, best = k;
    }
    if (best < 0) return h;
    const int64_t vi = tri[3 * T + (best + 1) % 3], vj = tri[3 * T + (best + 2) % 3];
    const S w = p_occ ? S(0.5) - best_alpha : best_alpha - S(0.5);
    if (!(w > S(0)) || !is_silhouette(T, best, vi, vj, sgn, pos, tri, adj)) return h;
    h.hit = true, h.alpha = best_alpha, h.w = w, h.vi = vi, h.vj = vj, h.sgn = sgn, h.p_occludes = p_occ;
    return h;
}

// d alpha / d (clip vertices vi, vj) for a hit, times g_alpha: writes gi[4], gj[4].
template <typename S>
FD_HOST_DEVICE FD_INLINE void alpha_backward(const EdgeHit<S>& h, int64_t pr, int64_t pc, int64_t qr, int64_t qc,
                                             int64_t H, int64_t W, const S* pos, S g_alpha, S* gi, S* gj) {
    const bool po = h.p_occludes;
    const S ox = pixel_ndc<S>(po ? pc : qc, W), oy = pixel_ndc<S>(po ? pr : qr, H);
    const S nx = pixel_ndc<S>(po ? qc : pc, W), ny = pixel_ndc<S>(po ? qr : pr, H);
    const S *Pi = pos + 4 * h.vi, *Pj = pos + 4 * h.vj;
    const S ix = Pi[0] / Pi[3], iy = Pi[1] / Pi[3], jx = Pj[0] / Pj[3], jy = Pj[1] / Pj[3];
    const S eo = h.sgn * edge_fn(ix, iy, jx, jy, ox, oy), en = h.sgn * edge_fn(ix, iy, jx, jy, nx, ny);
    const S den = (eo - en) * (eo - en);
    const S geo = g_alpha * (-en) / den * h.sgn, gen = g_alpha * eo / den * h.sgn;
    // e(x) = (jx - ix)(x.y - iy) - (jy - iy)(x.x - ix)
    const S gix = geo * (jy - oy) + gen * (jy - ny), giy = geo * (ox - jx) + gen * (nx - jx);
    const S gjx = geo * (oy - iy) + gen * (ny - iy), gjy = geo * (ix - ox) + gen * (ix - nx);
    // screen = (X / W, Y / W)
    gi[0] = gix / Pi[3], gi[1] = giy / Pi[3], gi[2] = S(0), gi[3] = -(gix * ix + giy * iy) / Pi[3];
    gj[0] = gjx / Pj[3], gj[1] = gjy / Pj[3], gj[2] = S(0), gj[3] = -(gjx * jx + gjy * jy) / Pj[3];
}

}  // namespace raster
}  // namespace fastdream
