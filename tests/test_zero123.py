"""Zero-1-to-3 guidance on a tiny random model saved in the zero123-xl diffusers layout: offline, CPU."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch the hub from tests

import dataclasses
import json
import math
import shutil

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastdream.cameras import orbit_cameras  # noqa: E402
from fastdream.errors import FastDreamError  # noqa: E402
from fastdream.guidance import Condition, Zero123Guidance, load_guidance  # noqa: E402
from fastdream.guidance.zero123 import camera_projection_class, relative_pose  # noqa: E402

from tiny_models import make_tiny_zero123_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def zero123_folder(tmp_path_factory):
    return make_tiny_zero123_pipeline(tmp_path_factory.mktemp("models") / "tiny-zero123")


def front_pose():
    return orbit_cameras(1, 32, 32, elevation_deg=0.0, distance=3.8, fov_y_deg=20.0)


@pytest.fixture(scope="module")
def z123(zero123_folder):
    g = load_guidance(zero123_folder, "cpu", seed=0, guidance_scale=3.0, view_dependent=False)
    torch.manual_seed(0)
    g.set_condition(Condition(image=torch.rand(3, 48, 48), pose=front_pose()))
    return g


def test_the_folder_is_recognised_and_loaded_as_zero123(zero123_folder, tmp_path):
    g = load_guidance(zero123_folder, "cpu")
    assert isinstance(g, Zero123Guidance) and g.resolution == 32
    assert g.options.guidance_scale == 3.0  # zero123's CFG scale, not text-to-image's 100
    # without model_index.json the 8-channel UNet (latents + image latents) names the family
    bare = tmp_path / "bare"
    shutil.copytree(zero123_folder, bare)
    (bare / "model_index.json").unlink()
    assert isinstance(load_guidance(bare, "cpu"), Zero123Guidance)


def test_relative_pose_follows_threestudio():
    e, a, d = (torch.tensor([30.0, 0.0]), torch.tensor([90.0, 0.0]), torch.tensor([4.0, 3.8]))
    pose = relative_pose(e, a, d, torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([3.8]))
    torch.testing.assert_close(pose, torch.tensor([[-math.pi / 6, 1.0, 0.0, 0.2], [0.0, 0.0, 1.0, 0.0]]),
                               atol=1e-6, rtol=0)


def manual_eps(g, z_t, t, cameras, image):
    """eps(cond), eps(uncond) computed from the loaded modules by hand: CLIP embedding of the input image plus
    the relative pose through the projection, the unscaled VAE mean of the input image as extra channels;
    the unconditional branch zeroes both."""
    import numpy as np

    with torch.no_grad():
        pixels = g.feature_extractor(images=[image.permute(1, 2, 0).numpy()], do_rescale=False,
                                     return_tensors="pt").pixel_values
        clip = g.image_encoder(pixels).image_embeds[:, None]
        image_latents = g.vae.encode(torch.nn.functional.interpolate(
            image[None], size=(32, 32), mode="bilinear", antialias=True) * 2 - 1).latent_dist.mean
        rows = []
        for e, a, d in zip(cameras.elevation_deg.tolist(), cameras.azimuth_deg.tolist(), cameras.distance.tolist()):
            rows.append([math.radians(0.0 - e), math.sin(math.radians(a)), math.cos(math.radians(a)), d - 3.8])
        pose = torch.tensor(np.asarray(rows), dtype=torch.float32)[:, None]
        cond = g.camera_projection(torch.cat([clip.expand(len(rows), -1, -1), pose], -1))
        lat = image_latents.expand(len(rows), -1, -1, -1)
        eps_c = g.unet(torch.cat([z_t, lat], 1), t, encoder_hidden_states=cond).sample
        eps_u = g.unet(torch.cat([z_t, torch.zeros_like(lat)], 1), t, encoder_hidden_states=torch.zeros_like(cond)).sample
    return eps_c, eps_u


def test_sds_gradient_is_w_times_guided_eps_difference(zero123_folder):
    g = load_guidance(zero123_folder, "cpu", seed=0, guidance_scale=3.0)
    torch.manual_seed(4)
    image = torch.rand(3, 32, 32)
    g.set_condition(Condition(image=image, pose=front_pose()))
    cameras = orbit_cameras(3, 32, 32, elevation_deg=30.0, distance=4.0, start_azimuth_deg=20.0)
    renders = torch.rand(3, 3, 32, 32)
    z = g.encode_images(renders).detach().requires_grad_(True)
    t, noise = torch.tensor([30, 400, 950]), torch.randn(3, 4, 8, 8)
    out = g.sds_from_latents(z, *g.text_embeddings(cameras, 3), t=t, noise=noise)
    out.loss.backward()
    ab = g.alphas_cumprod[t].view(3, 1, 1, 1)
    eps_c, eps_u = manual_eps(g, ab.sqrt() * z.detach() + (1 - ab).sqrt() * noise, t, cameras, image)
    assert not torch.allclose(eps_c, eps_u)
    expected = (1 - ab) * (eps_u + 3.0 * (eps_c - eps_u) - noise)
    torch.testing.assert_close(z.grad, expected, rtol=1e-4, atol=1e-5)


def test_sds_gradient_reaches_the_renders_and_depends_on_the_pose(z123):
    torch.manual_seed(5)
    renders = torch.rand(1, 3, 24, 24, requires_grad=True)
    t, noise = torch.tensor([500]), torch.randn(1, 4, 8, 8)
    side = orbit_cameras(1, 24, 24, elevation_deg=0.0, distance=3.8, start_azimuth_deg=90.0)
    back = orbit_cameras(1, 24, 24, elevation_deg=0.0, distance=3.8, start_azimuth_deg=180.0)
    z123(renders, side, t=t, noise=noise).loss.backward()
    g_side = renders.grad.clone()
    renders.grad = None
    z123(renders, back, t=t, noise=noise).loss.backward()
    assert g_side.abs().sum() > 0 and not torch.allclose(g_side, renders.grad)


def test_conditioning_errors(zero123_folder, z123):
    g = load_guidance(zero123_folder, "cpu")
    with pytest.raises(FastDreamError, match="No input image"):
        g(torch.rand(1, 3, 32, 32), front_pose())
    with pytest.raises(FastDreamError, match="needs a reference image"):
        g.set_condition(Condition(prompt="a chair"))
    with pytest.raises(FastDreamError, match="camera pose"):
        g.set_condition(Condition(image=torch.rand(3, 8, 8)))
    with pytest.raises(FastDreamError, match=r"\(3, H, W\)"):
        g.set_condition(Condition(image=torch.rand(4, 8, 8), pose=front_pose()))
    with pytest.raises(FastDreamError, match="cameras"):
        z123(torch.rand(1, 3, 32, 32), None)


def test_camera_projection_layouts(zero123_folder, tmp_path):
    """clip_camera_projection/ (this class) and the community cc_projection/ (a `projection` linear) both load."""
    from safetensors.torch import save_file

    from fastdream.guidance.zero123 import load_camera_projection

    ours = load_camera_projection(str(zero123_folder))
    assert type(ours).__name__ == "CLIPCameraProjection" and ours.proj.in_features == 36
    community = tmp_path / "community"
    shutil.copytree(zero123_folder, community)
    shutil.rmtree(community / "clip_camera_projection")
    (community / "cc_projection").mkdir()
    (community / "cc_projection" / "config.json").write_text(json.dumps({"in_channel": 36, "out_channel": 32}))
    save_file({"projection.weight": ours.proj.weight.detach().clone(), "projection.bias": ours.proj.bias.detach().clone()},
              str(community / "cc_projection" / "diffusion_pytorch_model.safetensors"))
    theirs = load_camera_projection(str(community))
    x = torch.randn(2, 1, 36)
    torch.testing.assert_close(theirs(x), ours(x))
    assert isinstance(load_guidance(community, "cpu"), Zero123Guidance)
    assert issubclass(camera_projection_class(), torch.nn.Module)


def test_missing_component_is_a_clear_error(zero123_folder, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(zero123_folder, broken)
    shutil.rmtree(broken / "image_encoder")
    with pytest.raises(FastDreamError, match="CLIP image encoder"):
        load_guidance(broken, "cpu")


def test_out_of_memory_is_a_clear_error(z123, monkeypatch):
    def boom(images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(z123, "encode_images", boom)
    with pytest.raises(FastDreamError, match="out of memory"):
        z123(torch.rand(1, 3, 32, 32), front_pose())


def test_sds_steps_move_a_render_toward_the_models_view(z123):
    """A few SDS steps on a free image change it (the loop is wired end to end)."""
    old = z123.options
    z123.options = dataclasses.replace(old, guidance_scale=3.0)
    try:
        x = torch.full((1, 3, 32, 32), 0.5, requires_grad=True)
        opt = torch.optim.Adam([x], lr=0.05)
        cams = orbit_cameras(1, 32, 32, elevation_deg=10.0, distance=3.8, start_azimuth_deg=60.0)
        for i in range(3):
            opt.zero_grad()
            z123(x, cams, progress=i / 3).loss.backward()
            opt.step()
        assert (x.detach() - 0.5).abs().max() > 1e-3
    finally:
        z123.options = old
