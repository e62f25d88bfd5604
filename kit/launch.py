"""torchrun, as `make train NPROC=N` calls it: `python -m kit.launch <torchrun options> -m kit train …`.

The same launcher (`torch.distributed.run`: its options, its rendezvous, its process management), with two changes
for people: a failed run ends in one line (what stopped each rank: the error it printed above, or the signal that
killed it) instead of torchrun's ChildFailedError traceback; NPROC/NNODES values and a rendezvous no machine
joined are one line too; on the CPU each process gets an equal share of the cores instead of torchrun's one thread;
and with several machines, RDZV=<first machine>:0 on the first one opens the rendezvous on a free port and names it
in the waiting line, for the other machines' RDZV. Calling `torchrun` itself with the same arguments works too (one
machine: torchrun already picks a free port of its own).
"""

from __future__ import annotations

import logging
import os
import sys

TORCHRUN_PROCESS_WORDS = ("auto", "cpu", "gpu")     # torchrun's own values of --nproc_per_node
RDZV_DEFAULT_PORT = 29400                            # torchrun's c10d port when the endpoint names none


def check_counts(args) -> str | None:
    """NPROC and NNODES as people give them (`make train NPROC=abc`): one line instead of torchrun's traceback."""
    nproc = str(args.nproc_per_node).strip()
    if nproc not in TORCHRUN_PROCESS_WORDS and not (nproc.isdigit() and int(nproc) >= 1):
        return (f"NPROC={nproc}: the processes per machine must be a whole number of at least 1 (e.g. NPROC=2, one "
                f"per GPU)")
    nodes = str(args.nnodes).split(":")
    if len(nodes) > 2 or not all(n.isdigit() and int(n) >= 1 for n in nodes) or int(nodes[0]) > int(nodes[-1]):
        return f"NNODES={args.nnodes}: the number of machines must be a whole number of at least 1 (or min:max)"
    return None


def machines_wanted(args) -> int:
    return int(str(args.nnodes).split(":")[0])


def host_on_a_free_port(args):
    """`--rdzv-endpoint host:0` (c10d, several machines) on the machine it names: the rendezvous store opened here on
    a free port, and the endpoint rewritten to it, so the waiting line can say where the others meet. torchrun's
    rendezvous then shares this store (a multi-tenant store on the same port is one server per process); it must
    stay open for the run. Returns (the store or None, an error line or None)."""
    from torch.distributed.elastic.rendezvous.utils import _matches_machine_hostname, parse_rendezvous_endpoint

    if args.rdzv_backend != "c10d" or not args.rdzv_endpoint:
        return None, None
    host, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=RDZV_DEFAULT_PORT)
    if port != 0:
        return None, None
    if not _matches_machine_hostname(host):
        return None, (f"RDZV={args.rdzv_endpoint}: port 0 (a free port) only on the machine {host} itself; the "
                      f"others join at the port its waiting line names")
    from torch.distributed import TCPStore

    store = TCPStore(host, 0, is_master=True, multi_tenant=True, wait_for_workers=False)
    args.rdzv_endpoint = f"{host}:{store.port}"
    return store, None


def describe_failures(err) -> str:
    """Each failed rank in words, the first to fail first: killed by a signal, stopped by torchrun because another
    rank had failed (SIGTERM), or exited (a rank that exits 2 said why above)."""
    import signal

    from .errors import killed_by

    first, _ = err.get_first_failure()
    parts, killed = [], False
    for rank in [first] + sorted(r for r in err.failures if r != first):
        code = err.failures[rank].exitcode
        if code == -signal.SIGTERM and rank != first:
            parts.append(f"rank {rank} was stopped with it")
        elif code < 0:
            killed = True
            parts.append(f"rank {rank} was {killed_by(code)}")
        elif code == 2:
            parts.append(f"rank {rank} stopped with the error above")
        else:
            parts.append(f"rank {rank} exited with {code}")
    kept = "; every epoch saved before is kept: rerun the same command to resume" if killed else ""
    return f"error: the run stopped: {'; '.join(parts)}{kept}"


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import parse_args, run

    args = parse_args(argv)
    problem = check_counts(args)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # its "failed (exitcode: 2) local_rank: 0 …" line repeats what the one line below says, and its warning
    # "Received 2 death signal, shutting down workers" what every rank says of Ctrl-C
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.CRITICAL)
    logging.getLogger("torch.distributed.elastic.agent.server.api").setLevel(logging.ERROR)
    logging.getLogger("torch.distributed.elastic.rendezvous").setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:
        import torch

        processes = int(args.nproc_per_node) if str(args.nproc_per_node).isdigit() else 1
        threads = 1 if torch.cuda.is_available() else max(1, (os.cpu_count() or 1) // max(1, processes))
        os.environ["OMP_NUM_THREADS"] = str(threads)
    # a store this machine hosts stays open (referenced here) until the run ends
    store, problem = host_on_a_free_port(args) if machines_wanted(args) > 1 else (None, None)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    if machines_wanted(args) > 1:
        print(f"waiting for {machines_wanted(args)} machines to meet at {args.rdzv_endpoint} (run the same command on "
              f"each; torchrun waits up to its rendezvous join_timeout, 600 s unless set)", file=sys.stderr,
              flush=True)
    try:
        run(args)
    except ChildFailedError as err:
        codes = sorted({failure.exitcode for failure in err.failures.values()})
        if set(codes) <= {130, -2}:           # Ctrl-C: every rank has said what was kept
            return 130
        print(describe_failures(err), file=sys.stderr)
        return 2
    except RendezvousError as err:
        from .errors import first_line

        print(f"error: the {machines_wanted(args)} machines did not meet at {args.rdzv_endpoint} "
              f"({type(err).__name__}: {first_line(err, 'no details')}): start the same command on every machine, "
              f"with RDZV=<first machine's address>:<port> reachable from all of them, within the join timeout",
              file=sys.stderr)
        return 2
    except (SignalException, KeyboardInterrupt):
        return 130
    return 0



if __name__ == "__main__":
    sys.exit(main())
