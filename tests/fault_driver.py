"""Drivers for tests/test_faults.py, run as their own processes (the pytest process owns the
session's Ray cluster, and a killed driver must not take the test with it).

    python tests/fault_driver.py search STORAGE NAME     a search that the test SIGKILLs
    python tests/fault_driver.py lose-node STORAGE NAME  a 2-node cluster whose worker dies mid-search
"""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

TINY = {"n_train": 256, "n_val": 128, "n_test": 128}
SPACE_KNOBS = {"width": "4", "batch_size": "32"}


def options(storage: str, name: str, **kw):
    from tunebal.tune.runner import SearchOptions

    base = dict(method="baseline", num_samples=3, max_epochs=4, scheduler="fifo", search="random", seed=3,
                storage=storage, name=name, data_values=dict(TINY), overrides=dict(SPACE_KNOBS), verbose=0)
    base.update(kw)
    return SearchOptions(**base)


def lose_node(storage: str, name: str) -> None:
    """Head without CPUs, worker A with 2: both trials start on A. After their first
    checkpoints A is removed and worker B joins; the trials must finish on B from their
    checkpoints."""
    import ray
    from ray.cluster_utils import Cluster

    from tunebal.checkpoint import CHECKPOINT_FILENAME
    from tunebal.tune.runner import run_search

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    node_a = cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    opts = options(storage, name, num_samples=2, max_epochs=8, max_failures=3)
    done: dict = {}
    thread = threading.Thread(target=lambda: done.setdefault("summary", run_search(opts)), daemon=True)
    thread.start()
    exp = Path(storage) / name
    deadline = time.time() + 240
    while time.time() < deadline and len({p.parents[1] for p in exp.rglob(CHECKPOINT_FILENAME)}) < 2:
        time.sleep(0.5)
    cluster.remove_node(node_a)  # first, so the trials cannot finish on A meanwhile
    print("REMOVED_NODE", flush=True)
    cluster.add_node(num_cpus=2)
    thread.join(timeout=300)
    summary = done.get("summary")
    print("STATUSES", [(t["status"], t["epochs"]) for t in summary["trials"]] if summary else None, flush=True)
    ray.shutdown()
    cluster.shutdown()


def main() -> None:
    what, storage, name = sys.argv[1:4]
    if what == "search":
        from tunebal.tune.runner import run_search

        run_search(options(storage, name, max_epochs=8))
    elif what == "lose-node":
        lose_node(storage, name)
    else:
        raise SystemExit(f"unknown driver {what}")


if __name__ == "__main__":
    main()
