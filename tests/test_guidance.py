"""SDS guidance on tiny random diffusers pipelines: offline, CPU, seconds."""
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # never touch the hub from tests

import dataclasses
import math
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from fastdream.errors import FastDreamError  # noqa: E402
from fastdream.guidance import (DeepFloydIFGuidance, GuidanceOptions, StableDiffusionGuidance,  # noqa: E402
                                load_guidance, view_index, view_name, view_prompt, view_weights)

from tiny_models import make_tiny_if_pipeline, make_tiny_sd_pipeline  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cams(elev, azim):
    return SimpleNamespace(elevation_deg=torch.tensor(elev, dtype=torch.float32),
                           azimuth_deg=torch.tensor(azim, dtype=torch.float32))


@pytest.fixture(scope="session")
def sd_folder(tmp_path_factory):
    return make_tiny_sd_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def if_folder(tmp_path_factory):
    return make_tiny_if_pipeline(tmp_path_factory.mktemp("models") / "tiny-if")


@pytest.fixture(scope="module")
def sd(sd_folder):
    g = load_guidance(str(sd_folder), "cpu", seed=0)
    g.set_prompt("a chair")
    return g


@pytest.fixture(scope="module")
def deepfloyd(if_folder):
    g = load_guidance(if_folder, "cpu", seed=0)
    g.set_prompt("a chair")
    return g


def manual_eps(g, z_t, t, cond, uncond):
    with torch.no_grad():
        eps_c = g.predict_noise(z_t, t, cond).float()
        eps_u = g.predict_noise(z_t, t, uncond).float()
    return eps_c, eps_u


# ---------------------------------------------------------------------------- package hygiene
def test_import_fastdream_does_not_import_diffusers():
    code = ("import sys, fastdream, fastdream.guidance; "
            "bad = [m for m in ('diffusers', 'transformers', 'huggingface_hub') if m in sys.modules]; "
            "assert not bad, bad")
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO)


def test_options_validation():
    assert GuidanceOptions().guidance_scale == 100 and GuidanceOptions().weighting == "sds"
    with pytest.raises(FastDreamError, match="Unknown guidance option"):
        GuidanceOptions.from_kwargs(guidance_scal=3)
    with pytest.raises(FastDreamError, match="weighting"):
        GuidanceOptions.from_kwargs(weighting="nope")
    with pytest.raises(FastDreamError, match="t_min"):
        GuidanceOptions.from_kwargs(t_min=0.9, t_max=0.5)
    o = GuidanceOptions.from_kwargs(GuidanceOptions(guidance_scale=7.5), t_max_end=0.5)
    assert o.guidance_scale == 7.5 and o.t_max_end == 0.5
    # flat, simple types only (embedded in the training config): scalars and tuples of numbers
    for f in dataclasses.fields(GuidanceOptions):
        value = getattr(GuidanceOptions(), f.name)
        assert isinstance(value, (int, float, str, bool, type(None))) or (
            isinstance(value, tuple) and all(isinstance(v, (int, float)) for v in value)), f.name


# ---------------------------------------------------------------------------- views
@pytest.mark.parametrize("elev,azim,view", [
    (0, 0, "front"), (10, 30, "front"), (0, 45, "front"), (0, 315, "front"), (0, -20, "front"),
    (0, 46, "side"), (0, 90, "side"), (30, 270, "side"), (0, 134, "side"),
    (0, 135, "back"), (0, 180, "back"), (-10, 200, "back"), (0, 540, "back"),
    (61, 0, "overhead"), (89, 180, "overhead"), (60, 0, "front"),
])
def test_view_selection(elev, azim, view):
    assert view_name(elev, azim) == view


def test_view_thresholds_configurable_and_batched():
    idx = view_index(torch.tensor([0.0, 0.0, 50.0]), torch.tensor([40.0, 170.0, 90.0]),
                     front_deg=30, back_deg=5, overhead_deg=45)
    assert idx.tolist() == [1, 1, 3]
    assert view_prompt("a chair", "back") == "a chair, back view"


def test_view_weights():
    w = view_weights(torch.tensor([0.0, 0.0, 0.0, 0.0, 75.0, 90.0]),
                     torch.tensor([0.0, 45.0, 90.0, 180.0, 0.0, 123.0]))
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    torch.testing.assert_close(w[0], torch.tensor([1.0, 0, 0, 0]))
    torch.testing.assert_close(w[1], torch.tensor([0.5, 0.5, 0, 0]))
    torch.testing.assert_close(w[2], torch.tensor([0.0, 1, 0, 0]))
    torch.testing.assert_close(w[3], torch.tensor([0.0, 0, 1, 0]))
    torch.testing.assert_close(w[4], torch.tensor([0.0, 0, 0, 1]))  # the paper: overhead at once above 60 degrees
    assert w[5, 3] == 1
    ramp = view_weights(torch.tensor([60.0, 75.0]), torch.tensor([0.0, 0.0]), overhead_ramp=True)
    torch.testing.assert_close(ramp, torch.tensor([[1.0, 0, 0, 0], [0.5, 0, 0, 0.5]]))


@pytest.mark.parametrize("ramp", [False, True])
def test_view_blend_lookup_equals_the_weighted_sum(ramp):
    """The per-step blend (one grid_sample in a table of the view embeddings) is view_weights @ embeddings, for
    any azimuth (wrapped) and elevation, the overhead threshold included; within 1e-6 of the embeddings' scale."""
    from fastdream.guidance.prompts import blend_views, view_blend_table

    g = torch.Generator().manual_seed(0)
    views = torch.randn(4, 7, 5, generator=g)
    azimuth = torch.cat([torch.rand(500, generator=g) * 1080 - 540, torch.tensor([0.0, 45, 90, 180, -180, -90, 360, 721])])
    elevation = torch.cat([torch.rand(500, generator=g) * 180 - 90, torch.tensor([0.0, 60, 60.001, 75, 90, 59.999, -5, 61])])
    expected = (view_weights(elevation, azimuth, overhead_ramp=ramp) @ views.flatten(1)).view(-1, 7, 5)
    got = blend_views(view_blend_table(views), elevation, azimuth, overhead_ramp=ramp)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 * float(views.abs().max()))
    if not ramp:  # above the threshold: the overhead embedding itself
        assert torch.equal(got[-1], views[3]) and torch.equal(got[-6], views[3])


def test_default_view_rule_is_the_papers(sd):
    """Blend front/side/back by azimuth, switch hard to overhead above 60 degrees of elevation."""
    assert GuidanceOptions().view_selection == "paper" and sd.options.view_selection == "paper"
    cond, _ = sd.text_embeddings(cams([0.0, 59.0, 61.0, 10.0], [30.0, 135.0, 30.0, 180.0]), 4)
    front, side, back, overhead = sd.embed_texts(["a chair, front view", "a chair, side view", "a chair, back view",
                                                  "a chair, overhead view"])
    torch.testing.assert_close(cond[0], (2 / 3) * front + (1 / 3) * side)
    torch.testing.assert_close(cond[1], 0.5 * side + 0.5 * back)
    torch.testing.assert_close(cond[2], overhead, rtol=0, atol=0)
    torch.testing.assert_close(cond[3], back)


def test_per_camera_embeddings(sd):
    old = sd.options
    sd.options = dataclasses.replace(old, view_selection="hard")
    try:
        cond, uncond = sd.text_embeddings(cams([0.0, 0.0, 0.0, 80.0], [10.0, 90.0, 180.0, 0.0]), 4)
    finally:
        sd.options = old
    expected = sd.embed_texts(["a chair, front view", "a chair, side view", "a chair, back view",
                               "a chair, overhead view"])
    torch.testing.assert_close(cond, expected, rtol=0, atol=0)
    torch.testing.assert_close(uncond, sd.embed_texts([""]).expand(4, -1, -1), rtol=0, atol=0)
    assert not torch.equal(cond[0], cond[1])


def test_interpolated_embeddings(sd):
    old = sd.options
    try:
        sd.options = dataclasses.replace(old, view_selection="interpolate")
        cond, _ = sd.text_embeddings(cams([0.0, 75.0], [45.0, 0.0]), 2)
        front, side, overhead = sd.embed_texts(["a chair, front view", "a chair, side view", "a chair, overhead view"])
        torch.testing.assert_close(cond[0], 0.5 * front + 0.5 * side)
        torch.testing.assert_close(cond[1], 0.5 * front + 0.5 * overhead)
    finally:
        sd.options = old


def test_embeddings_cached_text_encoder_runs_once_per_text(sd_folder):
    g = load_guidance(sd_folder, "cpu", seed=0)
    encoded = []
    g.text_encoder.register_forward_hook(lambda m, args, out: encoded.append(args[0].shape[0]))
    g.set_prompt("a chair")
    assert encoded == [5]  # 4 view prompts + empty negative prompt, one batched call
    g.set_prompt("a chair")
    assert encoded == [5]
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    for _ in range(3):
        g(x, cams([0.0, 70.0], [0.0, 100.0]), "albedo", 0.5)
    assert encoded == [5]  # steps never run the text encoder
    g.set_prompt("a table", negative_prompt="blurry")
    assert encoded == [5, 5]
    g.set_prompt("a chair", negative_prompt="blurry")
    assert encoded == [5, 5]
    assert g.negative_prompt == "blurry"


def test_view_independent_prompt(sd_folder):
    g = load_guidance(sd_folder, "cpu", view_dependent=False, seed=0)
    g.set_prompt("a chair")
    cond, _ = g.text_embeddings(cams([0.0, 80.0], [0.0, 180.0]), 2)
    torch.testing.assert_close(cond, g.embed_texts(["a chair", "a chair"]), rtol=0, atol=0)


def test_prompt_errors(sd_folder):
    g = load_guidance(sd_folder, "cpu")
    with pytest.raises(FastDreamError, match="No prompt set"):
        g(torch.rand(1, 3, 32, 32), None, "albedo", 0.0)
    for bad in ("", "   ", None):
        with pytest.raises(FastDreamError, match="prompt is empty"):
            g.set_prompt(bad)


def test_prompts_too_long_for_the_text_encoder_are_warned_about(sd, deepfloyd, caplog):
    """The tiny tokenizers read 16 tokens (CLIP in SD reads 77): a longer prompt is cut, and the user is told."""
    for g in (sd, deepfloyd):
        with caplog.at_level("WARNING", logger="fastdream"):
            caplog.clear()
            g.set_prompt("cup")
            assert "tokens long" not in caplog.text
            g.set_prompt("a " + "very " * 30 + "tall chair")
        assert "tokens long" in caplog.text and "reads only 16" in caplog.text, type(g).__name__
        g.set_prompt("a chair")


# ---------------------------------------------------------------------------- SDS maths
def test_timesteps_and_annealing(sd):
    assert sd.timestep_range(0.0) == (20, 980)
    t = sd.sample_timesteps(4096, 0.3)
    assert t.dtype == torch.long and t.shape == (4096,)
    assert int(t.min()) >= 20 and int(t.max()) <= 980 and int(t.max()) > 900
    old = sd.options
    try:
        sd.options = dataclasses.replace(old, t_max_end=0.5)
        assert sd.timestep_range(0.0) == (20, 980)
        assert sd.timestep_range(0.5) == (20, 740)
        assert sd.timestep_range(1.0) == (20, 500)
        sd.options = dataclasses.replace(old, t_max_end=0.5, t_anneal="sqrt")
        assert sd.timestep_range(0.25) == (20, 740)
        # both bounds on a schedule
        sd.options = dataclasses.replace(old, t_min_end=0.2, t_max_end=0.5)
        assert sd.timestep_range(0.0) == (20, 980)
        assert sd.timestep_range(0.5) == (110, 740)
        assert sd.timestep_range(1.0) == (200, 500)
        t = sd.sample_timesteps(4096, 1.0)
        assert int(t.min()) >= 200 and int(t.max()) <= 500
    finally:
        sd.options = old
    with pytest.raises(FastDreamError, match="t_min_end"):
        GuidanceOptions(t_min_end=0.6, t_max_end=0.5).validate()


@pytest.mark.parametrize("weighting", ["sds", "uniform", "sqrt_alpha_sigma"])
def test_sds_gradient_on_latents_equals_w_times_eps_difference(sd, weighting):
    old = sd.options
    sd.options = dataclasses.replace(old, weighting=weighting, guidance_scale=7.5)
    try:
        torch.manual_seed(1)
        images = torch.rand(3, 3, 40, 24)
        c = cams([0.0, 20.0, 75.0], [0.0, 180.0, 90.0])
        z = sd.encode_images(images).detach().requires_grad_(True)
        assert z.shape == (3, 4, 8, 8)
        t = torch.tensor([20, 500, 980])
        noise = torch.randn(z.shape)
        cond, uncond = sd.text_embeddings(c, 3)
        out = sd.sds_from_latents(z, cond, uncond, t=t, noise=noise)
        out.loss.backward()

        ab = sd.alphas_cumprod[t].view(3, 1, 1, 1)
        z_t = ab.sqrt() * z.detach() + (1 - ab).sqrt() * noise
        eps_c, eps_u = manual_eps(sd, z_t, t, cond, uncond)
        eps_hat = eps_u + 7.5 * (eps_c - eps_u)
        w = {"sds": 1 - ab, "uniform": torch.ones_like(ab), "sqrt_alpha_sigma": ab.sqrt() * (1 - ab).sqrt()}[weighting]
        expected = w * (eps_hat - noise)
        # the batch is averaged: each of the 3 images gets a third of its own SDS gradient
        torch.testing.assert_close(z.grad, expected / 3, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.loss.detach(), 0.5 * expected.pow(2).sum() / 3, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.grad_norm, expected.norm(), rtol=1e-5, atol=1e-5)
        assert out.t.tolist() == [20, 500, 980] and int(out.n_nonfinite) == 0
    finally:
        sd.options = old


def test_sds_gradient_flows_through_vae_encoder_to_images(sd):
    torch.manual_seed(2)
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    c = cams([0.0, 0.0], [0.0, 90.0])
    t = torch.tensor([100, 700])
    noise = torch.randn(2, 4, 8, 8)
    out = sd(images, c, "lambertian", 0.1, t=t, noise=noise)
    out.loss.backward()
    # the same step on latents, then the encoder's vector-Jacobian product by hand
    x = images.detach().requires_grad_(True)
    z = sd.encode_images(x)
    zl = z.detach().requires_grad_(True)
    sd.sds_from_latents(zl, *sd.text_embeddings(c, 2), t=t, noise=noise).loss.backward()
    (expected,) = torch.autograd.grad(z, x, zl.grad)
    torch.testing.assert_close(images.grad, expected, rtol=1e-5, atol=1e-7)
    assert images.grad.abs().sum() > 0


def test_cfg_mixes_cond_and_uncond_with_scale(sd):
    torch.manual_seed(3)
    z_t = torch.randn(2, 4, 8, 8)
    t = torch.tensor([300, 600])
    cond, uncond = sd.text_embeddings(cams([0.0, 0.0], [0.0, 180.0]), 2)
    eps_c, eps_u = manual_eps(sd, z_t, t, cond, uncond)
    assert not torch.allclose(eps_c, eps_u)
    old = sd.options
    try:
        for s in (0.0, 1.0, 100.0):
            sd.options = dataclasses.replace(old, guidance_scale=s)
            eps_hat, c_out, u_out = sd.guided_noise(z_t, t, cond, uncond)
            torch.testing.assert_close(c_out, eps_c, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(u_out, eps_u, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(eps_hat, eps_u + s * (eps_c - eps_u), rtol=1e-4, atol=2e-5 * max(1.0, s))
    finally:
        sd.options = old


def test_nonfinite_gradient_zeroed_and_counted(sd_folder):
    g = load_guidance(sd_folder, "cpu", seed=0, nonfinite_check_every=1)
    g.set_prompt("a chair")
    real = g.predict_noise

    def poisoned(z_t, t, emb):
        eps = real(z_t, t, emb).clone()
        eps[0, 0, 0, :3] = float("nan")  # first (uncond) half: 3 entries of image 0
        eps[0, 1, 2, 2] = float("inf")
        return eps

    g.predict_noise = poisoned
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        out = g(x, cams([0.0, 0.0], [0.0, 0.0]), "albedo", 0.5)
    out.loss.backward()
    assert int(out.n_nonfinite) == 4
    assert torch.isfinite(x.grad).all() and torch.isfinite(out.grad_norm)
    assert g.report_nonfinite() == 4


def test_grad_clip(sd_folder):
    g = load_guidance(sd_folder, "cpu", seed=0, grad_clip=0.01, weighting="uniform")
    g.set_prompt("a chair")
    z = torch.randn(1, 4, 8, 8, requires_grad=True)
    g.sds_from_latents(z, *g.text_embeddings(None, 1), t=torch.tensor([500])).loss.backward()
    assert z.grad.abs().max() <= 0.01 + 1e-7


def test_oom_becomes_clear_error(sd, monkeypatch):
    def boom(images):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(sd, "encode_images", boom)
    with pytest.raises(FastDreamError) as info:
        sd(torch.rand(1, 3, 64, 64), None, "albedo", 0.0)
    msg = str(info.value)
    assert "out of memory" in msg and "batch size" in msg and "latent_mode='linear'" in msg
    assert "float16" in msg and "attention" in msg


# ---------------------------------------------------------------------------- optimisation
@pytest.mark.parametrize("which", ["sd", "sd-linear", "if"])
def test_sds_steps_change_a_learnable_image(which, sd_folder, if_folder):
    folder = if_folder if which == "if" else sd_folder
    extra = {"latent_mode": "linear"} if which == "sd-linear" else {}
    g = load_guidance(folder, "cpu", seed=0, **extra)
    g.set_prompt("a red chair")
    torch.manual_seed(0)
    gen = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.SiLU(), torch.nn.Conv2d(8, 3, 1))
    base = torch.nn.Parameter(torch.zeros(1, 3, 64, 64))
    params = [base, *gen.parameters()]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.Adam(params, lr=1e-2)
    for step in range(4):
        images = torch.sigmoid(base + gen(base + 0.1)).expand(2, -1, -1, -1)
        out = g(images, cams([15.0, 70.0], [step * 90.0, 30.0]), "albedo", step / 4)
        opt.zero_grad()
        out.loss.backward()
        assert torch.isfinite(out.loss) and int(out.n_nonfinite) == 0
        assert all(torch.isfinite(p.grad).all() for p in params)
        opt.step()
    assert all(not torch.equal(a, p.detach()) for a, p in zip(before, params))
    assert all(torch.isfinite(p).all() for p in params)


# ---------------------------------------------------------------------------- loading
def test_factory_chooses_model_family(sd, deepfloyd):
    assert isinstance(sd, StableDiffusionGuidance) and sd.resolution == 32 and sd.dtype == torch.float32
    assert isinstance(deepfloyd, DeepFloydIFGuidance) and deepfloyd.resolution == 16
    assert sd.attention == "sdpa"  # auto on CPU
    assert all(not p.requires_grad for p in sd.unet.parameters())


def test_deepfloyd_sds_uses_noise_half_of_unet_output(deepfloyd):
    g = deepfloyd
    torch.manual_seed(4)
    z = (torch.rand(2, 3, 16, 16) * 2 - 1).requires_grad_(True)
    t = torch.tensor([50, 900])
    noise = torch.randn(z.shape)
    cond, uncond = g.text_embeddings(cams([0.0, 0.0], [0.0, 90.0]), 2)
    g.sds_from_latents(z, cond, uncond, t=t, noise=noise).loss.backward()
    ab = g.alphas_cumprod[t].view(2, 1, 1, 1)
    z_t = ab.sqrt() * z.detach() + (1 - ab).sqrt() * noise
    with torch.no_grad():
        full_c = g.unet(z_t, t, encoder_hidden_states=cond).sample
        full_u = g.unet(z_t, t, encoder_hidden_states=uncond).sample
    assert full_c.shape[1] == 6
    eps_hat = full_u[:, :3] + 100 * (full_c[:, :3] - full_u[:, :3])
    torch.testing.assert_close(z.grad, (1 - ab) * (eps_hat - noise) / 2, rtol=1e-4, atol=1e-3)  # scale 100, batch mean


def test_attention_backends_agree(sd_folder):
    x = torch.rand(1, 3, 32, 32)
    outs = []
    for backend in ("sdpa", "math"):
        g = load_guidance(sd_folder, "cpu", attention=backend, seed=0)
        assert g.attention == backend
        g.set_prompt("a chair")
        outs.append(g(x, None, "albedo", 0.0, t=torch.tensor([400]), noise=torch.ones(1, 4, 8, 8)).grad_norm)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-4, atol=1e-4)
    with pytest.raises(FastDreamError, match="xformers"):
        load_guidance(sd_folder, "cpu", attention="xformers")


def test_offline_hub_id_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FastDreamError) as info:
        load_guidance("fastdream-tests/no-such-model", "cpu")
    msg = str(info.value)
    assert "fastdream-tests/no-such-model" in msg and "HF_HUB_OFFLINE" in msg
    assert "local" in msg and "Download" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__


def test_missing_folder_error(tmp_path):
    for missing in (str(tmp_path / "no" / "such-folder"), "./not-here-sd"):
        with pytest.raises(FastDreamError, match="does not exist") as info:
            load_guidance(missing, "cpu")
        assert info.value.__suppress_context__ or info.value.__cause__ is None


def test_not_a_pipeline_folder_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FastDreamError, match="not a diffusers pipeline"):
        load_guidance(tmp_path / "empty", "cpu")


def test_incomplete_folder_error(sd_folder, tmp_path):
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(sd_folder, broken)
    shutil.rmtree(broken / "unet")
    (broken / "unet").mkdir()
    with pytest.raises(FastDreamError, match="Could not load the UNet"):
        load_guidance(broken, "cpu")


def test_bad_device_and_dtype(sd_folder):
    with pytest.raises(FastDreamError, match="float16"):
        load_guidance(sd_folder, "cpu", dtype="fp16")
    with pytest.raises(FastDreamError, match="dtype"):
        load_guidance(sd_folder, "cpu", dtype="int8")
    if not torch.cuda.is_available():
        with pytest.raises(FastDreamError, match="CUDA"):
            load_guidance(sd_folder, "cuda")


# ---------------------------------------------------------------------------- prediction types, batch, precision
@pytest.fixture(scope="module")
def sd_v_folder(sd_folder, tmp_path_factory):
    """The tiny SD pipeline with its scheduler switched to v-prediction (as stable-diffusion-2-1, 768 px)."""
    import json
    import shutil

    folder = tmp_path_factory.mktemp("models") / "tiny-sd-v"
    shutil.copytree(sd_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(path.read_text())
    config["prediction_type"] = "v_prediction"
    path.write_text(json.dumps(config))
    return folder


def test_v_prediction_model_is_converted_to_epsilon(sd_v_folder):
    g = load_guidance(str(sd_v_folder), "cpu", seed=0, guidance_scale=7.5)
    assert g.prediction_type == "v_prediction"
    g.set_prompt("a chair")
    torch.manual_seed(5)
    z = torch.randn(2, 4, 8, 8, requires_grad=True)
    t = torch.tensor([100, 800])
    noise = torch.randn(z.shape)
    cond, uncond = g.text_embeddings(cams([0.0, 0.0], [0.0, 90.0]), 2)
    g.sds_from_latents(z, cond, uncond, t=t, noise=noise).loss.backward()
    ab = g.alphas_cumprod[t].view(2, 1, 1, 1)
    z_t = ab.sqrt() * z.detach() + (1 - ab).sqrt() * noise
    v_c, v_u = manual_eps(g, z_t, t, cond, uncond)  # the UNet's raw outputs are v
    eps_c, eps_u = ab.sqrt() * v_c + (1 - ab).sqrt() * z_t, ab.sqrt() * v_u + (1 - ab).sqrt() * z_t
    eps_hat = eps_u + 7.5 * (eps_c - eps_u)
    torch.testing.assert_close(z.grad, (1 - ab) * (eps_hat - noise) / 2, rtol=1e-5, atol=1e-5)
    # and it is not the gradient of the same outputs read as noise
    wrong = (1 - ab) * (v_u + 7.5 * (v_c - v_u) - noise) / 2
    assert (z.grad - wrong).abs().max() > 1e-2


def test_unsupported_prediction_type_is_refused(sd_v_folder, tmp_path):
    import json
    import shutil

    folder = tmp_path / "tiny-sd-sample"
    shutil.copytree(sd_v_folder, folder)
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": "sample"}))
    with pytest.raises(FastDreamError, match="'sample'.*epsilon.*v_prediction"):
        load_guidance(str(folder), "cpu")


def test_sds_over_a_batch_is_the_mean(sd):
    """Two copies of one image (same t and noise) give the single image's loss and half its gradient each."""
    torch.manual_seed(6)
    z1 = torch.randn(1, 4, 8, 8)
    noise1 = torch.randn(1, 4, 8, 8)
    t1 = torch.tensor([400])
    c1 = sd.text_embeddings(cams([0.0], [0.0]), 1)
    one = z1.clone().requires_grad_(True)
    out1 = sd.sds_from_latents(one, *c1, t=t1, noise=noise1)
    out1.loss.backward()
    two = z1.repeat(2, 1, 1, 1).requires_grad_(True)
    out2 = sd.sds_from_latents(two, *sd.text_embeddings(cams([0.0, 0.0], [0.0, 0.0]), 2), t=t1.repeat(2),
                               noise=noise1.repeat(2, 1, 1, 1))
    out2.loss.backward()
    torch.testing.assert_close(out2.loss, out1.loss, rtol=1e-5, atol=1e-6)
    # (the batched UNet call rounds differently; the old summed gradient would be twice as large)
    torch.testing.assert_close(two.grad, 0.5 * one.grad.repeat(2, 1, 1, 1), rtol=1e-3, atol=1e-4)


def test_deepfloyd_sds_arithmetic_is_float32_under_half_precision(if_folder):
    """The pixel gradient is computed in float32 (only the UNet runs in half precision), as for SD."""
    g = load_guidance(if_folder, "cpu", dtype="bfloat16", seed=0, guidance_scale=10.0)
    g.set_prompt("a chair")
    torch.manual_seed(7)
    images = torch.rand(1, 3, 16, 16, requires_grad=True)
    z = g.encode_images(images)
    assert z.dtype == torch.float32
    t, noise = torch.tensor([300]), torch.randn(1, 3, 16, 16)
    c = cams([0.0], [0.0])
    g(images, c, t=t, noise=noise).loss.backward()
    ab = g.alphas_cumprod[t].view(1, 1, 1, 1)
    z32 = images.detach() * 2 - 1
    z_t = ab.sqrt() * z32 + (1 - ab).sqrt() * noise
    eps_hat, _, _ = g.guided_noise(z_t.to(torch.bfloat16), t, *g.text_embeddings(c, 1))
    expected = 2.0 * (1 - ab) * (eps_hat - noise)  # d z / d images = 2
    torch.testing.assert_close(images.grad, expected, rtol=1e-6, atol=1e-7)
    assert not torch.equal(expected.to(torch.bfloat16).float(), expected)  # half precision would round it


# ---------------------------------------------------------------------------- registry
def test_builtin_families_are_registered_with_their_defaults():
    from fastdream.guidance import registry

    assert registry.names() == ("sd", "if", "reference", "zero123")
    assert registry.default_model("sd") == "stabilityai/stable-diffusion-2-1-base"
    assert registry.default_model("if") == "DeepFloyd/IF-I-XL-v1.0"
    assert not registry.get("reference").needs_model
    assert registry.default_model("zero123") == "bennyguo/zero123-xl-diffusers"
    with pytest.raises(FastDreamError, match="Unknown guidance 'zero124'"):
        registry.get("zero124")
    with pytest.raises(FastDreamError, match="IFSuperResolutionPipeline"):
        registry.detect("IFSuperResolutionPipeline", None, "x")
    with pytest.raises(FastDreamError, match="supports"):
        registry.detect("KandinskyPipeline", None, "x")


def test_a_new_family_is_one_registration(monkeypatch, sd_folder, tmp_path):
    """Registering a family makes it a --guidance choice, a valid guidance.kind, a detectable model folder and a
    buildable guidance; nothing else is edited."""
    import json

    from fastdream.cli import build_parser
    from fastdream.config import RunConfig
    from fastdream.guidance import Condition, GuidanceFamily, build_guidance, load_guidance, registry
    from fastdream.train import build_guidance as run_guidance

    made = []

    class ImageConditioned(StableDiffusionGuidance):  # reads a reference image and its pose, and the text
        conditioning = ("text", "image", "pose")

    def create(source, *, device, dtype, options, **context):
        made.append((source, context))
        g = load_guidance(sd_folder, device, seed=0)
        g.__class__ = ImageConditioned
        return g

    folder = tmp_path / "novelview-model"  # a model folder of the new family: its model_index.json names it
    folder.mkdir()
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "NovelViewPipeline"}))
    family = GuidanceFamily(name="novelview", description="an image-conditioned test family", create=create,
                            default_model=str(folder), recognise=lambda cls, unet: cls == "NovelViewPipeline",
                            conditioning=("text", "image", "pose"))
    monkeypatch.setitem(registry._FAMILIES, "novelview", family)

    assert build_parser().parse_args(["run", "x", "--guidance", "novelview"]).guidance == "novelview"
    config = RunConfig(prompt="a chair")
    config.guidance.kind = "novelview"
    config.validate()
    assert config.model == str(folder)
    g = build_guidance("novelview", "", "cpu")
    assert isinstance(g, ImageConditioned) and made[-1][0] == str(folder)
    assert isinstance(load_guidance(folder, "cpu"), ImageConditioned)  # found from the folder alone
    assert isinstance(build_guidance("novelview", str(sd_folder), "cpu"), StableDiffusionGuidance)  # the folder wins
    # an image-conditioned family refuses a text-only condition, which is what a text run gives it
    with pytest.raises(FastDreamError, match="needs a reference image"):
        run_guidance(config, torch.device("cpu"))
    g.set_condition(Condition(prompt="a chair", image=torch.zeros(3, 8, 8)))
    assert g.prompt == "a chair"


def test_text_guidance_refuses_an_image_condition(sd):
    from fastdream.guidance import Condition

    with pytest.raises(FastDreamError, match="text only"):
        sd.set_condition(Condition(prompt="a chair", image=torch.zeros(3, 8, 8)))
    sd.set_condition(Condition(prompt="a chair"))
    assert sd.prompt == "a chair"


@pytest.fixture
def no_network_hub(monkeypatch, tmp_path):
    """A hub that cannot be reached (HF_HUB_OFFLINE unset), an empty cache in tmp_path, and a trap on downloads."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))

    def no_download(*args, **kwargs):
        raise AssertionError("the hub client was called (it would retry for half a minute)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_download)
    return tmp_path / "hub-cache"


def test_without_network_an_uncached_model_fails_at_once(no_network_hub, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FastDreamError, match="cannot be reached") as info:
        load_guidance("fastdream-tests/not-cached", "cpu")
    assert "not in the local Hugging Face cache" in str(info.value) and "huggingface-cli download" in str(info.value)


def test_a_cached_model_loads_without_network(no_network_hub, sd_folder):
    import shutil

    from fastdream.guidance import resolve_model

    repo = no_network_hub / "models--fastdream-tests--tiny-sd"
    shutil.copytree(sd_folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")
    source, index, is_local = resolve_model("fastdream-tests/tiny-sd")
    assert is_local and source == str(repo / "snapshots" / "0123abcd") and index["_class_name"] == "StableDiffusionPipeline"
    g = load_guidance("fastdream-tests/tiny-sd", "cpu", seed=0)
    g.set_prompt("a chair")
    # an incomplete snapshot (no UNet weights) is not used as if it were complete
    for weights in (repo / "snapshots" / "0123abcd" / "unet").glob("diffusion_pytorch_model*"):
        weights.unlink()
    with pytest.raises(FastDreamError, match="cannot be reached"):
        resolve_model("fastdream-tests/tiny-sd")


def test_hub_warnings_are_printed_once():
    code = ("import logging, huggingface_hub.utils._http; from fastdream.cli import main; main([]); "
            "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                          env={**os.environ, "PYTHONPATH": REPO})
    assert done.stderr.count("Retrying in 1s") == 1, done.stderr


def test_fp16_on_cuda_runs_without_autocast():
    """fp16/bf16 networks get their inputs in their dtype; autocast (float32 norms, casts back) stays off on CUDA.
    Checked on the chosen code path (no GPU here): the context the guidance enters for a CUDA fp16 model."""
    import warnings

    g = object.__new__(StableDiffusionGuidance)
    for device, dtype in (("cuda", torch.float16), ("cuda", torch.bfloat16), ("cpu", torch.float32)):
        g.device, g.dtype = torch.device(device), dtype
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "CUDA is not available" on a CPU-only machine
            ctx = g._autocast()
        assert ctx.device == device and not ctx._enabled


def test_latent_warmup_skips_the_vae_and_reaches_the_field(sd_folder, monkeypatch):
    """latent_warmup: before that fraction of training the render's RGB + opacity are the latent (the VAE
    encoder is never called) and the SDS gradient still reaches the field; after it the VAE encodes."""
    from fastdream.renderer import build_renderer
    from fastdream.field import FieldConfig
    from fastdream.cameras import orbit_cameras

    g = load_guidance(sd_folder, "cpu", seed=0, latent_warmup=0.25)
    g.set_prompt("a chair")
    calls = []
    encode = g.vae.encode
    monkeypatch.setattr(g.vae, "encode", lambda x: (calls.append(tuple(x.shape)), encode(x))[1])
    torch.manual_seed(0)
    renderer = build_renderer(field_config=FieldConfig(n_levels=4, log2_hashmap_size=10, max_resolution=32, hidden_dim=16))
    side = g.latent_resolution * 2  # renders larger than the latent: the warm-up resizes them
    cams = orbit_cameras(2, side, side, distance=3.0)

    def step(progress):
        renderer.zero_grad(set_to_none=True)
        out = renderer.render(cams, shading="albedo")
        sds = g(out.rgb.permute(0, 3, 1, 2), cams, "albedo", progress, opacity=out.opacity.permute(0, 3, 1, 2))
        sds.loss.backward()
        return renderer.field.encoding_params.grad

    grad = step(0.1)
    assert calls == []  # warm-up: no VAE encoder
    assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0
    z = g.model_input(torch.full((1, 3, side, side), 0.75), torch.ones(1, 1, side, side), 0.1)
    assert z.shape == (1, 4, g.latent_resolution, g.latent_resolution)
    assert torch.allclose(z[:, :3], torch.full_like(z[:, :3], 0.5)) and torch.allclose(z[:, 3], torch.ones_like(z[:, 3]))
    with pytest.raises(FastDreamError, match="opacity"):
        g(torch.rand(1, 3, side, side), None, "albedo", 0.1)
    step(0.5)
    assert len(calls) == 1 and calls[0][-1] == g.resolution  # after the warm-up: the VAE path

# ---------------------------------------------------------------------------- Perp-Neg
def _f(abc, r):
    a, b, c = abc
    return a * math.exp(-b * r) + c


# (elevation, azimuth) -> the negative views and weights, written out from the rule of threestudio's
# prompt_processors/base.py with its default curves
F_SB, F_FSB, F_FS, F_SF = (1, 0.5, -0.606), (1, 0.5, 0.967), (4, 0.5, -2.426), (4, 0.5, -2.426)
PERP_NEG_CASES = [
    (10.0, 0.0, ("front", "side"), (-_f(F_FS, 1.0), -_f(F_SF, 0.0))),      # front: no "front" negative
    (10.0, 405.0, ("front", "side"), (-_f(F_FS, 0.5), -_f(F_SF, 0.5))),    # 45 degrees after wrapping
    (0.0, -60.0, ("front", "side"), (-_f(F_FS, 1 / 3), -_f(F_SF, 2 / 3))),
    (30.0, 90.0, ("side", "front"), (-_f(F_SB, 1.0), -_f(F_FSB, 1.0))),    # side: no "side" negative
    (30.0, 225.0, ("side", "front"), (-_f(F_SB, 0.5), -_f(F_FSB, 0.5))),   # |azimuth| 135
    (-10.0, 180.0, ("side", "front"), (-_f(F_SB, 0.0), -_f(F_FSB, 0.0))),  # back: the front pushed hardest
    (75.0, 30.0, ("front", "side"), (0.0, 0.0)),                           # overhead: no negatives
]


def test_perp_neg_weights_follow_the_azimuth_rule():
    from fastdream.guidance import VIEWS, perp_neg_weights

    elev = torch.tensor([c[0] for c in PERP_NEG_CASES])
    azim = torch.tensor([c[1] for c in PERP_NEG_CASES])
    views, weights = perp_neg_weights(elev, azim, F_SB, F_FSB, F_FS, F_SF, overhead_deg=60.0)
    for i, (_, _, names, w) in enumerate(PERP_NEG_CASES):
        assert tuple(VIEWS[int(v)] for v in views[i]) == names, PERP_NEG_CASES[i]
        torch.testing.assert_close(weights[i], torch.tensor(w, dtype=torch.float32), rtol=0, atol=1e-6)
    assert abs(float(weights[0, 0])) < 1e-3 and abs(float(weights[3, 0])) < 1e-3  # a view's own negative vanishes
    assert bool((weights <= 1e-3).all())


def test_perp_neg_is_off_by_default_and_needs_view_prompts(sd):
    from fastdream.config import RunConfig

    assert GuidanceOptions().perp_neg is False and "perp_neg" not in RunConfig().guidance.options
    assert sd.options.perp_neg is False
    calls = []
    original = sd.predict_noise
    sd.predict_noise = lambda z_t, t, emb: calls.append(z_t.shape[0]) or original(z_t, t, emb)
    try:
        sd(torch.rand(2, 3, 16, 16), cams([0.0, 0.0], [0.0, 90.0]), t=torch.tensor([500, 500]))
    finally:
        del sd.predict_noise
    assert calls == [4]  # [uncond; cond] only
    with pytest.raises(FastDreamError, match="view_dependent"):
        GuidanceOptions(perp_neg=True, view_dependent=False).validate()
    with pytest.raises(FastDreamError, match="perp_neg_f_sb must be three finite numbers"):
        GuidanceOptions.from_kwargs(perp_neg_f_sb=[1.0, float("nan"), 0.0])
    assert GuidanceOptions.from_kwargs(perp_neg_f_fs=[2, 1, 0]).perp_neg_f_fs == (2, 1, 0)  # YAML lists are taken


def _perp_neg_reference(u, c, negs, weights, scale):
    """The Perp-Neg formula in float64, one image at a time."""
    e_pos = (c - u).double()
    out = e_pos.clone()
    for e, w in zip(negs, weights):
        e = (e - u).double()
        out += float(w) * (e - (e * e_pos).sum() / (e_pos * e_pos).sum() * e_pos)
    return u.double() + scale * out


def test_perp_neg_combination_matches_the_formula_for_given_noise_predictions(sd):
    """Hand-constructed predictions per row of the one batched UNet call: uncond, cond, negative 1, negative 2."""
    g = torch.Generator().manual_seed(11)
    b = 3
    table = torch.randn(4 * b, 4, 8, 8, generator=g)
    table[2 * b] = table[b] * 0.5 + table[0] * 0.5 + torch.randn(4, 8, 8, generator=g)  # partly along the positive
    seen = []

    def fake_unet(z_t, t, emb):
        seen.append((z_t.shape[0], emb.shape[0]))
        return table.to(z_t.dtype)

    c = cams([10.0, 30.0, 70.0], [20.0, 150.0, 0.0])
    cond, uncond = sd.text_embeddings(c, b)
    negatives = sd.perp_neg_embeddings(c, b)
    sd.predict_noise = fake_unet
    try:
        eps_hat, eps_c, eps_u = sd.guided_noise(torch.zeros(b, 4, 8, 8), torch.tensor([100, 500, 900]), cond, uncond,
                                                negatives=negatives)
    finally:
        del sd.predict_noise
    assert seen == [(4 * b, 4 * b)]
    u, cc, n1, n2 = table[:b], table[b:2 * b], table[2 * b:3 * b], table[3 * b:]
    s = sd.options.guidance_scale
    for i in range(b):
        expected = _perp_neg_reference(u[i], cc[i], (n1[i], n2[i]), negatives[1][i], s)
        torch.testing.assert_close(eps_hat[i].double(), expected, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(eps_hat[2], u[2] + s * (cc[2] - u[2]), rtol=1e-5, atol=1e-4)  # overhead: plain CFG
    assert not torch.allclose(eps_hat[0], u[0] + s * (cc[0] - u[0]), atol=1e-2)


@pytest.mark.parametrize("which", ["sd", "if"])
def test_perp_neg_sds_with_a_tiny_unet_equals_separate_calls(which, sd_folder, if_folder):
    """The whole SDS step with Perp-Neg on: one UNet call on the 4B batch, the negative prompts chosen by azimuth,
    and the gradient w(t) (eps_hat - eps) with eps_hat from four separate UNet calls and the float64 formula."""
    folder = sd_folder if which == "sd" else if_folder
    g = load_guidance(str(folder), "cpu", seed=0, perp_neg=True, guidance_scale=7.5)
    g.set_prompt("a chair")
    torch.manual_seed(5)
    images = torch.rand(2, 3, 16, 16, requires_grad=True)
    c = cams([15.0, 5.0], [30.0, 200.0])
    z = g.encode_images(images).detach().requires_grad_(True)
    t = torch.tensor([300, 700])
    noise = torch.randn(z.shape)
    calls = []
    original = g.predict_noise
    g.predict_noise = lambda z_t, tt, emb: calls.append(z_t.shape[0]) or original(z_t, tt, emb)
    try:
        out = g.sds_from_latents(z, *g.text_embeddings(c, 2), t=t, noise=noise, negatives=g.perp_neg_embeddings(c, 2))
    finally:
        del g.predict_noise
    out.loss.backward()
    assert calls == [8]
    ab = g.alphas_cumprod[t].view(2, 1, 1, 1)
    z_t = ab.sqrt() * z.detach() + (1 - ab).sqrt() * noise
    texts = {"front": "a chair, front view", "side": "a chair, side view"}
    # 30 degrees: negatives front and side; 200 degrees (|-160|): side and front
    neg_texts = [(texts["front"], texts["side"]), (texts["side"], texts["front"])]
    cond, uncond = g.text_embeddings(c, 2)
    eps_c, eps_u = manual_eps(g, z_t, t, cond, uncond)
    n1 = manual_eps(g, z_t, t, g.embed_texts([p[0] for p in neg_texts]), uncond)[0]
    n2 = manual_eps(g, z_t, t, g.embed_texts([p[1] for p in neg_texts]), uncond)[0]
    weights = g.perp_neg_embeddings(c, 2)[1]
    for i in range(2):
        eps_hat = _perp_neg_reference(eps_u[i], eps_c[i], (n1[i], n2[i]), weights[i], 7.5)
        expected = ((1 - ab[i]).double() * (eps_hat - noise[i].double())) / 2
        torch.testing.assert_close(z.grad[i].double(), expected, rtol=1e-4, atol=1e-5)
    # through __call__ too (the images' gradient is the latents' one pulled back through the encoder)
    g(images, c, t=t, noise=noise).loss.backward()
    assert images.grad is not None and bool(torch.isfinite(images.grad).all()) and float(images.grad.abs().sum()) > 0
