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

    def loss(self, cameras, step, progress, guidance, generator):
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


TOY = ["stage=colour", "width=8", "height=8", "optim.lr_mlp=0.05", "output.checkpoint_every=0",
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
