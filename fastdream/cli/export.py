"""`fastdream export DIR`: redo a run's mesh and turntables from its checkpoint (see fastdream.runs.export)."""
from __future__ import annotations

from .. import runs
from .options import integer, number


def _cmd_export(args) -> int:
    overrides = dict(mesh_resolution=args.mesh_resolution, mesh_threshold=args.threshold, video_frames=args.video_frames,
                     video_resolution=args.video_resolution)
    if args.no_video:
        overrides["video"] = False
    if args.no_mesh:
        overrides["mesh"] = False
    if args.texture:
        overrides["texture"] = True
    written = runs.export(args.dir, checkpoint=args.checkpoint, device=args.device, overrides=args.set or [], **overrides)
    for kind, path in written.items():
        print(f"{kind}: {path}")
    return 0


def add_parser(subparsers) -> None:
    e = subparsers.add_parser("export", help="redo a run's mesh and turntable videos from its latest checkpoint",
                              description="Re-export mesh.obj/.ply/.glb and turntables from a run folder's checkpoint.")
    e.add_argument("dir", help="output folder of a `fastdream run`")
    e.add_argument("--checkpoint", help="a specific checkpoint file (default: the latest in DIR/checkpoints)")
    e.add_argument("--mesh-resolution", type=integer(8), dest="mesh_resolution", help="marching-cubes lattice size (default 256)")
    e.add_argument("--threshold", type=number(), help="density iso-level of the surface (default 10)")
    e.add_argument("--video-frames", type=integer(1), dest="video_frames", help="frames per turntable (default 120)")
    e.add_argument("--video-resolution", type=integer(16), dest="video_resolution", help="turntable size in pixels (default 256)")
    e.add_argument("--texture", action="store_true", help="also bake a UV texture (needs xatlas)")
    e.add_argument("--no-video", action="store_true", dest="no_video", help="skip the turntables")
    e.add_argument("--no-mesh", action="store_true", dest="no_mesh", help="skip the mesh")
    e.add_argument("--device", help="cuda or cpu")
    e.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a configuration key (e.g. output.video_fps=24)")
    e.set_defaults(func=_cmd_export)
