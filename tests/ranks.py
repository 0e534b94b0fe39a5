"""Rank functions for the distributed runner's tests (module level: spawned ranks import them)."""

import time

import torch


def sum_of_ranks(rank, world_size, payload, device):
    t = torch.tensor([float(rank + payload)])
    torch.distributed.all_reduce(t)
    return (rank, world_size, float(t))


def rank_1_raises(rank, world_size, payload, device):
    if rank == 1:
        raise ValueError("planted failure on rank 1\nsecond line of the message")
    torch.distributed.barrier()  # rank 0 waits for a peer that never comes: the runner must end it


def rank_1_hangs(rank, world_size, payload, device):
    if rank == 1:
        time.sleep(600)


def rank_1_fails_alone(rank, world_size, payload, device):
    """Rank 1 raises before any collective; rank 0 returns: every rank must learn of rank 1's error."""
    if rank == 1:
        raise KeyError("planted failure on rank 1")
    return rank
