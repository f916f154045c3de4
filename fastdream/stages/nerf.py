"""The NeRF stage: a hash-grid radiance field rendered by ray marching, scored by SDS (DreamFusion).

Each step: pick the shading mode (albedo only for the first `shading.albedo_only_fraction` of the run,
then random), render the sampled cameras, score the renders with the guidance (view-dependent prompts
are the guidance's job: it gets the cameras), add the orientation loss and the opacity regularisers;
after the optimizer step, every `grid.update_every` steps, update the occupancy grid. Parameter groups:
the hash table at a higher learning rate than the MLPs, and the learned background.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from ..ops import SHADING_MODES
from ..regularizers import opacity_entropy, opacity_sparsity, orientation_loss
from .base import Stage, StepLoss


def build_run_renderer(config, device: torch.device):
    """The renderer (field, background, occupancy grid) a run's configuration describes, on device."""
    from ..renderer import build_renderer

    grid_kwargs = dict(ema_decay=config.grid.ema_decay, threshold=config.grid.threshold, warmup_steps=config.grid.warmup_steps)
    renderer = build_renderer(aabb=config.aabb, field_config=config.field, render_config=config.render,
                              background=config.background, background_color=config.background_color,
                              grid_resolution=config.grid.resolution, grid_kwargs=grid_kwargs)
    return renderer.to(device)


class NeRFStage(Stage):
    name = "nerf"

    def __init__(self, config, device: torch.device):
        super().__init__(config, device)
        self.renderer = build_run_renderer(config, device)
        self.renderer.train()

    @property
    def scene_radius(self) -> float:
        return self.renderer.field.scene_radius

    def train(self, mode: bool = True) -> "NeRFStage":
        self.renderer.train(mode)
        return self

    def param_groups(self, optim) -> List[Dict[str, Any]]:
        renderer = self.renderer
        groups = [{"params": [renderer.field.encoding_params], "lr": optim.lr_hash, "name": "hash"},
                  {"params": list(renderer.field.mlp_parameters()), "lr": optim.lr_mlp, "name": "mlp"}]
        bg = [p for p in renderer.background.parameters() if p.requires_grad]
        if bg:
            groups.append({"params": bg, "lr": optim.lr_background, "name": "background"})
        return groups

    def choose_shading(self, step: int, generator: torch.Generator) -> str:
        s = self.config.shading
        u = float(torch.rand((), generator=generator, device=self.device))
        if step < s.albedo_only_fraction * self.config.steps:
            return "albedo"
        probs = torch.tensor([s.albedo, s.lambertian, s.textureless], dtype=torch.float64)
        cdf = torch.cumsum(probs / probs.sum(), 0)
        return SHADING_MODES[min(int((cdf <= u).sum()), 2)]

    def loss(self, cameras, step: int, progress: float, guidance, generator: torch.Generator) -> StepLoss:
        cfg = self.config
        shading = self.choose_shading(step, generator)
        self.renderer.field.set_progress(progress)
        reg = cfg.reg.weights(progress)
        background = (self.renderer.random_solid_background(cameras, cfg.random_background, generator)
                      if cfg.random_background > 0 else None)
        # the orientation loss needs normals on every step, albedo steps included
        out = self.renderer.render(cameras, shading=shading, need_normals=shading != "albedo" or reg["orient"] > 0,
                                   background=background)
        images = out.rgb.permute(0, 3, 1, 2)
        sds = guidance(images, cameras, shading, progress)
        loss = sds.loss
        terms = {"sds": sds.loss.detach()}
        rays = out.rays
        opacity = out.opacity.reshape(-1)
        if reg["orient"] > 0 and rays is not None and rays.sample_normals is not None:
            orient = orientation_loss(rays.weights, rays.sample_normals, rays.directions, rays.ray_indices,
                                      opacity=opacity)
            loss = loss + reg["orient"] * orient
            terms["orient"] = orient.detach()
        if reg["entropy"] > 0:
            ent = opacity_entropy(opacity)
            loss = loss + reg["entropy"] * ent
            terms["entropy"] = ent.detach()
        if reg["sparsity"] > 0:
            sp = opacity_sparsity(opacity)
            loss = loss + reg["sparsity"] * sp
            terms["sparsity"] = sp.detach()
        return StepLoss(loss, terms, {"shading": shading, "n_samples": out.n_samples})

    def after_step(self, step: int, generator: torch.Generator) -> None:
        if (step + 1) % self.config.grid.update_every == 0:
            field, step_size = self.renderer.field, self.renderer.step_size
            self.renderer.grid.update(step, lambda x: field.density(x) * step_size, generator=generator)

    def state_dict(self) -> Dict[str, Any]:
        return {"renderer": self.renderer.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.renderer.load_state_dict(state["renderer"])

    def view_distance(self, output) -> float:
        from ..export import view_distance

        return view_distance(self.scene_radius, output)

    def preview(self, path: Path, output) -> Path:
        from ..export import write_preview

        return write_preview(self.renderer, path, output.preview_views, output.preview_resolution,
                             output.video_elevation, self.view_distance(output), output.view_fov)

    def export(self, out_dir: Path, output, say: Callable[..., None]) -> Dict[str, str]:
        from ..export import export_outputs

        return export_outputs(self.renderer, out_dir, output, say)
