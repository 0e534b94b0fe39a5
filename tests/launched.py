"""Run under ``torchrun --nproc-per-node 2`` by test_launcher.py: the runner joins the
launcher's group instead of spawning, and prints what each rank saw, one JSON line per rank."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))

import ranks  # noqa: E402
from lossaudit.audit.distributed import is_leader, launched, run_ranks  # noqa: E402
from lossaudit.core.errors import RankFailure  # noqa: E402

seen = {"rank": launched().rank, "leader": is_leader(), "pid": os.getpid()}
seen["sums"] = run_ranks(ranks.sum_of_ranks, 10, 2)
try:
    run_ranks(ranks.rank_1_fails_alone, None, 2)
except RankFailure as exc:
    seen["failure"] = str(exc)
try:
    run_ranks(ranks.sum_of_ranks, 0, 3)
except RankFailure as exc:
    seen["mismatch"] = str(exc)
# one write per rank: print() writes the line and its newline apart, so two ranks' lines could share one
os.write(1, (json.dumps(seen) + "\n").encode())
