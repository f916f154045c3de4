"""The run configuration: defaults, YAML, --set overrides with type coercion, clear errors."""
import pytest
import yaml

from fastdream.config import (RunConfig, apply_overrides, build_config, config_from_dict, config_to_dict, dump_config,
                              load_config_file, save_config)
from fastdream.errors import FastDreamError


def test_dreamfusion_defaults():
    c = RunConfig()
    assert (c.width, c.height, c.batch_size, c.steps) == (64, 64, 1, 10000)
    assert c.guidance.guidance_scale == 100.0
    assert c.optim.lr_hash > c.optim.lr_mlp
    assert c.grid.update_every == 16
    assert c.model == "stabilityai/stable-diffusion-2-1-base"
    c.validate()


def test_set_overrides_coerce_types():
    c = apply_overrides(RunConfig(), [
        "steps=250", "optim.lr_hash=1e-3", "field.log2_hashmap_size=15", "render.samples_per_ray=128.0",
        "camera.distance_range=1.5,2.0", "camera.elevation_range=[0, 45]", "output.video=false",
        "guidance.options.latent_mode=linear", "guidance.options.grad_clip=0.5", "background_color=0,0,0",
        "guidance.negative_prompt=blurry, low quality",
    ])
    assert c.steps == 250 and isinstance(c.steps, int)
    assert c.optim.lr_hash == pytest.approx(1e-3) and isinstance(c.optim.lr_hash, float)
    assert c.field.log2_hashmap_size == 15
    assert c.render.samples_per_ray == 128 and isinstance(c.render.samples_per_ray, int)
    assert c.camera.distance_range == (1.5, 2.0)
    assert c.camera.elevation_range == (0.0, 45.0)
    assert c.output.video is False
    assert c.guidance.options == {"latent_mode": "linear", "grad_clip": 0.5}
    assert c.background_color == (0.0, 0.0, 0.0)
    assert c.guidance.negative_prompt == "blurry, low quality"


@pytest.mark.parametrize("item, fragment", [
    ("optim.lr_hsh=1", "optim.lr_hash"),
    ("stpes=3", "steps"),
    ("feild.n_levels=4", "field.n_levels"),
    ("render.samples_per_ray=abc", "integer"),
    ("output.video=maybe", "boolean"),
    ("camera.distance_range=1,2,3", "2 values"),
    ("steps", "key=value"),
    ("field=3", "section"),
])
def test_bad_overrides_are_clear(item, fragment):
    with pytest.raises(FastDreamError) as err:
        apply_overrides(RunConfig(), [item])
    assert fragment in str(err.value)


def test_yaml_file_then_set(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"steps": 77, "seed": 5, "optim": {"lr_mlp": 0.002}, "camera": {"distance_range": [1.2, 1.4]}}))
    c = build_config(path, ["seed=9"])
    assert c.steps == 77 and c.seed == 9 and c.optim.lr_mlp == 0.002 and c.camera.distance_range == (1.2, 1.4)


def test_yaml_unknown_key(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr_hashh: 0.1\n")
    with pytest.raises(FastDreamError) as err:
        load_config_file(path)
    assert "optim.lr_hash" in str(err.value) and str(path) in str(err.value)
    with pytest.raises(FastDreamError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(FastDreamError, match="not valid YAML"):
        load_config_file(tmp_path / "bad.yaml")


def test_roundtrip(tmp_path):
    c = apply_overrides(RunConfig(), ["steps=12", "camera.distance_range=1.1,1.3", "guidance.options.attention=sdpa"])
    save_config(c, tmp_path / "config.yaml")
    again = load_config_file(tmp_path / "config.yaml")
    assert config_to_dict(again) == config_to_dict(c)
    assert again.camera.distance_range == (1.1, 1.3)
    assert config_from_dict(yaml.safe_load(dump_config(c))) == c


def test_validate():
    with pytest.raises(FastDreamError, match="reference"):
        apply_overrides(RunConfig(), ["guidance.kind=reference"]).validate()
    with pytest.raises(FastDreamError, match="guidance.kind"):
        apply_overrides(RunConfig(), ["guidance.kind=dalle"]).validate()
    with pytest.raises(FastDreamError, match="shading"):
        apply_overrides(RunConfig(), ["shading.albedo=0", "shading.lambertian=0", "shading.textureless=0"]).validate()


def test_every_numeric_key_has_a_range():
    from fastdream.config import NUMERIC_RANGES, _numbers

    assert sorted(k for k, _ in _numbers(RunConfig())) == sorted(NUMERIC_RANGES)


@pytest.mark.parametrize("item, fragment", [
    ("optim.lr_hash=nan", "optim.lr_hash must be a finite number, got nan"),
    ("optim.lr_background=-1e-3", "optim.lr_background must lie in [0, inf)"),
    ("optim.betas=0.9,1.5", "optim.betas must lie in [0, 1)"),
    ("guidance.t_max=inf", "guidance.t_max must be a finite number"),
    ("grid.ema_decay=1.5", "grid.ema_decay must lie in [0, 1]"),
    ("camera.distance_range=2.0,1.0", "low <= high"),
    ("camera.elevation_range=-100,90", "camera.elevation_range must lie in [-90, 90]"),
    ("field.blob_radius=0", "field.blob_radius must lie in (0, inf)"),
    ("output.view_fov=180", "output.view_fov must lie in (0, 180)"),
    ("aabb=1,-1,-1,-1,1,1", "each min < max"),
    ("steps=0", "fastdream export"),
    ("seed=-1", "seed must lie in"),
])
def test_numbers_must_be_finite_and_in_range(item, fragment):
    with pytest.raises(FastDreamError, match="Invalid configuration") as info:
        apply_overrides(RunConfig(), [item]).validate()
    assert fragment in str(info.value)
