"""The mesh stage: Magic3D's coarse-to-fine refinement of the NeRF stage's result as a textured mesh.

The surface is a deformable tetrahedral grid (DMTet, `fastdream.dmtet`): a signed distance and a bounded
offset per grid vertex, extracted every step by differentiable marching tetrahedra and rasterized at
`mesh.resolution` (512: Stable Diffusion's own resolution, so SDS runs on the 64x64 latent of the render
itself with no upsampling). Appearance is a hash-grid field queried at the surface (its albedo output);
the background is the NeRF stage's background model. All three start from the trained NeRF stage
(`init_from`): the signed distance from its density at `output.mesh_threshold` (the level set the mesh
export uses), the colour field and the background as copies of its own. The NeRF stage's renderer is
kept, frozen, so that the coarse result is exported next to the refined one (`coarse/`).

Each step: draw the shading (the run's probabilities; no albedo-only phase, the colours are already
trained), render the sampled cameras, score them with the run's guidance (timesteps up to `mesh.t_max`),
add normal consistency and Laplacian smoothness of the extracted mesh, and for image-to-3D the
reconstruction of the input photo rendered at its camera (as the NeRF stage). Defaults follow
threestudio's ``magic3d-refine-sd.yaml`` (see `fastdream.config.MeshStageConfig`); unlike it, the
signed distance starts from the NeRF's density iso-surface rather than threestudio's conversion at
level 25 by default, the background stays the learned one of the NeRF stage (threestudio's refine
config learns a new environment map), and the cameras are the run's.
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import torch
from torch import nn

from ..ops import SHADING_MODES
from .base import Stage, StepLoss
from .nerf import NeRFStage, build_run_renderer


@dataclass
class MeshViewOutput:
    """What previews and turntables read from a render (as `renderer.RenderOutput`)."""
    rgb: torch.Tensor      # (B, H, W, 3) over the background
    opacity: torch.Tensor  # (B, H, W, 1)
    normal: torch.Tensor   # (B, H, W, 3)
    depth: torch.Tensor    # (B, H, W, 1)


class MeshModel(nn.Module):
    """The refined asset: DMTet geometry, colour field and background, rendered by rasterization. It
    answers `render(cameras, shading=...)` and has a `field` with the scene box, as `renderer.Renderer`
    does, so previews, turntables and the texture bake take it in the renderer's place."""

    def __init__(self, config):
        super().__init__()
        from ..dmtet import DMTetGeometry
        from ..field import BackgroundModel, HashGridField

        self.geometry = DMTetGeometry(config.mesh.tet_resolution, config.aabb)
        self.field = HashGridField(config.aabb, config.field)
        self.background = BackgroundModel(config.background, config.background_color)

    def albedo(self, points: torch.Tensor) -> torch.Tensor:
        return self.field.query(points, need_normals=False)[1]

    def render(self, cameras, shading: str = "albedo", need_normals: bool = False,
               background: Optional[torch.Tensor] = None) -> MeshViewOutput:
        """Render whole images over `background` (per-pixel colours), by default the background model."""
        from ..mesh_renderer import render_mesh

        verts, faces = self.geometry.extract()
        out = render_mesh(verts, faces, cameras, color_fn=self.albedo, shading=shading,
                          background=self.background if background is None else background)
        return MeshViewOutput(rgb=out.rgb, opacity=out.opacity, normal=out.normal, depth=out.depth)

    @torch.no_grad()
    def trimesh(self, min_component: float = 0.0):
        """The extracted surface as a trimesh.Trimesh with per-vertex albedo (None when empty); connected
        pieces with fewer faces than `min_component` of the largest are dropped (as `export.extract_mesh`)."""
        import trimesh

        from ..export import query_albedo

        verts, faces = self.geometry.extract()
        if faces.shape[0] == 0:
            return None
        v = verts.detach().float().cpu().numpy()
        mesh = trimesh.Trimesh(vertices=v, faces=faces.cpu().numpy(), process=True)
        if min_component > 0:
            parts = mesh.split(only_watertight=False)
            if len(parts) > 1:
                sizes = np.array([len(p.faces) for p in parts])
                mesh = trimesh.util.concatenate([p for p, n in zip(parts, sizes) if n >= min_component * sizes.max()])
        albedo = query_albedo(self.field, np.asarray(mesh.vertices))
        rgba = np.concatenate([albedo, np.ones((len(albedo), 1), np.float32)], 1)
        mesh.visual = trimesh.visual.ColorVisuals(mesh, vertex_colors=(rgba * 255).round().astype(np.uint8))
        return mesh


class MeshStage(Stage):
    name = "mesh"

    def __init__(self, config, device: torch.device):
        super().__init__(config, device)
        self.model = MeshModel(config).to(device)
        self.model.train()
        # The NeRF stage's renderer, frozen: exported as the coarse result next to the refined mesh.
        self.coarse = build_run_renderer(config, device).requires_grad_(False).eval()
        self.shading_rng = random.Random(config.seed + 2)  # drawn on the host: no device read per step
        self.input_camera = self.input_photo = None
        self.input_rgb = self.input_mask = None

    # ------------------------------------------------------------------ the run
    @classmethod
    def n_steps(cls, config) -> int:
        return config.mesh.steps

    @classmethod
    def can_follow(cls, previous) -> bool:
        return previous == NeRFStage.name

    def init_from(self, previous: Stage) -> None:
        """Start from the trained NeRF stage: its renderer kept as the coarse result, its colour field and
        background copied, the tetrahedral grid's zero level set at its density iso-surface."""
        if not isinstance(previous, NeRFStage):
            super().init_from(previous)
        renderer = previous.renderer
        self.coarse.load_state_dict(renderer.state_dict())
        self.model.field.load_state_dict(renderer.field.state_dict())
        self.model.background.load_state_dict(renderer.background.state_dict())
        o = self.config.output
        self.model.geometry.init_from_density(self.coarse.field.density, o.mesh_threshold,
                                              mesh_resolution=o.mesh_resolution, min_component=o.mesh_min_component)
        if previous.input_photo is not None:
            self.input_photo = previous.input_photo

    def image_size(self):
        r = self.config.mesh.resolution
        return r, r

    def guidance_options(self) -> Dict[str, Any]:
        # The coarse shape is settled: timesteps up to mesh.t_max only refine detail (threestudio's
        # max_step_percent 0.5), without the NeRF stage's annealing.
        return {"t_max": self.config.mesh.t_max, "t_max_end": None, "t_min_end": None}

    @property
    def scene_radius(self) -> float:
        return self.model.field.scene_radius

    @property
    def renderer(self) -> MeshModel:
        return self.model

    def train(self, mode: bool = True) -> "MeshStage":
        self.model.train(mode)
        return self

    def param_groups(self, optim) -> List[Dict[str, Any]]:
        m, cfg = self.model, self.config.mesh
        groups = [{"params": [p for p in m.geometry.parameters() if p.requires_grad], "lr": cfg.lr_geometry,
                   "name": "geometry"},
                  {"params": [m.field.encoding_params], "lr": cfg.lr_hash, "name": "hash"},
                  {"params": list(m.field.mlp_parameters()), "lr": cfg.lr_mlp, "name": "mlp"}]
        bg = [p for p in m.background.parameters() if p.requires_grad]
        if bg:
            groups.append({"params": bg, "lr": cfg.lr_background, "name": "background"})
        return groups

    # ------------------------------------------------------------------ one step
    def set_input_view(self, photo, camera) -> None:
        NeRFStage.set_input_view(self, photo, camera)  # the same targets, at this stage's render size

    def choose_shading(self) -> str:
        s = self.config.shading
        u = self.shading_rng.random()
        probs = [s.albedo, s.lambertian, s.textureless]
        cdf = [sum(probs[:i + 1]) / sum(probs) for i in range(3)]
        return SHADING_MODES[min(sum(c <= u for c in cdf), 2)]

    def loss(self, cameras, step: int, progress: float, guidance, generator: torch.Generator, plan=None) -> StepLoss:
        from ..regularizers import laplacian_smoothness, normal_consistency

        cfg = self.config
        shading = self.choose_shading()
        m = self.model
        verts, faces = m.geometry.extract()
        background = (self.coarse.random_solid_background(cameras, cfg.random_background, generator)
                      if cfg.random_background > 0 else None)
        from ..mesh_renderer import render_mesh

        out = render_mesh(verts, faces, cameras, color_fn=m.albedo, shading=shading,
                          background=m.background if background is None else background)
        sds = guidance(out.rgb.permute(0, 3, 1, 2), cameras, shading, progress)
        loss, terms = sds.loss, {"sds": sds.loss.detach()}
        for name, part in getattr(sds, "parts", {}).items():  # a joint guidance: each model's own (unweighted) SDS
            terms[f"sds_{name}"] = part.loss.detach()
        if cfg.mesh.normal_consistency > 0:
            nc = normal_consistency(verts, faces)
            loss = loss + cfg.mesh.normal_consistency * nc
            terms["normal_consistency"] = nc.detach()
        if cfg.mesh.laplacian > 0:
            lap = laplacian_smoothness(verts, faces)
            loss = loss + cfg.mesh.laplacian * lap
            terms["laplacian"] = lap.detach()
        if self.input_camera is not None:
            view = render_mesh(verts, faces, self.input_camera, color_fn=m.albedo, shading="albedo",
                               background=m.background)
            rgb = ((view.rgb - self.input_rgb) ** 2 * self.input_mask).mean()
            mask = ((view.opacity.reshape(self.input_mask.shape) - self.input_mask) ** 2).mean()
            loss = loss + cfg.image.rgb_weight * rgb + cfg.image.mask_weight * mask
            terms["input_rgb"], terms["input_mask"] = rgb.detach(), mask.detach()
        info = {"shading": shading}
        metrics = {"sds_grad_norm": sds.grad_norm, "t": sds.t.float().mean(),
                   "mesh_faces": torch.tensor(float(faces.shape[0]))}
        return StepLoss(loss, terms, info, metrics)

    # ------------------------------------------------------------------ state
    def state_dict(self) -> Dict[str, Any]:
        state = {"mesh_model": self.model.state_dict(), "coarse_renderer": self.coarse.state_dict(),
                 "shading_rng": self.shading_rng.getstate()}
        if self.input_photo is not None:
            state["input_photo"] = (self.input_photo * 255).round().to(torch.uint8)
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.model.load_state_dict(state["mesh_model"])
        self.coarse.load_state_dict(state["coarse_renderer"])
        self.shading_rng.setstate(state["shading_rng"])
        if "input_photo" in state:
            self.input_photo = state["input_photo"].float() / 255

    # ------------------------------------------------------------------ outputs
    def _input_view(self):
        return NeRFStage._input_view(self)

    def preview(self, path: Path, output) -> Path:
        from ..export import view_distance, write_preview

        return write_preview(self.model, path, output.preview_views, output.preview_resolution, output.video_elevation,
                             view_distance(self.scene_radius, output), output.view_fov, input_view=self._input_view())

    def export(self, out_dir: Path, output, say: Callable[..., None]) -> Dict[str, str]:
        """The refined mesh (with a UV texture baked from the colour field when xatlas is installed) as
        mesh.obj/.ply/.glb, its turntables, and the NeRF stage's outputs under coarse/."""
        from ..export import bake_texture, export_outputs, write_mesh

        out_dir = Path(out_dir)
        written: Dict[str, str] = {}
        if output.mesh or output.video:
            coarse_dir = out_dir / "coarse"
            coarse_dir.mkdir(parents=True, exist_ok=True)
            say(f"the NeRF stage's outputs -> {coarse_dir}")
            coarse = export_outputs(self.coarse, coarse_dir, output, say, input_photo=self.input_photo)
            written.update({f"coarse_{k}": v for k, v in coarse.items()})
        was_training = self.model.training
        self.model.eval()
        try:
            if output.mesh:
                mesh = self.model.trimesh(output.mesh_min_component)
                if mesh is None:
                    say("the refined mesh is empty; no mesh written")
                else:
                    texture = bake_texture(self.model.field, mesh, out_dir, output.texture_resolution)
                    written.update({k: str(p) for k, p in write_mesh(mesh, out_dir, "mesh", texture).items()})
                    say(f"refined mesh: {len(mesh.vertices)} vertices, {len(mesh.faces)} faces -> "
                        f"{out_dir / 'mesh.obj'}, .ply, .glb")
            if output.video:
                videos = copy.copy(output)
                videos.mesh = False
                written.update(export_outputs(self.model, out_dir, videos, say, input_photo=self.input_photo))
        finally:
            self.model.train(was_training)
        return written
