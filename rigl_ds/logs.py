"""Logging set-up in one place: library code logs with ``logging``; only rank 0 prints by default."""
from __future__ import annotations

import logging
import os
import sys


def process_rank() -> int:
    """This process's global rank from the launcher's environment (0 without a launcher)."""
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"):
        if var in os.environ:
            try:
                return int(os.environ[var])
            except ValueError:
                pass
    return 0


class RankZeroFilter(logging.Filter):
    """Pass records on rank 0 only (warnings and errors pass on every rank)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return process_rank() == 0 or record.levelno >= logging.WARNING


def setup_logging(level: int = logging.INFO, all_ranks: bool = False) -> None:
    """Configure the ``rigl_ds`` logger: one stderr handler, rank-0 filtering unless ``all_ranks``."""
    logger = logging.getLogger("rigl_ds")
    logger.setLevel(level)
    for h in list(logger.handlers):
        logger.removeHandler(h)
    handler = logging.StreamHandler(sys.stderr)
    rank = process_rank()
    handler.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
                                           datefmt="%H:%M:%S"))
    if not all_ranks:
        handler.addFilter(RankZeroFilter())
    logger.addHandler(handler)
    logger.propagate = False
