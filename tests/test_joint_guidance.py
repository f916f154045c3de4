"""Magic123's joint prior: novel-view SDS (tiny Zero-1-to-3) plus weighted text SDS (tiny Stable Diffusion) on the
same renders, built from a run's configuration through the guidance registry. Offline, CPU."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch the hub from tests

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastdream.cameras import orbit_cameras  # noqa: E402
from fastdream.config import RunConfig, apply_overrides  # noqa: E402
from fastdream.errors import FastDreamError  # noqa: E402
from fastdream.guidance import JointGuidance, StableDiffusionGuidance, Zero123Guidance  # noqa: E402
from fastdream.train import build_guidance  # noqa: E402

from tiny_models import make_tiny_sd_pipeline, make_tiny_zero123_pipeline  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return make_tiny_zero123_pipeline(root / "tiny-zero123"), make_tiny_sd_pipeline(root / "tiny-sd")


def image_config(models, *sets, prompt="an orange box"):
    zero123, sd = models
    config = apply_overrides(RunConfig(), [f"guidance.model={zero123}", "guidance.kind=zero123",
                                           "guidance.guidance_scale=3", f"image.text_guidance_model={sd}",
                                           "image.path=photo.png", *sets])
    config.prompt = prompt
    return config.validate()


def input_view():
    """What the trainer hands build_guidance: (photo, its camera); the photo has an `on_background`."""
    torch.manual_seed(0)
    rgb = torch.rand(3, 32, 32)

    class Photo:
        def on_background(self, colour):
            return rgb

    return Photo(), orbit_cameras(1, 32, 32, elevation_deg=0.0, distance=3.8, fov_y_deg=20.0)


def test_weight_zero_never_loads_the_text_model(models):
    # a text model that does not exist: loading it would fail, so at weight 0 it is never touched
    config = image_config(models, "image.text_guidance_model=/nonexistent/sd-folder")
    guidance = build_guidance(config, torch.device("cpu"), input_view())
    assert isinstance(guidance, Zero123Guidance)
    config = image_config(models, "image.text_guidance_model=/nonexistent/sd-folder", "image.text_guidance_weight=0.5")
    with pytest.raises(FastDreamError, match="text guidance of this image-to-3D run.*does not exist"):
        build_guidance(config, torch.device("cpu"), input_view())


def test_the_joint_gradient_is_zero123s_plus_w_times_sds(models):
    w = 0.25
    config = image_config(models, f"image.text_guidance_weight={w}", "image.text_guidance_scale=7.5")
    joint = build_guidance(config, torch.device("cpu"), input_view())
    assert isinstance(joint, JointGuidance) and [name for name, _, _ in joint.members] == ["zero123", "text"]
    (_, zero123, w0), (_, text, w1) = joint.members
    assert isinstance(zero123, Zero123Guidance) and isinstance(text, StableDiffusionGuidance)
    # each model keeps its own CFG scale, the same timestep range, its own generator
    assert (w0, w1) == (1.0, w) and zero123.options.guidance_scale == 3.0 and text.options.guidance_scale == 7.5
    assert text.prompt == "an orange box" and text.options.view_dependent and not zero123.options.view_dependent
    assert zero123.generator is not text.generator

    torch.manual_seed(3)
    cameras = orbit_cameras(2, 24, 24, elevation_deg=20.0, distance=3.8, start_azimuth_deg=40.0)
    renders = torch.rand(2, 3, 24, 24)
    t = {"zero123": torch.tensor([200, 700]), "text": torch.tensor([500, 90])}
    noise = {"zero123": torch.randn(2, 4, 8, 8), "text": torch.randn(2, 4, 8, 8)}

    def grad(fn):
        x = renders.clone().requires_grad_(True)
        out = fn(x)
        out.loss.backward()
        return x.grad, out

    g_joint, out = grad(lambda x: joint(x, cameras, "albedo", 0.3, t=t, noise=noise))
    g_z, out_z = grad(lambda x: zero123(x, cameras, "albedo", 0.3, t=t["zero123"], noise=noise["zero123"]))
    g_sd, out_sd = grad(lambda x: text(x, cameras, "albedo", 0.3, t=t["text"], noise=noise["text"]))
    assert g_z.abs().sum() > 0 and g_sd.abs().sum() > 0
    torch.testing.assert_close(g_joint, g_z + w * g_sd, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(out.loss, out_z.loss + w * out_sd.loss)
    assert torch.equal(out.t, t["zero123"]) and set(out.parts) == {"zero123", "text"}
    # with random draws each model uses its own generator: seeded from the run's seed, reproducible
    a = joint(renders, cameras, "albedo", 0.3).loss
    b = build_guidance(config, torch.device("cpu"), input_view())(renders, cameras, "albedo", 0.3).loss
    assert torch.equal(a, b)


def test_a_text_weight_needs_a_prompt_and_a_photo(models):
    with pytest.raises(FastDreamError, match="no prompt"):
        image_config(models, "image.text_guidance_weight=0.025", prompt="")
    with pytest.raises(FastDreamError, match="needs --image"):
        config = apply_overrides(RunConfig(), ["image.text_guidance_weight=0.025"])
        config.prompt = "a chair"
        config.validate()
    with pytest.raises(FastDreamError, match="image.text_guidance_weight"):
        image_config(models, "image.text_guidance_weight=-1")


def test_missing_text_model_offline_is_a_clear_error(models):
    config = image_config(models, "image.text_guidance_weight=0.025",
                          "image.text_guidance_model=fastdream-tests/not-a-cached-model")
    with pytest.raises(FastDreamError) as info:
        build_guidance(config, torch.device("cpu"), input_view())
    message = str(info.value)
    assert "not in the local Hugging Face cache" in message and "HF_HUB_OFFLINE" in message
    assert "fastdream-tests/not-a-cached-model" in message and "image.text_guidance_weight=0" in message


def test_the_text_model_must_be_a_text_model(models):
    zero123, _ = models
    config = image_config(models, "image.text_guidance_weight=0.025", f"image.text_guidance_model={zero123}")
    with pytest.raises(FastDreamError, match="not a text-to-image model"):
        build_guidance(config, torch.device("cpu"), input_view())
