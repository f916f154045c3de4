"""The NeRF stage: a hash-grid radiance field rendered by ray marching, scored by SDS (DreamFusion).

Each step: pick the shading mode (albedo only for the first `shading.albedo_only_fraction` of the run,
then random), render the sampled cameras, score the renders with the guidance (view-dependent prompts
are the guidance's job: it gets the cameras), add the orientation loss and the opacity regularisers, and for image-to-3D the reconstruction of the input
photo at its fixed camera (colour inside the photo's mask, opacity toward the mask);
after the optimizer step, every `grid.update_every` steps (and once before the first), update the occupancy grid. Parameter groups:
the hash table at a higher learning rate than the MLPs, and the learned background.
"""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Dict, List

import torch

from ..ops import SHADING_MODES
from ..regularizers import opacity_terms, orientation_loss
from .base import Stage, StepLoss, StepPlan


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
        self.shading_rng = random.Random(config.seed)  # drawn on the host: no device read per step
        self.input_camera = None
        self.input_photo = None  # (3, R, R) the photo over the background, kept in checkpoints for previews/exports
        self.input_rgb = self.input_mask = None  # (1, H, W, 3), (1, H, W, 1) at the render resolution

    def set_input_view(self, photo, camera) -> None:
        import torch.nn.functional as F

        size = (camera.height, camera.width)
        rgba = torch.cat([photo.rgb * photo.mask, photo.mask])[None]
        rgba = F.interpolate(rgba, size=size, mode="bilinear", align_corners=False, antialias=True)[0]
        mask = rgba[3:].clamp(0, 1)
        rgb = torch.where(mask > 1e-4, rgba[:3] / mask.clamp_min(1e-4), torch.zeros_like(rgba[:3])).clamp(0, 1)
        self.input_photo = photo.on_background(self.config.background_color).cpu()
        self.input_camera = camera.to(self.device)
        self.input_rgb = rgb.permute(1, 2, 0)[None].to(self.device)
        self.input_mask = mask.permute(1, 2, 0)[None].to(self.device)

    def reconstruction_loss(self):
        """(colour term, opacity term) at the input camera: squared colour error inside the photo's mask, and
        squared error of the rendered opacity against the mask, each a mean over pixels."""
        out = self.renderer.render(self.input_camera, shading="albedo", need_normals=False)
        rgb = ((out.rgb - self.input_rgb) ** 2 * self.input_mask).mean()
        mask = ((out.opacity.reshape(self.input_mask.shape) - self.input_mask) ** 2).mean()
        return rgb, mask

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

    def choose_shading(self, step: int) -> str:
        s = self.config.shading
        u = self.shading_rng.random()
        if step < s.albedo_only_fraction * self.config.steps:
            return "albedo"
        probs = [s.albedo, s.lambertian, s.textureless]
        cdf = [sum(probs[:i + 1]) / sum(probs) for i in range(3)]
        return SHADING_MODES[min(sum(c <= u for c in cdf), 2)]

    def plan(self, step: int, progress: float) -> StepPlan:
        """The shading mode (a host draw), the regulariser weights and the active hash levels of this step."""
        shading = self.choose_shading(step)
        self.renderer.field.set_progress(progress)
        weights = self.config.reg.weights(progress)
        on = tuple(name for name, w in weights.items() if w > 0)  # which terms run: a term at weight 0 is skipped
        key = (shading, on, self.renderer.field.active_levels)
        # step 0 also updates the occupancy grid (a data-dependent pass) inside the loss
        return StepPlan(key=key, weights=weights, info={"shading": shading}, capturable=step > 0)

    def loss(self, cameras, step: int, progress: float, guidance, generator: torch.Generator,
             plan: StepPlan = None) -> StepLoss:
        cfg = self.config
        if step == 0:
            # The grid starts from the initial field (the blob), as instant-ngp's is updated from its first
            # step, rather than from "everything occupied": otherwise the first steps march and query
            # (normals included) every sample of the box, gigabytes of activations for samples of zero weight.
            self.update_grid(step, generator)
        plan = plan or self.plan(step, progress)
        shading = plan.info["shading"]
        reg = plan.weights  # host floats: which terms run; their values come from the plan's device weights, when bound
        background = (self.renderer.random_solid_background(cameras, cfg.random_background, generator)
                      if cfg.random_background > 0 else None)
        # the orientation loss needs normals on every step, albedo steps included
        out = self.renderer.render(cameras, shading=shading, need_normals=shading != "albedo" or reg["orient"] > 0,
                                   background=background)
        images = out.rgb.permute(0, 3, 1, 2)
        sds = guidance(images, cameras, shading, progress, opacity=out.opacity.permute(0, 3, 1, 2))
        loss = sds.loss
        terms = {"sds": sds.loss}
        for name, part in getattr(sds, "parts", {}).items():  # a joint guidance: each model's own (unweighted) SDS
            terms[f"sds_{name}"] = part.loss
        opacity = out.opacity.reshape(-1)
        names, values = self.regularizers(out.rays, opacity, plan)
        if names:  # their weighted sum as one dot with the step's weights (device values when bound)
            loss = loss + torch.dot(values, plan.weight_slice(names, values.device))
        if self.input_camera is not None:
            rgb, mask = self.reconstruction_loss()
            loss = loss + cfg.image.rgb_weight * rgb + cfg.image.mask_weight * mask
            terms["input_rgb"], terms["input_mask"] = rgb, mask
        n_rays = cfg.batch_size * cfg.width * cfg.height
        info = dict(plan.info)
        n_samples = torch.as_tensor(out.n_samples, device=opacity.device)  # a device count under fixed capacity
        # one op each (the grid's occupied fraction from its boolean cells, the mean t from the integer draws)
        metrics = {"sds_grad_norm": sds.grad_norm, "t": torch.mean(sds.t, dtype=torch.float32),
                   "occupancy": torch.mean(self.renderer.grid.binary, dtype=torch.float32),
                   "samples_per_ray": torch.div(n_samples, max(n_rays, 1))}
        return StepLoss(loss, terms, info, metrics, term_vector=(names, values))

    @staticmethod
    def regularizers(rays, opacity: torch.Tensor, plan: StepPlan):
        """The regularisers that run this step: (their names, in the order of ``plan.weights``; their values as one
        vector). The orientation loss runs at a weight > 0 when the render has normals; the opacity entropy and
        sparsity come from one autograd node, so both run (and are reported) when either weight is > 0."""
        reg, names, parts = plan.weights, (), []
        if reg["orient"] > 0 and rays is not None and rays.sample_normals is not None:
            orient = orientation_loss(rays.weights, rays.sample_normals, rays.directions, rays.ray_indices,
                                      opacity=opacity)
            names, parts = ("orient",), [orient]
        if reg["entropy"] > 0 or reg["sparsity"] > 0:
            names, parts = names + ("entropy", "sparsity"), parts + list(opacity_terms(opacity))
        return (names, torch.stack(parts)) if parts else ((), None)

    def after_step(self, step: int, generator: torch.Generator) -> None:
        if (step + 1) % self.config.grid.update_every == 0:
            self.update_grid(step, generator)

    def update_grid(self, step: int, generator: torch.Generator) -> None:
        field, step_size = self.renderer.field, self.renderer.step_size
        self.renderer.grid.update(step, lambda x: field.density(x) * step_size, generator=generator)

    def state_dict(self) -> Dict[str, Any]:
        state = {"renderer": self.renderer.state_dict(), "shading_rng": self.shading_rng.getstate()}
        if self.input_photo is not None:
            state["input_photo"] = (self.input_photo * 255).round().to(torch.uint8)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.renderer.load_state_dict(state["renderer"])
        if "shading_rng" in state:
            self.shading_rng.setstate(state["shading_rng"])
        if "input_photo" in state:
            self.input_photo = state["input_photo"].float() / 255

    def _input_view(self):
        """(photo, its camera) for previews of an image-to-3D run, else None."""
        if self.input_photo is None:
            return None
        from ..cameras import orbit_cameras

        im = self.config.image
        camera = orbit_cameras(1, 64, 64, elevation_deg=im.elevation, distance=im.distance * self.scene_radius,
                               fov_y_deg=im.fov)
        return self.input_photo, camera

    def view_distance(self, output) -> float:
        from ..export import view_distance

        return view_distance(self.scene_radius, output)

    def preview(self, path: Path, output) -> Path:
        from ..export import write_preview

        return write_preview(self.renderer, path, output.preview_views, output.preview_resolution,
                             output.video_elevation, self.view_distance(output), output.view_fov,
                             input_view=self._input_view())

    def export(self, out_dir: Path, output, say: Callable[..., None]) -> Dict[str, str]:
        from ..export import export_outputs

        return export_outputs(self.renderer, out_dir, output, say, input_photo=self.input_photo)
