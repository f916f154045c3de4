"""`fastdream view DIR`: serve a run's or a batch's report on localhost (see fastdream.view)."""
from __future__ import annotations

import sys

from ..errors import FastDreamError
from ..view import ViewServer, is_loopback
from .options import integer


def _cmd_view(args) -> int:
    if not is_loopback(args.host) and not args.allow_remote:
        raise FastDreamError(f"--host {args.host} would let other machines read this folder; the viewer binds to "
                             "127.0.0.1 unless you also pass --allow-remote.")
    server = ViewServer(args.dir, args.host, args.port)
    print(f"fastdream view: serving {server.root} at {server.url} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("view", help="serve a run's (or a batch's) report on localhost, updating live",
                              description="Serve the report page of a run folder, or the index of a batch folder, "
                                          "on http://127.0.0.1:PORT/; the page updates while the run writes.")
    p.add_argument("dir", help="output folder of a `fastdream run` or `fastdream batch`")
    p.add_argument("--port", type=integer(0), default=8765, help="port (default 8765; 0 picks a free one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--allow-remote", action="store_true", dest="allow_remote",
                   help="allow --host to be a non-loopback address (anyone who can reach it can read the folder)")
    p.set_defaults(func=_cmd_view)
