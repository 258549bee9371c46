"""Calibrate on many processes: each rank sees its shard, every rank ends with the same table.

    torchrun --nproc_per_node=8 scripts/calibrate_ddp.py --model cifar-resnet20 -o table.json   # GPUs: nccl
    torchrun --nproc_per_node=2 scripts/calibrate_ddp.py --device cpu -o table.json             # CPU: gloo

``calibrate`` notices the initialized process group and all-reduces the histograms, so the
table equals the one a single process would compute over all the shards together.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist

from torch_nvdla import calibrate
from torch_nvdla.zoo.data import batches
from torch_nvdla.zoo.registry import default_dataset_for, get_dataset, get_model


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-lenet")
    p.add_argument("--method", default="entropy")
    p.add_argument("--num-images", type=int, default=500)
    p.add_argument("--batch-size", type=int, default=50)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("-o", "--output", default="table.json")
    args = p.parse_args(argv)

    cuda = args.device.startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    try:
        model = get_model(args.model).to(device)
        x, y = get_dataset(default_dataset_for(args.model)).split("calibration")
        x, y = x[: args.num_images][rank::world], y[: args.num_images][rank::world]  # this rank's shard
        table = calibrate(model, batches(x, y, args.batch_size), args.method, progress=rank == 0)
        if rank == 0:
            table.save(args.output)
            print(f"{world} ranks, {len(table)} taps -> {args.output}")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
