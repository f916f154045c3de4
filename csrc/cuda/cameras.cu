// CUDA registration of the camera ops (orbit_cameras, camera_rays), written once for both extensions in
// csrc/launchers/cameras.h (one thread per camera, one per pixel, through fastdream/parallel_for.h).
#include <torch/library.h>

#include "../launchers/cameras.h"

TORCH_LIBRARY_IMPL(fastdream, CUDA, m) {
    m.impl("orbit_cameras", &fastdream::orbit_cameras);
    m.impl("camera_rays", &fastdream::camera_rays);
}
