"""Whole training steps under DDP as replayed CUDA graphs, the all-reduce captured with them (two GPUs;
``train.ddp_cuda_graph``).

Two NCCL ranks train the same network from the same weights on their own batches, once with eager
steps and once through ``engine.Step``'s graph (11 eager DDP steps, the capture, replays): the
losses of every step and the weights after them must agree, and so must the ranks' weights (the
replayed all-reduce really averaged their gradients). A hang fails the test after a timeout, naming
where each rank was (each writes its progress to a file as it goes).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import free_port

from passray import engine
from passray.config import load_config
from passray.models import create_backbone
from passray.step_graph import DDP_WARMUP, capture_stream

STEPS = DDP_WARMUP + 6
TIMEOUT_S = 240  # imports, NCCL set-up and 2 x 17 steps take well under a minute


def _train(device: torch.device, rank: int, cuda_graph: bool, log) -> tuple[list[float], dict[str, torch.Tensor], bool]:
    torch.manual_seed(0)
    net = create_backbone(load_config(None, ["model.arch=resnet8"]).model, 10).to(device)
    with torch.cuda.stream(capture_stream(device)):
        ddp = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index], static_graph=True,
                                                        gradient_as_bucket_view=True, broadcast_buffers=False)
    step = engine.Step(ddp, device, optimizer=torch.optim.SGD(ddp.parameters(), lr=0.01, momentum=0.9),
                       cuda_graph=cuda_graph, ddp_graph=True)
    data = torch.Generator().manual_seed(100 + rank)  # each rank its own batches
    losses, total = [], 0.0
    for i in range(STEPS):
        x = torch.randn(32, 3, 32, 32, generator=data).to(device)
        y = torch.randint(0, 10, (32,), generator=data).to(device)
        log(f"{'graphed' if cuda_graph else 'eager'} step {i + 1} of {STEPS} started")
        step(x, y)
        losses.append(float(step.sums[0]) - total)
        total = float(step.sums[0])
    captured = step.graph is not None and step.graph.captured
    step.close()  # as run_epoch and fit do: a graph holding NCCL work must not outlive the process group
    return losses, {k: v.detach().cpu() for k, v in net.state_dict().items()}, captured


def _rank(rank: int, port: int, out: str) -> None:
    def log(line: str) -> None:
        with open(f"{out}.{rank}.log", "a") as progress:
            progress.write(line + "\n")

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.backends.cudnn.deterministic = True  # eager and replayed steps run the same kernels: no rounding noise
    torch.cuda.set_device(rank)
    log("joining the process group")
    dist.init_process_group("nccl", rank=rank, world_size=2)
    try:
        device = torch.device("cuda", rank)
        eager = _train(device, rank, cuda_graph=False, log=log)
        graphed = _train(device, rank, cuda_graph=True, log=log)
        torch.save({"eager": eager, "graphed": graphed}, f"{out}.{rank}")
        log("results saved")
    finally:
        dist.destroy_process_group()
    log("done")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_ddp_steps_replayed_as_graphs_match_eager_ddp_steps(tmp_path) -> None:
    out = str(tmp_path / "result")
    ranks = mp.spawn(_rank, args=(free_port(), out), nprocs=2, join=False)
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not ranks.join(timeout=5):  # raises if a rank failed
            if time.monotonic() > deadline:
                where = [(Path(f"{out}.{r}.log").read_text().splitlines() or ["not started"])[-1]
                         if Path(f"{out}.{r}.log").exists() else "not started" for r in range(2)]
                pytest.fail(f"the ranks did not finish in {TIMEOUT_S} s: rank 0 at '{where[0]}', rank 1 at '{where[1]}'")
    finally:
        for process in ranks.processes:
            process.kill()
    ranks = [torch.load(f"{out}.{r}") for r in range(2)]
    weights = [r["graphed"][1] for r in ranks]
    for key in weights[0]:  # the replayed all-reduce averaged the ranks' gradients: one model on both
        if "running" not in key and "num_batches" not in key:  # BN statistics stay per rank (broadcast_buffers off)
            torch.testing.assert_close(weights[0][key], weights[1][key], rtol=0, atol=0, msg=key)
    for result in ranks:  # and it is the eager DDP model, to the rounding of cuDNN's graphed kernels
        (eager_losses, eager_weights, eager_captured), (losses, weights, captured) = result["eager"], result["graphed"]
        assert captured and not eager_captured
        assert losses == pytest.approx(eager_losses, rel=1e-4)
        for key in eager_weights:
            gap = (weights[key].float() - eager_weights[key].float()).abs().max().item()
            torch.testing.assert_close(weights[key], eager_weights[key], rtol=1e-3, atol=1e-4,
                                       msg=f"{key}: largest difference {gap:.2e}")
