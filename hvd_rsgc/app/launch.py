"""What the app's multi-process benchmarks (``bench step``, ``bench collective``) share: the
environment ``horovodrun`` needs here, the one JSON file each rank writes for the driver, and
how a list of per-round ratios is printed."""
from __future__ import annotations

import json
import os
import statistics

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def horovodrun_env(base: dict | None = None) -> dict:
    """``base`` (default: this process's environment) plus the checkout first on ``PYTHONPATH``
    (the user's entries kept after it: a compressor of their own in a module on the path must
    still import in the ranks) and Open MPI's consent to run as root and to oversubscribe cores."""
    env = dict(os.environ if base is None else base)
    rest = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != ROOT]
    return dict(env, PYTHONPATH=os.pathsep.join([ROOT] + rest), OMPI_ALLOW_RUN_AS_ROOT="1",
                OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")


def write_rank(out_dir: str, rank: int, result: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)


def read_rank(out_dir: str, rank: int) -> dict:
    with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
        return json.load(f)


def spread(ratios, none: str = "n/a") -> str:
    """Per-round ratios as ``median [min-max]`` (``none`` for no ratios)."""
    if not ratios:
        return none
    return f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}]"
