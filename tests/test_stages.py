"""The Stage seam: the training loop runs any registered stage, names it in checkpoints, resumes it, and
`fastdream export` rebuilds it from a run folder; a toy stage here is one small class."""
import json
from pathlib import Path

import torch

from fastdream import runs
from fastdream.checkpoint import latest_checkpoint, load_checkpoint
from fastdream.cli import main
from fastdream.stages import STAGES, Stage, StepLoss


class ColourStage(Stage):
    """Learns one colour: the render of every camera is that colour, and the guidance scores it."""
    name = "colour"

    def __init__(self, config, device):
        super().__init__(config, device)
        self.colour = torch.nn.Parameter(torch.full((3,), 0.5, device=device))
        self.housekeeping = []

    @property
    def scene_radius(self) -> float:
        return 1.0

    def param_groups(self, optim):
        return [{"params": [self.colour], "lr": optim.lr_mlp, "name": "colour"}]

    def loss(self, cameras, step, progress, guidance, generator, plan=None):
        images = self.colour.view(1, 3, 1, 1).expand(cameras.c2w.shape[0], 3, cameras.height, cameras.width)
        target = torch.tensor([0.9, 0.2, 0.1], device=self.device).view(1, 3, 1, 1)
        loss = ((images - target) ** 2).mean()
        return StepLoss(loss, {"mse": loss.detach()}, {"shading": "albedo"})

    def after_step(self, step, generator):
        self.housekeeping.append(step)

    def state_dict(self):
        return {"colour": self.colour.detach().clone()}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.colour.copy_(state["colour"])

    def preview(self, path, output):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.colour.tolist()))
        return path

    def export(self, out_dir, output, say):
        path = Path(out_dir) / "colour.json"
        path.write_text(json.dumps(self.colour.tolist()))
        say("wrote %s", path)
        return {"colour": str(path)}


TOY = ["stages=colour", "width=8", "height=8", "optim.lr_mlp=0.05", "output.checkpoint_every=0",
       "output.preview_every=0", "guidance.reference_resolution=8"]


def _args(scene, out, steps, *extra):
    sets = []
    for item in TOY:
        sets += ["--set", item]
    return ["run", "a colour", "--out", str(out), "--steps", str(steps), "--device", "cpu", "--quiet",
            "--guidance", "reference", "--reference-scene", str(scene)] + sets + list(extra)


def test_the_loop_trains_resumes_and_exports_a_new_stage(tmp_path, monkeypatch, demo_scene_npz):
    monkeypatch.setitem(STAGES, "colour", ColourStage)
    out = tmp_path / "run"
    result = runs.run("a colour", out, overrides=TOY, quiet=True,
                      cli=dict(steps=30, device="cpu", guidance="reference", reference_scene=str(demo_scene_npz)))
    trainer = result["trainer"]
    assert trainer.stage.housekeeping == list(range(30))
    colour = trainer.stage.colour.detach()
    assert torch.allclose(colour, torch.tensor([0.9, 0.2, 0.1]), atol=0.05), colour
    state = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert state["stage"] == "colour" and torch.equal(state["colour"], colour)
    assert json.loads((out / "colour.json").read_text()) == colour.tolist()
    # resuming continues the same stage; export rebuilds it from the folder
    assert main(_args(demo_scene_npz, out, 40, "--resume")) == 0
    assert load_checkpoint(latest_checkpoint(out / "checkpoints"))["step"] == 40
    (out / "colour.json").unlink()
    assert main(["export", str(out)]) == 0 and (out / "colour.json").exists()


class DarkerStage(ColourStage):
    """A second toy stage: starts from the colour stage's colour and learns a darker one, with noise drawn
    from the run's generator (so that resuming it exactly needs the random state across the boundary)."""
    name = "darker"

    @classmethod
    def n_steps(cls, config):
        return 20

    @classmethod
    def can_follow(cls, previous):
        return previous == "colour"

    def init_from(self, previous):
        with torch.no_grad():
            self.colour.copy_(previous.colour)
        self.started_from = previous.colour.detach().clone()

    def loss(self, cameras, step, progress, guidance, generator, plan=None):
        target = torch.tensor([0.3, 0.1, 0.05], device=self.device)
        noise = torch.randn(3, generator=generator, device=self.device) * 0.01
        loss = ((self.colour - target + noise) ** 2).mean()
        return StepLoss(loss, {"mse": loss.detach()}, {"shading": "albedo"})


def test_stages_run_in_order_and_resume_exactly_across_the_boundary(tmp_path, monkeypatch, demo_scene_npz):
    from fastdream import train

    monkeypatch.setitem(STAGES, "colour", ColourStage)
    monkeypatch.setitem(STAGES, "darker", DarkerStage)
    sets = [s for s in TOY if not s.startswith("stages=")] + ["stages=colour,darker"]
    cli = dict(steps=30, device="cpu", guidance="reference", reference_scene=str(demo_scene_npz))
    whole = runs.run("a colour", tmp_path / "whole", overrides=sets, quiet=True, cli=cli)["trainer"]
    assert whole.step == 50 and whole.stage.name == "darker"
    assert whole.stage.housekeeping == list(range(20))  # the stage counts its own steps
    assert torch.allclose(whole.stage.started_from, torch.tensor([0.9, 0.2, 0.1]), atol=0.05)
    target = torch.tensor([0.3, 0.1, 0.05])
    assert (whole.stage.colour.detach() - target).norm() < 0.5 * (whole.stage.started_from - target).norm()
    # the finished first stage is checkpointed at the boundary, under its own name
    names = {load_checkpoint(p)["step"]: load_checkpoint(p)["stage"] for p in (tmp_path / "whole/checkpoints").glob("*.pt")}
    assert names == {30: "colour", 50: "darker"}
    rows = [json.loads(line) for line in (tmp_path / "whole/metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in rows] == ["colour"] * 30 + ["darker"] * 20

    # killed in the first stage (resumes there, then runs the second) and in the second (resumes in it)
    for kill_at in (12, 41):
        out = tmp_path / f"killed_{kill_at}"

        def interrupt(trainer, step):
            if step == kill_at:
                raise KeyboardInterrupt

        monkeypatch.setattr(train, "_on_step", interrupt)
        assert runs.run("a colour", out, overrides=sets, quiet=True, cli=cli)["interrupted"]
        monkeypatch.setattr(train, "_on_step", lambda trainer, step: None)
        resumed = runs.run("a colour", out, overrides=sets, quiet=True, cli=cli, resume=True)["trainer"]
        assert resumed.step == 50 and resumed.stage.name == "darker"
        assert torch.equal(resumed.stage.colour.detach(), whole.stage.colour.detach()), kill_at


def test_a_stage_that_cannot_start_the_run_is_refused(tmp_path, monkeypatch, demo_scene_npz, capsys):
    monkeypatch.setitem(STAGES, "colour", ColourStage)
    monkeypatch.setitem(STAGES, "darker", DarkerStage)
    for stages, message in (("darker", "starts from a trained stage"), ("darker,colour", "cannot start from"),
                            ("colour,gaussians", "list one or more of")):
        assert main(_args(demo_scene_npz, tmp_path / "run", 5, "--set", f"stages={stages}")) == 2
        assert message in capsys.readouterr().err
        assert not (tmp_path / "run").exists()


def test_a_stage_adjusts_every_model_of_a_joint_guidance(tmp_path):
    """The mesh stage's timestep range (mesh.t_max, no annealing) reaches each member of a joint guidance, and
    the NeRF stage's options come back when it is the current stage again."""
    from fastdream.config import RunConfig
    from fastdream.demo import save_demo_scene
    from fastdream.guidance import JointGuidance, registry
    from fastdream.guidance.reference import ReferenceSceneGuidance
    from fastdream.train import Trainer

    scene = save_demo_scene(tmp_path / "scene.npz", resolution=16)
    cfg = RunConfig(prompt="a scene", device="cpu", steps=4, stages=("nerf", "mesh"), width=16, height=16)
    cfg.guidance.kind, cfg.guidance.reference_scene = "reference", str(scene)
    cfg.guidance.t_max, cfg.mesh.t_max = 0.98, 0.5
    cfg.guidance.options = {"t_max_end": 0.6}
    registry.get("reference").configure_run(cfg)
    trainer = Trainer(cfg.validate(), tmp_path / "run", quiet=True, device=torch.device("cpu"))
    second = ReferenceSceneGuidance(str(scene), options=trainer.guidance.options)
    trainer.guidance = JointGuidance([("a", trainer.guidance, 1.0), ("b", second, 0.5)])
    trainer._remember_guidance_options()
    members = [g for _, g, _ in trainer.guidance.members]
    assert [(g.options.t_max, g.options.t_max_end) for g in members] == [(0.98, 0.6)] * 2
    trainer._switch_stage(1)
    assert [(g.options.t_max, g.options.t_max_end) for g in members] == [(0.5, None)] * 2
    trainer._switch_stage(0)
    assert [(g.options.t_max, g.options.t_max_end) for g in members] == [(0.98, 0.6)] * 2
