"""A pool of spawned ranks, joined in one gloo process group, that run test functions.

    pool = RankPool(3)
    results = pool.run(ring_cases.check_ring, case, timeout=60)   # one result per rank

`fn` must be a module-level function of a module importable from tests/ (e.g. ring_cases); every
rank calls fn(*args) and answers ("ok", result) or ("error", traceback). run() returns the results
in rank order, raises AssertionError with the traceback of every failing rank, and raises
TimeoutError naming the ranks that did not answer in time (the pool is then killed: a process
group stuck in a collective is not reusable).
"""
import multiprocessing
import os
import sys
import time
import traceback
from datetime import timedelta
from multiprocessing.connection import wait

import torch
import torch.distributed as dist

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
START_TIMEOUT_S = 120.0
# Once a rank has failed, the others get this long to answer (they may be stuck in a collective).
GRACE_S = 10.0


def _worker(rank, world, port, env, conn):
    os.environ.update(env)
    if TESTS_DIR not in sys.path:
        sys.path.insert(0, TESTS_DIR)
    torch.set_num_threads(1)
    try:
        store = dist.TCPStore("127.0.0.1", port, world_size=world, is_master=False,
                              timeout=timedelta(seconds=START_TIMEOUT_S))
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    except BaseException:  # noqa: B036
        conn.send(("error", traceback.format_exc()))
        return
    conn.send(("ok", "ready"))
    while True:
        task = conn.recv()
        if task is None:
            break
        fn, args = task
        try:
            conn.send(("ok", fn(*args)))
        except BaseException:  # noqa: B036 - every failure goes back to the parent
            conn.send(("error", traceback.format_exc()))
    dist.destroy_process_group()


class RankPool:
    """`world` worker processes in a gloo group on 127.0.0.1; `env` is set in their environment."""

    def __init__(self, world, env=None):
        self.world = world
        # The parent hosts the rendezvous store on a port the OS picks: no port races.
        self._store = dist.TCPStore("127.0.0.1", 0, world_size=None, is_master=True,
                                    timeout=timedelta(seconds=START_TIMEOUT_S),
                                    wait_for_workers=False)
        ctx = multiprocessing.get_context("spawn")
        self._conns, self._procs, self._stopped = [], [], False
        for rank in range(world):
            parent_conn, child_conn = ctx.Pipe()
            proc = ctx.Process(target=_worker, name=f"rank{rank}", daemon=True,
                               args=(rank, world, self._store.port, dict(env or {}), child_conn))
            proc.start()
            child_conn.close()
            self._conns.append(parent_conn)
            self._procs.append(proc)
        try:
            self._gather("start-up", START_TIMEOUT_S)
        except BaseException:
            self.close(kill=True)
            raise

    @property
    def alive(self):
        return bool(self._procs)

    def run(self, fn, *args, timeout=60.0):
        """fn(*args) on every rank; the list of per-rank results."""
        assert self.alive, "this RankPool was closed"
        for conn in self._conns:
            conn.send((fn, args))
        return self._gather(f"{fn.__module__}.{fn.__name__}", timeout)

    def _gather(self, what, timeout):
        deadline = time.monotonic() + timeout
        replies, died = {}, False
        waiting = {conn: rank for rank, conn in enumerate(self._conns)}
        while waiting and time.monotonic() < deadline:
            for conn in wait(list(waiting), deadline - time.monotonic()):
                rank = waiting.pop(conn)
                try:
                    replies[rank] = conn.recv()
                except (EOFError, OSError):
                    died = True
                    proc = self._procs[rank]
                    proc.join(1)
                    replies[rank] = ("error", f"the process died (exit code {proc.exitcode})")
                if replies[rank][0] != "ok":
                    deadline = min(deadline, time.monotonic() + GRACE_S)
        failed = {rank: payload for rank, (status, payload) in sorted(replies.items())
                  if status != "ok"}
        tracebacks = "".join(f"\n----- rank {rank} -----\n{payload}"
                             for rank, payload in failed.items())
        if waiting or died:
            self.close(kill=True)
        if waiting:
            silent = ", ".join(str(rank) for rank in sorted(waiting.values()))
            raise TimeoutError(f"{what}: rank(s) {silent} of {self.world} did not answer within "
                               f"{timeout:g} s; the pool was killed{tracebacks}")
        if failed:
            raise AssertionError(
                f"{what} failed on {len(failed)} of {self.world} rank(s):{tracebacks}")
        return [replies[rank][1] for rank in range(self.world)]

    def stop(self):
        """Asks the workers to leave the group and exit (without waiting for them); once."""
        if self._stopped:
            return
        self._stopped = True
        for conn in self._conns:
            try:
                conn.send(None)
            except OSError:
                pass

    def close(self, kill=False):
        """Stops the workers (politely unless `kill`) and waits for them; idempotent."""
        if not kill:
            self.stop()
            for proc in self._procs:
                proc.join(10)
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
        for conn in self._conns:
            conn.close()
        self._conns, self._procs = [], []
        self._store = None


class RankPools:
    """One lazily created RankPool per world size; a killed pool is replaced on the next request."""

    def __init__(self, env=None):
        self._env = env
        self._pools = {}

    def get(self, world):
        pool = self._pools.get(world)
        if pool is None or not pool.alive:
            pool = self._pools[world] = RankPool(world, self._env)
        return pool

    def close(self):
        for pool in self._pools.values():  # all pools shut down concurrently
            pool.stop()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
