// Launchers of differentiable rasterization (rasterize, interpolate, antialias), written once for both
// extensions (see fastdream/parallel_for.h). The z-buffer pass draws one triangle per work item with an
// atomic 64-bit min (depth, id), so the image does not depend on scheduling; everything else is one work
// item per pixel. Gradients that many pixels send to one vertex are written per pixel and summed with
// index_add_, race-free on both devices. Included by csrc/cpu/ops_cpu.cpp and csrc/cuda/rasterize.cu.
#pragma once

#include <ATen/ATen.h>

#include "../kernels/rasterize_impl.h"
#include "fastdream/parallel_for.h"
#include "fastdream/torch_glue.h"

namespace fastdream {
namespace {

constexpr int64_t kTriangleGrain = 16;  // triangles per CPU task
constexpr int64_t kPixelGrain = 256;    // pixels per CPU task

inline void check_mesh(const at::Tensor& pos, const at::Tensor& tri, const char* op) {
    TORCH_CHECK(pos.dim() == 3 && pos.size(2) == 4, op, ": pos must be (B, V, 4) clip coordinates");
    TORCH_CHECK(tri.dim() == 2 && tri.size(1) == 3 && tri.scalar_type() == at::kLong, op,
                ": tri must be (F, 3) int64 vertex indices");
    TORCH_CHECK(tri.device() == pos.device(), op, ": pos and tri must be on one device");
    TORCH_CHECK(at::isFloatingType(pos.scalar_type()) && pos.scalar_type() != at::kHalf &&
                    pos.scalar_type() != at::kBFloat16,
                op, ": pos must be float32 or float64");
    TORCH_CHECK(tri.size(0) < (int64_t(1) << 31), op, ": at most 2^31 triangles");
}

inline void check_image(const at::Tensor& tri_id, int64_t B, const char* op) {
    TORCH_CHECK(tri_id.dim() == 3 && tri_id.size(0) == B && tri_id.scalar_type() == at::kLong, op,
                ": tri_id must be (B, H, W) int64");
}

// Sums per-pixel vertex gradients: rows (n, K) of `values` go to row idx[n] of a (rows + 1, K) buffer
// whose last row takes the entries without a vertex (idx == rows); returns the first `rows` rows.
inline at::Tensor scatter_rows(const at::Tensor& idx, const at::Tensor& values, int64_t rows) {
    const int64_t K = values.size(-1);
    auto out = at::zeros({rows + 1, K}, values.options());
    out.index_add_(0, idx.reshape({-1}), values.reshape({-1, K}));
    return out.narrow(0, 0, rows);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> rasterize_fwd(const at::Tensor& pos_, const at::Tensor& tri_,
                                                             int64_t height, int64_t width) {
    check_same_device("rasterize_fwd", {pos_, tri_});
    check_mesh(pos_, tri_, "rasterize");
    TORCH_CHECK(height >= 1 && width >= 1, "rasterize: height and width must be positive");
    DeviceGuard guard(pos_.device());
    auto pos = pos_.contiguous();
    auto tri = tri_.contiguous();
    const int64_t B = pos.size(0), V = pos.size(1), F = tri.size(0), H = height, W = width;
    auto opts = pos.options();
    auto zbuf = at::full({B, H, W}, -1, opts.dtype(at::kLong));  // all bits set: raster::kEmptyKey
    auto tri_id = at::empty({B, H, W}, opts.dtype(at::kLong));
    auto bary = at::empty({B, H, W, 2}, opts), depth = at::empty({B, H, W}, opts);
    if (B == 0) return {tri_id, bary, depth};
    AT_DISPATCH_FLOATING_TYPES(pos.scalar_type(), "rasterize_fwd", [&] {
        using S = scalar_t;
        const S* pp = pos.data_ptr<S>();
        const int64_t* tp = tri.data_ptr<int64_t>();
        uint64_t* zp = reinterpret_cast<uint64_t*>(zbuf.data_ptr<int64_t>());
        parallel_for(B * F, kTriangleGrain, [=] FD_LAMBDA(int64_t i) {
            const int64_t b = i / F;
            raster::draw_triangle<S>(i - b * F, pp + b * V * 4, tp, H, W, zp + b * H * W);
        });
        int64_t* ip = tri_id.data_ptr<int64_t>();
        S *bp = bary.data_ptr<S>(), *dp = depth.data_ptr<S>();
        parallel_for(B * H * W, kPixelGrain, [=] FD_LAMBDA(int64_t i) {
            const int64_t b = i / (H * W), rc = i - b * H * W, r = rc / W, c = rc - r * W;
            raster::resolve_pixel<S>(r, c, H, W, zp[i], pp + b * V * 4, tp, ip + i, bp + 2 * i, dp + i);
        });
    });
    return {tri_id, bary, depth};
}

at::Tensor rasterize_bwd(const at::Tensor& g_bary_, const at::Tensor& g_depth_, const at::Tensor& pos_,
                         const at::Tensor& tri_, const at::Tensor& tri_id_) {
    check_same_device("rasterize_bwd", {g_bary_, g_depth_, pos_, tri_, tri_id_});
    check_mesh(pos_, tri_, "rasterize_bwd");
    check_image(tri_id_, pos_.size(0), "rasterize_bwd");
    DeviceGuard guard(pos_.device());
    auto pos = pos_.contiguous();
    const auto dt = pos.scalar_type();
    auto tri = tri_.contiguous(), tri_id = tri_id_.contiguous();
    auto g_bary = g_bary_.to(dt).contiguous(), g_depth = g_depth_.to(dt).contiguous();
    const int64_t B = pos.size(0), V = pos.size(1), H = tri_id.size(1), W = tri_id.size(2), P = B * H * W;
    TORCH_CHECK(g_bary.numel() == 2 * P && g_depth.numel() == P, "rasterize_bwd: gradients must match the image");
    auto gbuf = at::empty({P, 3, 4}, pos.options());
    auto idx = at::empty({P, 3}, pos.options().dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES(dt, "rasterize_bwd", [&] {
        using S = scalar_t;
        const S *pp = pos.data_ptr<S>(), *gb = g_bary.data_ptr<S>(), *gd = g_depth.data_ptr<S>();
        const int64_t *tp = tri.data_ptr<int64_t>(), *ip = tri_id.data_ptr<int64_t>();
        S* gp = gbuf.data_ptr<S>();
        int64_t* xp = idx.data_ptr<int64_t>();
        parallel_for(P, kPixelGrain, [=] FD_LAMBDA(int64_t i) {
            const int64_t b = i / (H * W), rc = i - b * H * W, r = rc / W, c = rc - r * W, t = ip[i];
            if (t < 0) {
                for (int k = 0; k < 3; ++k) xp[3 * i + k] = B * V;
                for (int k = 0; k < 12; ++k) gp[12 * i + k] = S(0);
                return;
            }
            const S* view = pp + b * V * 4;
            for (int k = 0; k < 3; ++k) xp[3 * i + k] = b * V + tp[3 * t + k];
            raster::pixel_backward<S>(r, c, H, W, view + 4 * tp[3 * t], view + 4 * tp[3 * t + 1],
                                      view + 4 * tp[3 * t + 2], gb[2 * i], gb[2 * i + 1], gd[i], gp + 12 * i);
        });
    });
    return scatter_rows(idx, gbuf, B * V).view({B, V, 4});
}

at::Tensor interpolate_fwd(const at::Tensor& attr_, const at::Tensor& tri_id_, const at::Tensor& bary_,
                           const at::Tensor& tri_) {
    check_same_device("interpolate_fwd", {attr_, tri_id_, bary_, tri_});
    TORCH_CHECK(attr_.dim() == 2, "interpolate: attr must be (V, C)");
    TORCH_CHECK(tri_.dim() == 2 && tri_.size(1) == 3 && tri_.scalar_type() == at::kLong,
                "interpolate: tri must be (F, 3) int64");
    check_image(tri_id_, tri_id_.size(0), "interpolate");
    DeviceGuard guard(attr_.device());
    auto attr = attr_.contiguous();
    auto tri = tri_.contiguous(), tri_id = tri_id_.contiguous(), bary = bary_.to(attr.scalar_type()).contiguous();
    const int64_t B = tri_id.size(0), H = tri_id.size(1), W = tri_id.size(2), C = attr.size(1), P = B * H * W;
    TORCH_CHECK(bary.numel() == 2 * P, "interpolate: bary must be (B, H, W, 2)");
    auto out = at::empty({B, H, W, C}, attr.options());
    AT_DISPATCH_FLOATING_TYPES(attr.scalar_type(), "interpolate_fwd", [&] {
        using S = scalar_t;
        const S *ap = attr.data_ptr<S>(), *bp = bary.data_ptr<S>();
        const int64_t *tp = tri.data_ptr<int64_t>(), *ip = tri_id.data_ptr<int64_t>();
        S* op = out.data_ptr<S>();
        parallel_for(P, kPixelGrain, [=] FD_LAMBDA(int64_t i) {
            raster::interpolate_pixel<S>(ip[i], bp + 2 * i, ap, tp, C, op + C * i);
        });
    });
    return out;
}

std::tuple<at::Tensor, at::Tensor> interpolate_bwd(const at::Tensor& g_out_, const at::Tensor& attr_,
                                                   const at::Tensor& tri_id_, const at::Tensor& bary_,
                                                   const at::Tensor& tri_) {
    check_same_device("interpolate_bwd", {g_out_, attr_, tri_id_, bary_, tri_});
    DeviceGuard guard(attr_.device());
    auto attr = attr_.contiguous();
    const auto dt = attr.scalar_type();
    auto tri = tri_.contiguous(), tri_id = tri_id_.contiguous(), bary = bary_.to(dt).contiguous();
    auto g_out = g_out_.to(dt).contiguous();
    const int64_t B = tri_id.size(0), H = tri_id.size(1), W = tri_id.size(2), V = attr.size(0), C = attr.size(1);
    const int64_t P = B * H * W;
    TORCH_CHECK(g_out.numel() == P * C, "interpolate_bwd: g_out must be (B, H, W, C)");
    auto g_bary = at::empty({B, H, W, 2}, attr.options());
    // Per pixel and corner: the vertex (V for background) and its weight b_i; g_attr = sum b_i g_out.
    auto idx = at::empty({P, 3}, attr.options().dtype(at::kLong));
    auto wts = at::empty({P, 3}, attr.options());
    AT_DISPATCH_FLOATING_TYPES(dt, "interpolate_bwd", [&] {
        using S = scalar_t;
        const S *ap = attr.data_ptr<S>(), *bp = bary.data_ptr<S>(), *gp = g_out.data_ptr<S>();
        const int64_t *tp = tri.data_ptr<int64_t>(), *ip = tri_id.data_ptr<int64_t>();
        S *gbp = g_bary.data_ptr<S>(), *wp = wts.data_ptr<S>();
        int64_t* xp = idx.data_ptr<int64_t>();
        parallel_for(P, kPixelGrain, [=] FD_LAMBDA(int64_t i) {
            const int64_t t = ip[i];
            raster::interpolate_pixel_backward<S>(t, bp + 2 * i, ap, tp, C, gp + C * i, gbp + 2 * i);
            const S b0 = bp[2 * i], b1 = bp[2 * i + 1];
            const S w[3] = {b0, b1, S(1) - b0 - b1};
            for (int k = 0; k < 3; ++k) {
                xp[3 * i + k] = t < 0 ? V : tp[3 * t + k];
                wp[3 * i + k] = t < 0 ? S(0) : w[k];
            }
        });
    });
    auto g_attr = scatter_rows(idx, wts.unsqueeze(-1) * g_out.view({P, 1, C}), V);
    return {g_attr, g_bary};
}

// Antialias inputs in one dtype, contiguous.
struct AntialiasInputs {
    at::Tensor color, tri_id, depth, pos, tri, adj;
    int64_t B, H, W, C, V;
};

inline AntialiasInputs prepare_antialias(const at::Tensor& color, const at::Tensor& tri_id, const at::Tensor& depth,
                                         const at::Tensor& pos, const at::Tensor& tri, const at::Tensor& adj) {
    check_mesh(pos, tri, "antialias");
    check_image(tri_id, pos.size(0), "antialias");
    TORCH_CHECK(adj.sizes() == tri.sizes() && adj.scalar_type() == at::kLong,
                "antialias: adjacency must be (F, 3) int64 like tri (triangle_adjacency(tri))");
    TORCH_CHECK(color.dim() == 4 && color.size(0) == tri_id.size(0) && color.size(1) == tri_id.size(1) &&
                    color.size(2) == tri_id.size(2),
                "antialias: color must be (B, H, W, C) like tri_id");
    TORCH_CHECK(depth.sizes() == tri_id.sizes(), "antialias: depth must be (B, H, W)");
    AntialiasInputs a;
    a.color = color.contiguous();
    const auto dt = a.color.scalar_type();
    a.tri_id = tri_id.contiguous(), a.depth = depth.to(dt).contiguous(), a.pos = pos.to(dt).contiguous();
    a.tri = tri.contiguous(), a.adj = adj.contiguous();
    a.B = tri_id.size(0), a.H = tri_id.size(1), a.W = tri_id.size(2), a.C = color.size(3), a.V = pos.size(1);
    return a;
}

at::Tensor antialias_fwd(const at::Tensor& color, const at::Tensor& tri_id, const at::Tensor& depth,
                         const at::Tensor& pos, const at::Tensor& tri, const at::Tensor& adj) {
    check_same_device("antialias_fwd", {color, tri_id, depth, pos, tri, adj});
    DeviceGuard guard(color.device());
    AntialiasInputs a = prepare_antialias(color, tri_id, depth, pos, tri, adj);
    auto out = at::empty_like(a.color);
    const int64_t B = a.B, H = a.H, W = a.W, C = a.C, V = a.V;
    AT_DISPATCH_FLOATING_TYPES(a.color.scalar_type(), "antialias_fwd", [&] {
        using S = scalar_t;
        const S *cp = a.color.data_ptr<S>(), *dp = a.depth.data_ptr<S>(), *pp = a.pos.data_ptr<S>();
        const int64_t *ip = a.tri_id.data_ptr<int64_t>(), *tp = a.tri.data_ptr<int64_t>(), *jp = a.adj.data_ptr<int64_t>();
        S* op = out.data_ptr<S>();
        parallel_for(B * H * W, kPixelGrain, [=] FD_LAMBDA(int64_t i) {
            const int64_t b = i / (H * W), rc = i - b * H * W, r = rc / W, c = rc - r * W, base = b * H * W;
            for (int64_t ch = 0; ch < C; ++ch) op[C * i + ch] = cp[C * i + ch];
            for (int d = 0; d < raster::kNeighbours; ++d) {
                int64_t qr, qc;
                if (!raster::neighbour(r, c, d, H, W, &qr, &qc)) continue;
                const int64_t q = base + qr * W + qc;
                const raster::EdgeHit<S> h =
                    raster::pair_hit<S>(r, c, qr, qc, ip[i], ip[q], dp[i], dp[q], H, W, pp + b * V * 4, tp, jp);
                if (!h.hit) continue;
                for (int64_t ch = 0; ch < C; ++ch) op[C * i + ch] += h.w * (cp[C * q + ch] - cp[C * i + ch]);
            }
        });
    });
    return out;
}

std::tuple<at::Tensor, at::Tensor> antialias_bwd(const at::Tensor& g_out_, const at::Tensor& color,
                                                 const at::Tensor& tri_id, const at::Tensor& depth,
                                                 const at::Tensor& pos, const at::Tensor& tri, const at::Tensor& adj) {
    check_same_device("antialias_bwd", {g_out_, color, tri_id, depth, pos, tri, adj});
    DeviceGuard guard(color.device());
    AntialiasInputs a = prepare_antialias(color, tri_id, depth, pos, tri, adj);
    const int64_t B = a.B, H = a.H, W = a.W, C = a.C, V = a.V, P = B * H * W;
    auto g_out = g_out_.to(a.color.scalar_type()).contiguous();
    TORCH_CHECK(g_out.sizes() == a.color.sizes(), "antialias_bwd: g_out must match color");
    auto g_color = at::empty_like(a.color);
    // Per pixel, neighbour and edge end: the vertex (B * V when no edge) and its gradient.
    auto gbuf = at::empty({P, raster::kNeighbours, 2, 4}, a.color.options());
    auto idx = at::empty({P, raster::kNeighbours, 2}, a.tri_id.options());
    AT_DISPATCH_FLOATING_TYPES(a.color.scalar_type(), "antialias_bwd", [&] {
        using S = scalar_t;
        const S *cp = a.color.data_ptr<S>(), *dp = a.depth.data_ptr<S>(), *pp = a.pos.data_ptr<S>();
        const S* gp = g_out.data_ptr<S>();
        const int64_t *ip = a.tri_id.data_ptr<int64_t>(), *tp = a.tri.data_ptr<int64_t>(), *jp = a.adj.data_ptr<int64_t>();
        S *gcp = g_color.data_ptr<S>(), *gbp = gbuf.data_ptr<S>();
        int64_t* xp = idx.data_ptr<int64_t>();
        parallel_for(P, kPixelGrain, [=] FD_LAMBDA(int64_t i) {
            const int64_t b = i / (H * W), rc = i - b * H * W, r = rc / W, c = rc - r * W, base = b * H * W;
            const S* view = pp + b * V * 4;
            for (int64_t ch = 0; ch < C; ++ch) gcp[C * i + ch] = gp[C * i + ch];
            for (int d = 0; d < raster::kNeighbours; ++d) {
                const int64_t slot = i * raster::kNeighbours + d;
                xp[2 * slot] = B * V, xp[2 * slot + 1] = B * V;
                for (int k = 0; k < 8; ++k) gbp[8 * slot + k] = S(0);
                int64_t qr, qc;
                if (!raster::neighbour(r, c, d, H, W, &qr, &qc)) continue;
                const int64_t q = base + qr * W + qc;
                // p's own output: p += w_pq (c_q - c_p)
                const raster::EdgeHit<S> h =
                    raster::pair_hit<S>(r, c, qr, qc, ip[i], ip[q], dp[i], dp[q], H, W, view, tp, jp);
                if (h.hit) {
                    S g_alpha = S(0);
                    for (int64_t ch = 0; ch < C; ++ch) {
                        gcp[C * i + ch] -= h.w * gp[C * i + ch];
                        g_alpha += gp[C * i + ch] * (cp[C * q + ch] - cp[C * i + ch]);
                    }
                    if (h.p_occludes) g_alpha = -g_alpha;  // w = 1/2 - alpha
                    raster::alpha_backward<S>(h, r, c, qr, qc, H, W, view, g_alpha, gbp + 8 * slot,
                                              gbp + 8 * slot + 4);
                    xp[2 * slot] = b * V + h.vi, xp[2 * slot + 1] = b * V + h.vj;
                }
                // q's output uses p's colour: q += w_qp (c_p - c_q)
                const raster::EdgeHit<S> hq =
                    raster::pair_hit<S>(qr, qc, r, c, ip[q], ip[i], dp[q], dp[i], H, W, view, tp, jp);
                if (hq.hit)
                    for (int64_t ch = 0; ch < C; ++ch) gcp[C * i + ch] += hq.w * gp[C * q + ch];
            }
        });
    });
    auto g_pos = scatter_rows(idx, gbuf, B * V).view({B, V, 4});
    return {g_color, g_pos};
}

}  // namespace
}  // namespace fastdream
