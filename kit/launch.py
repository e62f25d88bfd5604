"""torchrun, as `make train NPROC=N` calls it: `python -m kit.launch <torchrun options> -m kit train …`.

The same launcher (`torch.distributed.run`: its options, its rendezvous, its process management), with two changes
for people: a failed run ends in one line (each rank has printed its reason above) instead of torchrun's
ChildFailedError traceback, and on the CPU each process gets an equal share of the cores instead of torchrun's one
thread. Calling `torchrun` itself with the same arguments works too.
"""

from __future__ import annotations

import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    # its "failed (exitcode: 2) local_rank: 0 …" line repeats what the one line below says, and its warning
    # "Received 2 death signal, shutting down workers" what every rank says of Ctrl-C
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        processes = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1
        threads = 1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // max(1, processes))
        os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        run(args)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        if set(codes) <= {130, -2}:           # Ctrl-C: every rank has said what was kept
            return 130
        ranks = ", ".join(str(rank) for rank in sorted(err.failures))      # keyed by global rank
        print(f"error: the run stopped (rank(s) {ranks} exited with {', '.join(map(str, codes))}); the reason is "
              f"above", file=sys.stderr)
        return 2
    except (SignalException, KeyboardInterrupt):
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
