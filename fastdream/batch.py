"""`fastdream batch`: every prompt of a file through `fastdream run`, on all local GPUs or a Ray cluster.

    fastdream batch prompts.txt --out runs/                      # all local GPUs, one worker each
    fastdream batch prompts.txt --out runs/ --gpus 0,2 --steps 5000 --set optim.lr_hash=0.02
    fastdream batch prompts.txt --out /shared/runs --ray auto    # a running Ray cluster (or ray://HOST:10001)
    fastdream batch prompts.txt --out runs/ --ray local          # a Ray instance on this machine

Prompts: one a line, blank lines and ``#`` comments ignored, repeats kept once. Each prompt gets its own
folder ``DIR/<slug>-<hash>`` (the prompt in lowercase words joined by dashes, cut to 60 characters, and
8 hex digits of its SHA-1, so names are stable when the file is reordered or extended) holding exactly
what `fastdream run` writes there. ``DIR/summary.json`` lists every prompt with its status (done,
skipped, failed, interrupted, pending), folder, seconds, exit code, worker and error, and is rewritten
atomically whenever a prompt finishes; each prompt's output goes to ``DIR/logs/<folder>.log``. At the end
``DIR/index.html`` shows one card per prompt (thumbnail, status, time, CLIP R-Precision from any
`fastdream eval --json` report saved in DIR) linking to each run's report.html.

Isolation: each prompt runs as its own process (``python -m fastdream.cli run PROMPT --out FOLDER ...``),
so a crash, an out-of-memory or a hung CUDA context in one prompt cannot take the batch (or the other
prompts) down; the cost is a second or two of interpreter start per prompt, nothing next to a run.
Options for the runs are passed through unchanged: ``--steps --seed --model --guidance --reference-scene
--device --config --set`` and, for anything else, ``--run-arg=--FLAG`` (repeatable).

Resuming: run the same command again. A prompt whose folder holds ``metrics.json`` (written by `fastdream
run` when it finishes) is skipped; when the batch's options (``--steps``, ``--set``, ...) differ from the
configuration that run was made with, the skip is printed with the differences (and listed under
``changed`` in the summary), since a finished run is never overwritten. A half-written folder (interrupted, crashed, machine lost) is resumed
from its newest checkpoint (``--resume``) when it has one, and restarted from scratch (``--force``)
otherwise. Prompts that failed are retried on the next invocation.

Local scheduling: one worker per GPU (``--gpus 0,1,...``; default every visible GPU), each worker running
its prompts one after another with ``CUDA_VISIBLE_DEVICES`` set to its GPU; without a GPU (or with
``--device cpu``) one worker on the CPU (``--workers N`` for more).

Ray (the optional extra ``pip install 'fastdream[cluster]'``): ``--ray ADDRESS`` connects to a cluster
(``auto``, ``HOST:6379`` or ``ray://HOST:10001``), ``--ray local`` starts (or reuses) a Ray instance here.
Each prompt is one task asking for one GPU (``num_gpus=1``; Ray sets ``CUDA_VISIBLE_DEVICES``), or one CPU
(``--cpus-per-task``) on a cluster without GPUs; a task that loses its node is retried once by Ray. The
output folder must be on storage that every node sees (NFS, a shared mount), because tasks write the
runs there and the driver checks them to skip finished prompts. fastdream must be installed on every node.

Exit code: 0 when every prompt is done or skipped, 1 when any failed (the summary says which and why),
130 when interrupted (running prompts are stopped; rerun to resume them).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .errors import FastDreamError

log = logging.getLogger("fastdream.batch")

FINISHED_MARKER = "metrics.json"
SUMMARY = "summary.json"
RAY_HINT = "pip install 'fastdream[cluster]'  (or: pip install ray)"


# ---------------------------------------------------------------------------------------------- jobs

def prompt_folder_name(prompt: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:60].rstrip("-") or "prompt"
    return f"{slug}-{hashlib.sha1(prompt.encode('utf-8')).hexdigest()[:8]}"


def is_finished(folder: Path) -> bool:
    """A run is finished when `fastdream run` has written metrics.json (its last output)."""
    marker = Path(folder) / FINISHED_MARKER
    if not marker.is_file():
        return False
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return not (isinstance(data, dict) and data.get("finished") is False)


def changed_options(folder: Path, config_file: Optional[str], overrides: Sequence[str],
                    flags: Dict[str, Any]) -> List[str]:
    """What this batch's run options (a config file, --set overrides and the dedicated flags of `fastdream run`)
    would change in the configuration a finished run in folder was made with, as "key: old -> new" ([] when
    nothing, or when the folder has no readable config.yaml)."""
    from .config import build_config, config_to_dict, load_config_file
    from .runs import apply_flags

    config_path = Path(folder) / "config.yaml"
    if not config_path.is_file():
        return []
    try:
        saved = load_config_file(config_path)
        before = _flatten(config_to_dict(saved))  # build_config below updates saved in place
        wanted = build_config(config_file, list(overrides), saved)
        apply_flags(wanted, {k: v for k, v in flags.items() if v is not None})
    except FastDreamError:  # options `fastdream run` itself will report
        return []
    after = _flatten(config_to_dict(wanted))
    return [f"{key}: {before[key]!r} -> {after.get(key)!r}" for key in before
            if key != "prompt" and after.get(key) != before[key]]


def _flatten(tree: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def has_checkpoint(folder: Path) -> bool:
    ckpt = Path(folder) / "checkpoints"
    return ckpt.is_dir() and any(ckpt.glob("step_*.pt"))


def run_command(prompt: str, folder: Path, run_args: Sequence[str], python: Optional[str] = None) -> List[str]:
    """The `fastdream run` command line for one prompt; a half-written folder is resumed or restarted."""
    cmd = [python or sys.executable, "-m", "fastdream.cli", "run", prompt, "--out", str(folder)]
    folder = Path(folder)
    if folder.is_dir() and any(folder.iterdir()):
        cmd.append("--resume" if has_checkpoint(folder) else "--force")
    return cmd + list(run_args)


def _error_from_log(log_path: Path, returncode: int) -> str:
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        lines = []
    starts = [i for i, ln in enumerate(lines) if ln.startswith("==== ")]
    lines = lines[starts[-1] + 1:] if starts else lines  # this attempt only
    for line in reversed(lines):
        if ": error:" in line and line.startswith("fastdream"):
            return line.strip()
    if returncode < 0:
        name = signal.Signals(-returncode).name if -returncode in signal.Signals._value2member_map_ else str(-returncode)
        extra = " (killed: out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"the run was killed by signal {name}{extra}; see {log_path}"
    nonblank = [ln.rstrip() for ln in lines if ln.strip()]
    if any(ln.startswith("Traceback (most recent call last)") for ln in nonblank):
        return f"`fastdream run` crashed (exit code {returncode}): {nonblank[-1].strip()[:2000]}; traceback in {log_path}"
    tail = nonblank[-5:]
    return (f"`fastdream run` exited with code {returncode}: " + " | ".join(s.strip() for s in tail))[:4000] \
        if tail else f"`fastdream run` exited with code {returncode}; see {log_path}"


def _set_pdeathsig() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Linux: the run dies with the process that started it (a killed batch leaves no orphans)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def execute(job: Dict[str, Any], env: Optional[Dict[str, str]] = None,
            on_start: Optional[Callable[[subprocess.Popen], None]] = None) -> Dict[str, Any]:
    """Run one prompt as a subprocess; returns its result record. Used by local workers and Ray tasks."""
    import socket

    folder, log_path = Path(job["folder"]), Path(job["log"])
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = run_command(job["prompt"], folder, job["run_args"])
    full_env = dict(os.environ)
    full_env.update(env or {})
    full_env.setdefault("PYTHONUNBUFFERED", "1")
    t0 = time.time()
    with open(log_path, "a", encoding="utf-8") as fh:
        fh.write(f"\n==== {time.strftime('%Y-%m-%d %H:%M:%S')} on {socket.gethostname()} "
                 f"(CUDA_VISIBLE_DEVICES={full_env.get('CUDA_VISIBLE_DEVICES', '')}): {' '.join(cmd)}\n")
        fh.flush()
        try:
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                                    preexec_fn=_set_pdeathsig if sys.platform.startswith("linux") else None)
        except OSError as exc:
            return {"status": "failed", "returncode": None, "seconds": 0.0, "error": f"could not start the run: {exc}"}
        if on_start is not None:
            on_start(proc)
        rc = proc.wait()
    seconds = round(time.time() - t0, 2)
    if rc == 0 and is_finished(folder):
        return {"status": "done", "returncode": 0, "seconds": seconds, "error": None}
    if rc == 0:
        return {"status": "failed", "returncode": 0, "seconds": seconds,
                "error": f"`fastdream run` exited normally but {folder / FINISHED_MARKER} was not written; see {log_path}"}
    if rc in (130, -signal.SIGINT, -signal.SIGTERM) and job.get("_stopping"):
        return {"status": "interrupted", "returncode": rc, "seconds": seconds, "error": "stopped with the batch"}
    return {"status": "failed", "returncode": rc, "seconds": seconds, "error": _error_from_log(log_path, rc)}


# ---------------------------------------------------------------------------------------------- summary

class Summary:
    """The per-prompt records and DIR/summary.json (rewritten atomically on every change)."""

    def __init__(self, out: Path, prompts_file: str, mode: str, workers: List[str], run_args: Sequence[str]):
        self.path = out / SUMMARY
        self.lock = threading.Lock()
        self.t0 = time.time()
        self.head = {"prompts_file": prompts_file, "out": str(out), "mode": mode, "workers": workers,
                     "run_args": list(run_args), "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.records: List[Dict[str, Any]] = []

    def add(self, record: Dict[str, Any]) -> None:
        with self.lock:
            self.records.append(record)

    def update(self, record: Dict[str, Any], **values) -> None:
        with self.lock:
            record.update(values)
            self._write_locked()

    def counts(self) -> Dict[str, int]:
        counts: Dict[str, int] = {}
        for r in self.records:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        return counts

    def write(self, finished: bool = False) -> None:
        with self.lock:
            self._write_locked(finished)

    def _write_locked(self, finished: bool = False) -> None:
        data = dict(self.head)
        data.update({"finished": finished, "seconds": round(time.time() - self.t0, 2), "counts": self.counts(),
                     "prompts": [{k: v for k, v in r.items() if not k.startswith("_")} for r in self.records]})
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.path)


# ---------------------------------------------------------------------------------------------- schedulers

def _visible_gpus() -> List[str]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is not None:
        return [g.strip() for g in env.split(",") if g.strip() and g.strip() != "-1"]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    except Exception:  # pragma: no cover
        return []


def _local_slots(gpus: Optional[str], workers: Optional[int], device: Optional[str]) -> List[Optional[str]]:
    """One entry per worker: a GPU id for CUDA_VISIBLE_DEVICES, or None for a CPU worker."""
    if device is not None and device.startswith("cuda:"):
        raise FastDreamError(f"--device {device} pins every prompt to one GPU; leave --device out (or use 'cuda') and "
                             "choose GPUs with --gpus, which gives each worker its own GPU.")
    if device == "cpu" or (gpus is not None and gpus.strip().lower() in ("none", "cpu", "")):
        return [None] * max(1, workers or 1)
    if gpus is None or gpus.strip().lower() == "all":
        ids = _visible_gpus()
        if not ids:
            if device == "cuda":
                raise FastDreamError("--device cuda was given but no GPU is visible (CUDA_VISIBLE_DEVICES / torch).")
            return [None] * max(1, workers or 1)
    else:
        ids = [g.strip() for g in gpus.split(",") if g.strip()]
        if not all(re.fullmatch(r"\d+|GPU-[0-9a-fA-F-]+|MIG-[0-9a-zA-Z/-]+", g) for g in ids):
            raise FastDreamError(f"--gpus expects GPU indices like 0,1,3 (or 'all' / 'none'), got {gpus!r}.")
    per_gpu = max(1, workers or 1) if gpus is not None and workers else 1
    return [g for g in ids for _ in range(per_gpu)]


def run_local(jobs: List[Dict[str, Any]], summary: Summary, slots: List[Optional[str]], say) -> None:
    """Worker threads (one per slot) pull prompts from a shared queue; each prompt is a subprocess."""
    import queue

    todo: "queue.Queue[Dict[str, Any]]" = queue.Queue()
    for job in jobs:
        todo.put(job)
    running: Dict[int, subprocess.Popen] = {}
    stopping = threading.Event()
    lock = threading.Lock()

    def worker(slot_index: int, gpu: Optional[str]) -> None:
        name = f"gpu{gpu}" if gpu is not None else f"cpu{slot_index}"
        env = {"CUDA_VISIBLE_DEVICES": gpu} if gpu is not None else {}
        while not stopping.is_set():
            try:
                job = todo.get_nowait()
            except queue.Empty:
                return
            record = job["_record"]
            summary.update(record, status="running", worker=name)

            def started(proc, _i=slot_index):
                with lock:
                    running[_i] = proc
                if stopping.is_set():
                    proc.terminate()

            if stopping.is_set():
                job["_stopping"] = True
            result = execute(job, env=env, on_start=started)
            with lock:
                running.pop(slot_index, None)
            if stopping.is_set() and result["status"] != "done":
                result["status"], result["error"] = "interrupted", "stopped with the batch"
            summary.update(record, **result)
            say(record)

    threads = [threading.Thread(target=worker, args=(i, g), daemon=True, name=f"fastdream-batch-{i}")
               for i, g in enumerate(slots)]
    for t in threads:
        t.start()
    try:
        while any(t.is_alive() for t in threads):
            for t in threads:
                t.join(timeout=0.2)
    except BaseException:
        stopping.set()
        for job in jobs:
            job["_stopping"] = True
        with lock:
            procs = list(running.values())
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.time() + 30
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
        for t in threads:
            t.join(timeout=5)
        raise


def _ray_task(job: Dict[str, Any]) -> Dict[str, Any]:
    """Body of one Ray task: runs on whichever node Ray picked (Ray has set CUDA_VISIBLE_DEVICES)."""
    import socket

    result = execute(job)
    result["worker"] = f"{socket.gethostname()}:gpu{os.environ.get('CUDA_VISIBLE_DEVICES', '')}" \
        if os.environ.get("CUDA_VISIBLE_DEVICES") else f"{socket.gethostname()}:cpu"
    return result


def import_ray():
    try:
        import ray  # noqa: F401
    except ImportError as exc:
        raise FastDreamError(f"`fastdream batch --ray` needs Ray, which is not installed ({exc}). Install the cluster "
                             f"extra: {RAY_HINT}, on this machine and every node of the cluster.") from None
    return ray


def connect_ray(address: str):
    ray = import_ray()
    if ray.is_initialized():
        return ray
    try:
        if address == "local":
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    except Exception as exc:
        raise FastDreamError(f"Could not connect to the Ray cluster at {address!r} ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}). Start one with `ray start --head` "
                             "(then --ray auto), pass its address (HOST:6379 or ray://HOST:10001), or use --ray local.") from None
    return ray


def run_ray(jobs: List[Dict[str, Any]], summary: Summary, address: str, device: Optional[str],
            cpus_per_task: float, say) -> None:
    ray = connect_ray(address)
    resources = ray.cluster_resources()
    use_gpu = resources.get("GPU", 0) >= 1 and device != "cpu"
    if device == "cuda" and not use_gpu:
        raise FastDreamError("--device cuda was given but the Ray cluster has no GPUs.")
    options = {"num_gpus": 1, "num_cpus": cpus_per_task} if use_gpu else {"num_cpus": cpus_per_task}
    summary.head["ray"] = {"address": address, "resources": {k: v for k, v in resources.items() if k in ("CPU", "GPU")},
                           "task_resources": options}
    remote = ray.remote(max_retries=1)(_ray_task).options(**options)
    pending = {}
    for job in jobs:
        ref = remote.remote({k: v for k, v in job.items() if not k.startswith("_")})
        pending[ref] = job
        summary.update(job["_record"], status="queued")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                job = pending.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the task itself died (node lost twice, worker crash)
                    result = {"status": "failed", "returncode": None, "seconds": None,
                              "error": f"Ray task failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                summary.update(job["_record"], **result)
                say(job["_record"])
    except BaseException:
        for ref, job in pending.items():
            ray.cancel(ref, force=True)
            summary.update(job["_record"], status="interrupted", error="stopped with the batch")
        raise


def run_batch(prompts_file, out, run_args: Sequence[str], *, ray: Optional[str] = None, gpus: Optional[str] = None,
              workers: Optional[int] = None, device: Optional[str] = None, cpus_per_task: float = 1.0,
              changes: Optional[Callable[[Path], List[str]]] = None, echo: Callable[..., None] = print) -> int:
    """Run every prompt of `prompts_file` (see the module docstring) with `fastdream run` arguments `run_args`;
    returns the exit code (0 all done or skipped, 1 some failed, 130 interrupted). `changes(folder)` says what
    these arguments would change in a finished run's configuration (see changed_options). Progress goes to `echo`."""
    from .evaluate import read_prompts
    from .report import write_index

    prompts = read_prompts(prompts_file)
    out = Path(out).expanduser().resolve()
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FastDreamError(f"Cannot create the output folder {out}: {exc}.") from None
    run_args = list(run_args)

    if ray:
        mode, workers = "ray", [f"ray:{ray}"]
    else:
        slots = _local_slots(gpus, workers, device)
        mode, workers = "local", [f"gpu{g}" if g is not None else f"cpu{i}" for i, g in enumerate(slots)]
    summary = Summary(out, str(prompts_file), mode, workers, run_args)

    jobs = []
    for prompt in prompts:
        folder = out / prompt_folder_name(prompt)
        record = {"prompt": prompt, "folder": str(folder), "status": "pending", "seconds": None,
                  "returncode": None, "worker": None, "error": None, "log": str(out / "logs" / f"{folder.name}.log")}
        summary.add(record)
        if is_finished(folder):
            record["status"] = "skipped"
            record["error"] = None
            changed = changes(folder) if changes is not None else []
            if changed:
                record["changed"] = changed
                echo(f"fastdream batch: skipping {prompt!r}: finished earlier with other options "
                      f"({'; '.join(changed)}); delete {folder} (or use another --out) to run it with these.",
                      flush=True)
            continue
        jobs.append({"prompt": prompt, "folder": str(folder), "log": record["log"], "run_args": run_args,
                     "_record": record})
    summary.write()
    n_total, n_skip = len(prompts), len(prompts) - len(jobs)
    echo(f"fastdream batch: {n_total} prompts, {n_skip} already finished, {len(jobs)} to run "
          f"({'Ray at ' + ray if ray else ', '.join(workers)}); summary: {summary.path}", flush=True)

    counter = {"n": n_skip}
    count_lock = threading.Lock()

    def say(record):
        with count_lock:
            counter["n"] += 1
            n = counter["n"]
        secs = f"{record['seconds']:.1f}s" if isinstance(record.get("seconds"), (int, float)) else "-"
        line = f"[{n}/{n_total}] {record['status']:<11} {secs:>8}  {record['prompt']}"
        if record["status"] == "failed":
            line += f"\n    error: {record['error']}\n    log: {record['log']}"
        echo(line, flush=True)

    previous = signal.getsignal(signal.SIGTERM)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        if jobs:
            if ray:
                run_ray(jobs, summary, ray, device, cpus_per_task, say)
            else:
                run_local(jobs, summary, slots, say)
    except KeyboardInterrupt:
        for r in summary.records:
            if r["status"] in ("running", "pending", "queued"):
                r["status"], r["error"] = "interrupted", "stopped with the batch"
        summary.write(finished=False)
        write_index(out)
        echo(f"fastdream batch: interrupted; rerun the same command to resume. Summary: {summary.path}", file=sys.stderr)
        return 130
    finally:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, previous)
    summary.write(finished=True)
    counts = summary.counts()
    echo("fastdream batch: " + ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) + f"; summary: {summary.path}; "
         f"index: {write_index(out)}")
    return 1 if counts.get("failed") else 0


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt
