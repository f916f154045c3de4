"""`fastdream eval`: R-Precision on constructed embeddings (exact values), prompt files, CLIP loading errors,
and the whole command on two tiny runs with a tiny random-weight open_clip model (offline, CPU)."""
from __future__ import annotations

import json
import sys

import pytest
import torch

from fastdream import cli
from fastdream.errors import FastDreamError
from fastdream.evaluate import EvalProtocol, r_precision, read_prompts

# a tiny open_clip architecture (random weights): ~1.7M parameters, mostly the token embedding
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
TINY_RUN_SETTINGS = [
    "width=16", "height=16", "field.n_levels=4", "field.log2_hashmap_size=12", "field.max_resolution=64",
    "field.hidden_dim=16", "grid.resolution=16", "render.samples_per_ray=48", "output.mesh=false",
    "output.video=false", "output.preview_views=1", "output.preview_resolution=16", "output.preview_every=0",
]
PROMPTS = ["a red box", "a blue ball"]


# ---------------------------------------------------------------------------------------------- metric

def test_r_precision_exact_values():
    texts = torch.eye(3)                                    # prompts 0, 1, 2 along the axes
    images = torch.tensor([[1.0, 0.0, 0.0],                 # target 0: first          -> hit
                           [0.2, 0.9, 0.0],                 # target 0: 1 is closer    -> rank 1
                           [0.0, 0.0, 5.0],                 # target 2: first (scale does not matter)
                           [0.5, 0.5, 0.0],                 # target 1: tie with 0     -> miss (rank 1)
                           [0.1, 0.2, 0.9]])                # target 0: last           -> rank 2
    res = r_precision(images, texts, [0, 0, 2, 1, 0])
    assert res["precision"] == pytest.approx(2 / 5, abs=0)
    assert res["ranks"].tolist() == [0, 1, 0, 1, 2]
    assert res["hits"].tolist() == [True, False, True, False, False]
    assert res["top"].tolist()[:3] == [0, 1, 2]


def test_r_precision_normalises_and_is_permutation_consistent():
    g = torch.Generator().manual_seed(0)
    texts = torch.randn(7, 5, generator=g)
    images = texts[[3, 1, 6, 0]] * torch.tensor([[2.0], [0.1], [7.0], [1.0]]) + 0.01 * torch.randn(4, 5, generator=g)
    assert r_precision(images, texts, [3, 1, 6, 0])["precision"] == 1.0
    assert r_precision(images, texts, [0, 0, 0, 3])["precision"] == 0.0
    perm = torch.randperm(7, generator=g)
    inv = torch.argsort(perm)
    a = r_precision(images, texts, [3, 1, 6, 2])
    b = r_precision(images, texts[perm], inv[[3, 1, 6, 2]])
    assert a["hits"].tolist() == b["hits"].tolist() == [True, True, True, False]


def test_r_precision_rejects_bad_input():
    with pytest.raises(FastDreamError):
        r_precision(torch.randn(2, 4), torch.randn(3, 5), [0, 1])
    with pytest.raises(FastDreamError):
        r_precision(torch.randn(2, 4), torch.randn(3, 4), [0, 3])


def test_read_prompts(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n a red box \n\na blue ball\na red box\n")
    assert read_prompts(f) == ["a red box", "a blue ball"]
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(FastDreamError, match="no prompts"):
        read_prompts(tmp_path / "empty.txt")
    with pytest.raises(FastDreamError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_shipped_prompt_list_reads():
    from fastdream.evaluate import EXAMPLE_PROMPTS

    prompts = read_prompts(EXAMPLE_PROMPTS)
    assert 10 <= len(prompts) <= 200 and all(p == p.strip() for p in prompts)


def test_missing_open_clip_is_a_clear_error(monkeypatch):
    from fastdream.evaluate import load_clip

    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip -> ImportError
    with pytest.raises(FastDreamError, match=r"fastdream\[eval\]"):
        load_clip("ViT-B-32")


# ---------------------------------------------------------------------------------------------- CLIP loading

@pytest.fixture(scope="session")
def tiny_clip_config(tmp_path_factory):
    pytest.importorskip("open_clip")
    path = tmp_path_factory.mktemp("clip") / "fd-tiny-clip.json"
    path.write_text(json.dumps(TINY_CLIP))
    return path


@pytest.fixture(scope="session")
def tiny_clip_weights(tiny_clip_config):
    """A state dict of the tiny model saved as a local checkpoint file (fixed random weights)."""
    import open_clip

    open_clip.add_model_config(tiny_clip_config)
    torch.manual_seed(123)
    model = open_clip.create_model(tiny_clip_config.stem, pretrained=None)
    path = tiny_clip_config.parent / "tiny_clip.pt"
    torch.save(model.state_dict(), path)
    return path


def test_offline_without_cached_weights_is_a_clear_error(monkeypatch, tmp_path):
    pytest.importorskip("open_clip")
    import huggingface_hub.constants as hub_constants
    from fastdream.evaluate import load_clip

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(FastDreamError) as info:
        load_clip("ViT-B-32", None, cache_dir=str(tmp_path / "cache"))
    msg = str(info.value)
    assert "ViT-B-32" in msg and "openai" in msg and "HF_HUB_OFFLINE" in msg and "--pretrained" in msg


def test_unknown_model_tag_and_path_are_clear_errors():
    pytest.importorskip("open_clip")
    from fastdream.evaluate import load_clip

    with pytest.raises(FastDreamError, match="Unknown CLIP model 'ViT-B-33'.*ViT-B-32"):
        load_clip("ViT-B-33")
    with pytest.raises(FastDreamError, match="no pretrained tag 'nonsense'.*openai"):
        load_clip("ViT-B-32", "nonsense")
    with pytest.raises(FastDreamError, match="does not exist"):
        load_clip("ViT-B-32", "/nowhere/clip.pt")


def test_local_checkpoint_is_loaded(tiny_clip_config, tiny_clip_weights):
    from fastdream.evaluate import load_clip

    a = load_clip(str(tiny_clip_config), str(tiny_clip_weights))
    b = load_clip(str(tiny_clip_config), str(tiny_clip_weights))
    ea, eb = a.encode_texts(PROMPTS), b.encode_texts(PROMPTS)
    assert ea.shape == (2, 16) and torch.equal(ea, eb)
    assert torch.allclose(ea.norm(dim=-1), torch.ones(2))


# ---------------------------------------------------------------------------------------------- full command

@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Two finished `fastdream run` folders (reference guidance on the demo scene, a few steps, tiny field)."""
    from fastdream.demo import save_demo_scene
    from fastdream.runs import run

    root = tmp_path_factory.mktemp("runs")
    scene = save_demo_scene(root / "scene.npz", resolution=24)
    folders = []
    for i, prompt in enumerate(PROMPTS):
        out = root / f"run{i}"
        run(prompt, out, overrides=TINY_RUN_SETTINGS, quiet=True,
            cli={"steps": 2, "seed": i, "device": "cpu", "guidance": "reference", "reference_scene": str(scene)})
        assert (out / "metrics.json").is_file()
        folders.append(out)
    return folders


def _prompt_file(tmp_path, prompts):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(prompts) + "\n")
    return f


def test_eval_command_end_to_end(tiny_clip_config, tiny_clip_weights, tiny_runs, tmp_path, capsys):
    """The CLI renders both runs from 3 cameras in colour and textureless, embeds them and the 3 candidate
    prompts with the tiny CLIP, and reports R-Precision equal to a direct recomputation."""
    from fastdream.evaluate import load_clip, load_run, render_run

    prompts = PROMPTS + ["a green tree"]
    pfile = _prompt_file(tmp_path, prompts)
    out = tmp_path / "eval.json"
    rc = cli.main(["eval", *map(str, tiny_runs), "--prompts", str(pfile), "--clip", str(tiny_clip_config),
                   "--pretrained", str(tiny_clip_weights), "--views", "3", "--resolution", "32", "--json", str(out),
                   "--device", "cpu", "--save-renders", str(tmp_path / "renders")])
    assert rc == 0
    table = capsys.readouterr().out
    assert "CLIP R-Precision" in table and "textureless" in table and "fd-tiny-clip" in table
    report = json.loads(out.read_text())
    assert report["n_runs"] == 2 and report["n_prompts"] == 3 and report["n_renders_per_type"] == 6
    assert report["protocol"]["elevation"] == 30.0 and report["protocol"]["azimuths"] == [0.0, 120.0, 240.0]
    (row,) = report["results"]
    assert [r["prompt"] for r in report["runs"]] == PROMPTS
    assert (tmp_path / "renders" / "run0.png").is_file()

    # recompute directly: same renders, same model, same metric
    clip = load_clip(str(tiny_clip_config), str(tiny_clip_weights))
    text = clip.encode_texts(prompts)
    protocol = EvalProtocol(views=3, resolution=32)
    renders = [render_run(load_run(folder), protocol) for folder in tiny_runs]
    targets = [0] * 3 + [1] * 3
    for kind in ("color", "textureless"):
        assert renders[0][kind].shape == (3, 32, 32, 3) and renders[0][kind].dtype == torch.uint8
        emb = [clip.encode_images(r[kind]) for r in renders]
        expected = r_precision(torch.cat(emb), text, targets)["precision"]
        assert row[kind] == pytest.approx(expected, abs=1e-12)
        hits = sum(r["results"]["fd-tiny-clip"][kind]["hits"] for r in report["runs"])
        assert row[kind] == pytest.approx(hits / 6, abs=1e-12)
    # the colour and textureless renders differ (albedo vs white)
    assert not torch.equal(renders[0]["color"], renders[0]["textureless"])


def test_eval_random_weights_and_prompt_not_in_set(tiny_clip_config, tiny_runs, tmp_path, capsys):
    pfile = _prompt_file(tmp_path, PROMPTS)
    rc = cli.main(["eval", str(tiny_runs[0]), "--prompts", str(pfile), "--clip", str(tiny_clip_config),
                   "--pretrained", "none", "--views", "1", "--resolution", "32", "--device", "cpu"])
    assert rc == 0
    assert "R-Precision" in capsys.readouterr().out

    pfile = _prompt_file(tmp_path, ["a green tree", "a blue ball"])
    rc = cli.main(["eval", *map(str, tiny_runs), "--prompts", str(pfile), "--clip", str(tiny_clip_config),
                   "--pretrained", "none", "--views", "1", "--resolution", "32", "--device", "cpu"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "run0" in err and "'a red box'" in err and "not in the prompt set" in err
