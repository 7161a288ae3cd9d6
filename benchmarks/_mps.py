"""NVIDIA MPS for one benchmark run: packed trials on one GPU overlap their kernels instead of
taking turns.

Without MPS, the processes of trials packed on one GPU (``train.gpus_per_worker: 0.25``) time-slice
it: only one process's kernels run at a time, so packing fills only the gaps where a trial's GPU is
idle (host work, data, evaluation). Under MPS, the kernels of several processes share the SMs at once.

This starts a private MPS control daemon (its pipe and log folders in a temp folder, so it serves
only the processes that inherit this environment: this one and the Ray workers it starts) and quits
it afterwards. It changes no setting of the card. On a cluster, MPS is a node's setting: start
``nvidia-cuda-mps-control -d`` on the GPU nodes (cluster/README.md).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["mps_daemon", "mps_servers"]

_CONTROL = "nvidia-cuda-mps-control"
_ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")


def _control(command: str) -> str:
    done = subprocess.run([_CONTROL], input=f"{command}\n", capture_output=True, text=True, timeout=60)
    return done.stdout.strip()


@contextlib.contextmanager
def mps_daemon() -> Iterator[Path]:
    """A private MPS daemon while the block runs; call before ``ray.init`` so Ray's workers inherit it."""
    if shutil.which(_CONTROL) is None:
        raise RuntimeError(f"--mps: {_CONTROL} is not on PATH (it comes with the NVIDIA driver)")
    root = Path(tempfile.mkdtemp(prefix="passray-mps-"))
    saved = {key: os.environ.get(key) for key in _ENV}
    for key, folder in zip(_ENV, ("pipe", "log")):
        (root / folder).mkdir()
        os.environ[key] = str(root / folder)
    try:
        subprocess.run([_CONTROL, "-d"], check=True, timeout=60)
        yield root
    finally:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            _control("quit")
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(root, ignore_errors=True)


def mps_servers() -> int:
    """MPS servers the daemon of this environment runs (one per user once a client connected): 0 means
    no process went through MPS."""
    return len(_control("get_server_list").split())
