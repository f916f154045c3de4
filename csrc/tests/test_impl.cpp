// Plain C++ (no torch) checks of the per-element logic in csrc/kernels/*_impl.h on known values.
// Built and run by CMakeLists.txt / ctest; the Python tests compare the compiled ops with the
// PyTorch reference, this executable pins the header logic itself (and builds without torch/CUDA).
#include <cmath>
#include <cstdio>
#include <limits>
#include <vector>

#include "fastdream/common.h"
#include "kernels/cameras_impl.h"
#include "kernels/compositing_impl.h"
#include "kernels/frequency_encoding_impl.h"
#include "kernels/hash_encoding_impl.h"
#include "kernels/marching_impl.h"
#include "kernels/pruning_impl.h"
#include "kernels/rasterize_impl.h"

using namespace fastdream;

static int failures = 0;
#define EXPECT(cond)                                                          \
    do {                                                                      \
        if (!(cond)) {                                                        \
            std::printf("FAILED %s:%d: %s\n", __FILE__, __LINE__, #cond);     \
            ++failures;                                                       \
        }                                                                     \
    } while (0)
#define EXPECT_NEAR(a, b, tol) EXPECT(std::fabs(double(a) - double(b)) <= (tol))

static void test_grid_index() {
    // dense: x + y*r + z*r^2 modulo size
    EXPECT(hashgrid::grid_index(1, 2, 3, 4, 64, false) == 1 + 2 * 4 + 3 * 16);
    EXPECT(hashgrid::grid_index(3, 3, 3, 4, 32, false) == (3 + 12 + 48) % 32);
    // hashed: XOR of coords times tcnn's primes with uint32 wrap-around
    uint32_t h = 5u ^ (7u * 2654435761u) ^ (11u * 805459861u);
    EXPECT(hashgrid::grid_index(5, 7, 11, 100, 1u << 19, true) == h % (1u << 19));
    EXPECT(hashgrid::grid_index(0, 0, 0, 100, 1u << 19, true) == 0);
}

static void test_encode_level() {
    // one dense level, resolution 3 (scale 2), table holds its index as feature
    hashgrid::GridMeta m{};
    m.n_levels = 1;
    m.n_features = 1;
    m.scale[0] = 2.0f;
    m.resolution[0] = 3;
    m.size[0] = 32;
    m.offset[0] = 0;
    m.hashed[0] = 0;
    std::vector<float> table(32);
    for (int i = 0; i < 32; ++i) table[i] = float(i);
    // x = 0.25 -> pos = 1.0 exactly (a cell boundary): base 1, frac 0 -> value of vertex (1,1,1) = 1+3+9
    float x[3] = {0.25f, 0.25f, 0.25f};
    float out[1];
    hashgrid::encode_level(m, 0, x, table.data(), out);
    EXPECT_NEAR(out[0], 13.0, 1e-6);
    // linear in each axis: value = x_idx + 3*y_idx + 9*z_idx interpolated -> pos - 0 offsets
    float y[3] = {0.3f, 0.1f, 0.6f};
    hashgrid::encode_level(m, 0, y, table.data(), out);
    double px = 0.3 * 2 + 0.5, py = 0.1 * 2 + 0.5, pz = 0.6 * 2 + 0.5;
    EXPECT_NEAR(out[0], px + 3 * py + 9 * pz, 1e-5);
    // gradient wrt x of a linear field: scale * (1, 3, 9)
    float gy[1] = {1.0f}, gx[3] = {0, 0, 0};
    hashgrid::encode_level_backward_x(m, 0, y, gy, table.data(), gx);
    EXPECT_NEAR(gx[0], 2.0, 1e-5);
    EXPECT_NEAR(gx[1], 6.0, 1e-5);
    EXPECT_NEAR(gx[2], 18.0, 1e-5);
    // params gradient: the 8 corner weights sum to 1
    std::vector<float> grad(32, 0.0f);
    struct Acc {
        float* g;
        void operator()(int64_t i, float w, const float* gy, int F) const {
            for (int f = 0; f < F; ++f) g[i + f] += w * gy[f];
        }
    } acc{grad.data()};
    hashgrid::encode_level_backward_params(m, 0, y, gy, acc);
    double total = 0;
    for (float v : grad) total += v;
    EXPECT_NEAR(total, 1.0, 1e-6);
}

static void test_marching() {
    const float box[9] = {-1, -1, -1, 1, 1, 1, 2, 2, 2};
    float o[3] = {-3.0f, 0.1f, 0.2f}, d[3] = {1.0f, 0.0f, 0.0f};
    float t0, t1;
    march::ray_aabb(o, d, box, t0, t1);
    EXPECT_NEAR(t0, 2.0, 1e-6);
    EXPECT_NEAR(t1, 4.0, 1e-6);
    float miss_o[3] = {-3.0f, 3.0f, 0.0f};
    march::ray_aabb(miss_o, d, box, t0, t1);
    EXPECT(t1 < t0);
    // full 2x2x2 grid, step 0.5: [2, 4] is cut into 4 intervals
    const uint8_t full[8] = {1, 1, 1, 1, 1, 1, 1, 1};
    const uint8_t any = 1;
    const march::OccupancyView grid{full, &any, {2, 2, 2}, {1, 1, 1}};
    march::MarchParams p{0.0, 1e10, 0.5, 0.0, 1e10};
    std::vector<float> starts, ends;
    struct Emit {
        std::vector<float>*s, *e;
        void operator()(int64_t, float a, float b) const {
            s->push_back(a);
            e->push_back(b);
        }
    } emit{&starts, &ends};
    int64_t n = march::march_ray(o, d, box, grid, p, emit);
    EXPECT(n == 4 && starts.size() == 4);
    EXPECT_NEAR(starts[0], 2.0, 1e-6);
    EXPECT_NEAR(ends[3], 4.0, 1e-6);
    // only cells with x index 1 occupied: the ray keeps [3, 4]
    const uint8_t half_cells[8] = {0, 0, 0, 0, 1, 1, 1, 1};
    const march::OccupancyView half{half_cells, &any, {2, 2, 2}, {1, 1, 1}};
    starts.clear();
    ends.clear();
    n = march::march_ray(o, d, box, half, p, emit);
    EXPECT(n == 2);
    EXPECT_NEAR(starts[0], 3.0, 1e-6);
    // cone angle: dt = clamp(t * cone, step, max)
    march::MarchParams pc{0.0, 1e10, 0.1, 0.25, 0.6};
    starts.clear();
    ends.clear();
    march::march_ray(o, d, box, grid, pc, emit);
    EXPECT_NEAR(ends[0] - starts[0], 0.5, 1e-6);   // t = 2 -> 0.5
    EXPECT_NEAR(ends[1] - starts[1], 0.6, 1e-6);   // t = 2.5 -> 0.625 clamped to 0.6
    // 32 cells along x, only x index 20 occupied: the empty blocks before and after it are skipped,
    // and exactly the steps whose midpoint lies in [x = 0.25, 0.3125) are kept (t in [3.25, 3.3125)).
    std::vector<uint8_t> line(32, 0);
    line[20] = 1;
    const uint8_t line_blocks[4] = {0, 0, 1, 0};
    const march::OccupancyView sparse{line.data(), line_blocks, {32, 1, 1}, {4, 1, 1}};
    march::MarchParams fine{0.0, 1e10, 1.0 / 64, 0.0, 1e10};
    starts.clear();
    ends.clear();
    n = march::march_ray(o, d, box, sparse, fine, emit);
    EXPECT(n == 4);
    EXPECT_NEAR(starts[0], 3.25, 1e-6);
    EXPECT_NEAR(ends[3], 3.3125, 1e-6);
    EXPECT(march::is_finite(1.5f) && march::is_finite(-2.0) && !march::is_finite(std::nanf("")) &&
           !march::is_finite(-march::infinity<double>()) && !march::is_finite(march::infinity<float>()));
}

static void test_compositing() {
    // constant density slab: weights sum to 1 - exp(-sigma * length)
    const int n = 4;
    double ts[n] = {0, 0.5, 1.0, 1.5}, te[n] = {0.5, 1.0, 1.5, 2.0}, sig[n] = {1.3, 1.3, 1.3, 1.3};
    double w[n], T[n], a[n];
    render::weights_forward_ray<double>(0, n, ts, te, sig, w, T, a);
    double sum = 0;
    for (double v : w) sum += v;
    EXPECT_NEAR(sum, 1.0 - std::exp(-1.3 * 2.0), 1e-12);
    EXPECT_NEAR(T[0], 1.0, 0);
    EXPECT_NEAR(T[2], std::exp(-1.3), 1e-12);
    // composite in albedo mode: rgb = sum w * albedo, depth = sum w * t_mid
    double albedo[3 * n], normals[3 * n];
    for (int i = 0; i < 3 * n; ++i) {
        albedo[i] = 0.5;
        normals[i] = (i % 3 == 2) ? 1.0 : 0.0;
    }
    double origin[3] = {0, 0, 0}, dir[3] = {0, 0, 1}, light[3] = {0, 0, 10};
    render::ShadeInputs<double> in{origin, dir, light, 1.0, 0.1};
    double rgb[3], op, depth, normal[3], wts[n];
    render::composite_forward_ray<double>(0, n, render::kAlbedo, ts, te, sig, albedo, normals, in, rgb, &op, &depth,
                                          normal, wts);
    EXPECT_NEAR(op, sum, 1e-12);
    EXPECT_NEAR(rgb[0], 0.5 * sum, 1e-12);
    EXPECT_NEAR(normal[2], sum, 1e-12);
    // lambertian with the light straight along the normal: intensity * 1 + ambient
    render::composite_forward_ray<double>(0, n, render::kLambertian, ts, te, sig, albedo, normals, in, rgb, &op,
                                          &depth, normal, wts);
    EXPECT_NEAR(rgb[1], 0.5 * 1.1 * sum, 1e-12);
    render::composite_forward_ray<double>(0, n, render::kTextureless, ts, te, sig, albedo, normals, in, rgb, &op,
                                          &depth, normal, wts);
    EXPECT_NEAR(rgb[2], 1.1 * sum, 1e-12);
    // empty ray
    render::composite_forward_ray<double>(0, 0, render::kAlbedo, ts, te, sig, albedo, normals, in, rgb, &op, &depth,
                                          normal, wts);
    EXPECT(op == 0 && rgb[0] == 0 && depth == 0);
}

static void test_pruning() {
    // samples of s = sigma * dt = 1, 0, 3, 1, 1: T = 1, e^-1, e^-1, e^-4, e^-5; alpha = 1 - e^-s
    const int n = 5;
    double ts[n] = {0, 1, 2, 3, 4}, te[n] = {1, 2, 3, 4, 5}, sig[n] = {1, 0, 3, 1, 1};
    std::vector<int64_t> kept;
    auto record = [&](int64_t i) { kept.push_back(i); };
    EXPECT(prune::walk_ray<double>(0, n, ts, te, sig, 0.0, 0.0, record) == 5);
    kept.clear();  // T < e^-3 from the fourth sample on: the walk stops there
    EXPECT(prune::walk_ray<double>(0, n, ts, te, sig, std::exp(-3.0), 0.0, record) == 3 && kept.size() == 3);
    kept.clear();  // the transparent second sample (alpha 0) is dropped, the walk goes on
    EXPECT(prune::walk_ray<double>(0, n, ts, te, sig, std::exp(-3.0), 0.5, record) == 2);
    EXPECT(kept.size() == 2 && kept[0] == 0 && kept[1] == 2);
    EXPECT(prune::walk_ray<double>(0, n, ts, te, sig, 2.0, 0.0, prune::CountOnly{}) == 0);  // T = 1 < 2
    // a NaN density: its alpha fails the threshold test, the NaN transmittance behind it stops the walk
    double nan_sig[3] = {1.0, std::numeric_limits<double>::quiet_NaN(), 1.0};
    EXPECT(prune::walk_ray<double>(0, 3, ts, te, nan_sig, 1e-4, 0.0, prune::CountOnly{}) == 1);
    // ray spans by binary search; writes cut at the capacity
    const int64_t rays[6] = {0, 0, 2, 2, 2, 4};
    EXPECT(prune::lower_bound(rays, 0, 6, 1) == 2 && prune::lower_bound(rays, 0, 6, 2) == 2);
    EXPECT(prune::lower_bound(rays, 0, 6, 3) == 5 && prune::lower_bound(rays, 0, 6, 5) == 6);
    int64_t out_r[2] = {-1, -1};
    double out_s[2] = {-1, -1}, out_e[2] = {-1, -1};
    prune::WriteKept<double> write{1, 2, rays, ts, te, out_r, out_s, out_e};
    write(2);
    write(3);  // past the capacity: counted, not written
    EXPECT(out_r[0] == -1 && out_r[1] == 2 && out_s[1] == 2.0 && out_e[1] == 3.0 && write.slot == 3);
}

static void test_rasterize() {
    // a triangle with w = 1, 2, 1: perspective-correct barycentrics are not the screen-space ones
    const double p0[4] = {-1, -1, 0.5, 1}, p1[4] = {2, -2, 0, 2}, p2[4] = {-1, 1, 0.5, 1};
    double b[3];
    EXPECT(raster::barycentrics(p0, p1, p2, 0.0, -0.5, b));
    EXPECT_NEAR(b[0] + b[1] + b[2], 1.0, 1e-12);
    // the clip point sum b_i p_i projects onto the pixel centre
    double P[4];
    for (int k = 0; k < 4; ++k) P[k] = b[0] * p0[k] + b[1] * p1[k] + b[2] * p2[k];
    EXPECT_NEAR(P[0] / P[3], 0.0, 1e-12);
    EXPECT_NEAR(P[1] / P[3], -0.5, 1e-12);
    EXPECT_NEAR(raster::depth_of(p0, p1, p2, b), P[2] / P[3], 1e-12);
    // z-buffer keys: nearer first, ties to the lower id; pixel centres
    EXPECT(raster::zkey(0.25f, 7) < raster::zkey(0.5f, 3));
    EXPECT(raster::zkey(0.5f, 3) < raster::zkey(0.5f, 4));
    EXPECT_NEAR(raster::pixel_ndc<double>(0, 4), -0.75, 0.0);
    // one triangle over a 4 x 4 image: its left edge x = 0 lies between columns 1 and 2 (centres -0.25, 0.25)
    const double pos[12] = {0, -2, 0, 1, 3, -2, 0, 1, 0, 3, 0, 1};
    const int64_t tri[3] = {0, 1, 2};
    std::vector<uint64_t> zbuf(16, raster::kEmptyKey);
    raster::draw_triangle<double>(0, pos, tri, 4, 4, zbuf.data());
    EXPECT(zbuf[1] == raster::kEmptyKey && zbuf[2] != raster::kEmptyKey && zbuf[15] != raster::kEmptyKey);
    // antialias: pixel 1 (background) and pixel 2 (covered): the edge is at alpha = 1/2 from pixel 2's centre
    // (x = 0.25) to pixel 1's (x = -0.25), so neither pixel blends; moved to x = -0.1 (alpha 0.7), pixel 1 takes
    // w = 0.2 of pixel 2's colour
    const int64_t alone[3] = {-1, -1, -1};  // no neighbour across any edge
    const raster::EdgeHit<double> h = raster::pair_hit<double>(0, 1, 0, 2, -1, 0, 0.0, 0.0, 4, 4, pos, tri, alone);
    EXPECT(!h.hit);
    const double moved[12] = {-0.1, -2, 0, 1, 3, -2, 0, 1, -0.1, 3, 0, 1};
    const raster::EdgeHit<double> hm = raster::pair_hit<double>(0, 1, 0, 2, -1, 0, 0.0, 0.0, 4, 4, moved, tri, alone);
    EXPECT(hm.hit && !hm.p_occludes);
    EXPECT_NEAR(hm.alpha, 0.7, 1e-12);
    EXPECT_NEAR(hm.w, 0.2, 1e-12);
    // the crossed edge (vertices 2, 0: edge 1) continued by a second triangle (2, 0, 3): inside the surface when
    // vertex 3 lies across the edge from vertex 1, a silhouette when it folds back to vertex 1's side
    const int64_t two[6] = {0, 1, 2, 2, 0, 3}, adj[6] = {-1, 1, -1, -1, -1, 0};
    const double flat[16] = {-0.1, -2, 0, 1, 3, -2, 0, 1, -0.1, 3, 0, 1, -3, 0, 0, 1};
    const double folded[16] = {-0.1, -2, 0, 1, 3, -2, 0, 1, -0.1, 3, 0, 1, 1, 0, 0.5, 1};
    EXPECT(!raster::is_silhouette<double>(0, 1, 2, 0, 1.0, flat, two, adj));
    EXPECT(raster::is_silhouette<double>(0, 1, 2, 0, 1.0, folded, two, adj));
    EXPECT(!raster::pair_hit<double>(0, 1, 0, 2, -1, 0, 0.0, 0.0, 4, 4, flat, two, adj).hit);
    EXPECT(raster::pair_hit<double>(0, 1, 0, 2, -1, 0, 0.0, 0.0, 4, 4, folded, two, adj).hit);
}

// The fill pass's writer stays inside its ray's slot even if asked for more samples than were counted,
// and the occupancy update's per-cell rule skips non-finite estimates and keeps NaN cells.
static void test_packed_writes_and_occupancy_rule() {
    int64_t rays[4] = {-1, -1, -1, -1};
    float t0[4] = {0, 0, 0, 0}, t1[4] = {0, 0, 0, 0};
    march::WritePacked<float> emit{7, 1, 2, rays, t0, t1};
    for (int k = 0; k < 3; ++k) emit(k, float(k), float(k) + 0.5f);  // a third sample beyond the count
    EXPECT(rays[0] == -1 && rays[1] == 7 && rays[2] == 7 && rays[3] == -1);
    EXPECT(t0[2] == 1.0f && t1[3] == 0.0f);
    const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
    EXPECT(march::estimate_raises_cell(0.2f, 0.5f) && !march::estimate_raises_cell(0.5f, 0.2f));
    EXPECT(!march::estimate_raises_cell(0.2f, nan) && !march::estimate_raises_cell(0.2f, inf));
    EXPECT(!march::estimate_raises_cell(nan, 0.5f));
}

// Orbit cameras: the frame at the front and straight overhead, the azimuth wrap, the light and the diffuse
// share; pinhole rays: the centre pixel looks at the origin, a corner pixel's direction in closed form.
static void test_cameras() {
    double m[16];
    cam::orbit_c2w(0.0, 0.0, 2.0, m);  // front: at +z, right = +x, up = +y
    const double front[16] = {1, 0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 2, 0, 0, 0, 1};
    for (int k = 0; k < 16; ++k) EXPECT_NEAR(m[k], front[k], 1e-15);
    cam::orbit_c2w(90.0, 90.0, 1.5, m);  // overhead at azimuth 90: right = -z, up = -x, back = +y
    const double overhead[12] = {0, -1, 0, 0, 0, 0, 1, 1.5, -1, 0, 0, 0};
    for (int k = 0; k < 12; ++k) EXPECT_NEAR(m[k], overhead[k], 1e-15);
    EXPECT(cam::wrap_degrees(-30.0f) == 330.0f && cam::wrap_degrees(400.0f) == 40.0f && cam::wrap_degrees(360.0) == 0.0);
    EXPECT(cam::uniform_in(0.5f, -10.0f, 100.0f) == 40.0f);
    cam::orbit_c2w(0.0, 0.0, 2.0, m);
    double light[3];
    const double noise[3] = {1.0, 0.0, -1.0};
    cam::orbit_light(m, noise, 1.0, 3.0, light);  // (0, 0, 1) + (1, 0, -1) = +x, at distance 3
    EXPECT_NEAR(light[0], 3.0, 1e-15);
    EXPECT_NEAR(light[1], 0.0, 1e-15);
    EXPECT_NEAR(light[2], 0.0, 1e-15);
    EXPECT(cam::diffuse_intensity(0.8f, 0.25f) == 0.6f && cam::diffuse_intensity(0.8f, 1.5f) == 0.0f);
    double o[3], d[3];
    cam::pixel_ray(m, 10.0, 10.0, 2.5, 2.5, 2, 2, o, d);  // the pixel whose centre is the principal point
    EXPECT_NEAR(d[0], 0.0, 1e-15);
    EXPECT_NEAR(d[1], 0.0, 1e-15);
    EXPECT_NEAR(d[2], -1.0, 1e-15);
    cam::pixel_ray(m, 10.0, 10.0, 2.0, 2.0, 2, 2, o, d);  // half a pixel right and down: (0.05, -0.05, -1) / |.|
    const double n = std::sqrt(1.005);
    EXPECT_NEAR(d[0], 0.05 / n, 1e-15);
    EXPECT_NEAR(d[1], -0.05 / n, 1e-15);
    EXPECT_NEAR(d[2], -1.0 / n, 1e-15);
    EXPECT(o[0] == 0.0 && o[1] == 0.0 && o[2] == 2.0);
}

// Frequency encoding: the layout [x, sines, cosines] (component-major) and the values at known angles.
static void test_frequency_encoding() {
    const double x[2] = {0.25, -0.5};
    double out[10];
    EXPECT(freq::encoded_width(2, 2) == 10);
    freq::encode_point(x, 2, 2, out);
    const double pi = 3.14159265358979323846;
    const double want[10] = {0.25, -0.5, std::sin(pi / 4), std::sin(pi / 2), std::sin(-pi / 2), std::sin(-pi),
                             std::cos(pi / 4), std::cos(pi / 2), std::cos(-pi / 2), std::cos(-pi)};
    for (int k = 0; k < 10; ++k) EXPECT_NEAR(out[k], want[k], 1e-15);
    float xf = 1.0f, outf[1];
    freq::encode_point(&xf, 1, 0, outf);  // no frequencies: the point itself
    EXPECT(outf[0] == 1.0f);
}

int main() {
    test_grid_index();
    test_packed_writes_and_occupancy_rule();
    test_encode_level();
    test_marching();
    test_compositing();
    test_pruning();
    test_rasterize();
    test_cameras();
    test_frequency_encoding();
    if (failures == 0) std::printf("all impl checks passed\n");
    return failures == 0 ? 0 : 1;
}
