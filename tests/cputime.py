"""Opt-in pytest plugin: CPU seconds and wall seconds per test phase, children included.

    .venv/bin/python -m pytest -p tests.cputime [--cputime-csv out.csv] ...

Wall time on a shared 2-core machine is noise; CPU time is what a test costs. A phase's CPU
is the pytest process's own (RUSAGE_SELF) plus every process below it: those it reaped
(RUSAGE_CHILDREN, which includes their reaped descendants) and those still alive (rank
pools, daemons), read from /proc at the phase's start and end and by a sampler thread
every 0.5 s, which also keeps the last seen CPU of processes that left the tree (daemons'
double-forked children reaped by init) and counts live processes and threads. Processes
that live and die inside one sampling interval away from the tree are missed (small).
At the end it prints the heaviest phases and the totals, and writes every phase to a CSV.
"""

from __future__ import annotations

import contextlib
import csv
import os
import resource
import threading
import time

import pytest

_TICK = os.sysconf("SC_CLK_TCK")


def _scan() -> dict[tuple[int, int], tuple[int, float, float, int, bool]]:
    """Every process: (pid, starttime) -> (ppid, own cpu s, reaped children's cpu s, threads, is python)."""
    out = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat", "rb") as f:
                raw = f.read()
        except OSError:
            continue
        f = raw[raw.rfind(b")") + 2:].split()
        out[(int(d), int(f[19]))] = (int(f[1]), (int(f[11]) + int(f[12])) / _TICK,
                                     (int(f[13]) + int(f[14])) / _TICK, int(f[17]), b"(python" in raw[:64])
    return out


class _Tracker:
    def __init__(self) -> None:
        self.me = os.getpid()
        self.lock = threading.Lock()
        self.ours: set[tuple[int, int]] = set()
        self.last: dict[tuple[int, int], tuple] = {}
        self.last_seen: dict[tuple[int, int], float] = {}
        self.live: set[tuple[int, int]] = set()
        self.peak_procs = self.peak_threads = 0
        self.pythons: set[tuple[int, int]] = set()  # python processes seen (started)
        self.update()

    def update(self) -> dict[tuple[int, int], tuple[int, float, float, int]]:
        with self.lock:
            snap = _scan()
            live_pids = {}
            for key in snap:
                live_pids[key[0]] = key
            # a process is ours if it is pytest or its parent is ours (transitively), or if it runs in
            # a network namespace of ours (tests/multinode: Slurm's job steps are reparented to init)
            netns = set()
            with contextlib.suppress(OSError):
                netns = {os.stat(f"/run/netns/{n}").st_ino for n in os.listdir("/run/netns")
                         if n.startswith(f"umn{self.me}x")}
            if netns:
                for key in snap:
                    if key not in self.ours:
                        with contextlib.suppress(OSError):
                            if int(os.readlink(f"/proc/{key[0]}/ns/net")[5:-1]) in netns:
                                self.ours.add(key)
            changed = True
            while changed:
                changed = False
                for key, (ppid, *_rest) in snap.items():
                    if key in self.ours:
                        continue
                    pk = live_pids.get(ppid)
                    if key[0] == self.me or (pk is not None and pk in self.ours):
                        self.ours.add(key)
                        changed = True
            mine = {k: v for k, v in snap.items() if k in self.ours}
            now = time.monotonic()
            for k in mine:
                self.last_seen[k] = now
            self.pythons.update(k for k, v in mine.items() if v[4])
            self.last.update(mine)
            self.live = set(mine)
            self.peak_procs = max(self.peak_procs, len(mine))
            self.peak_threads = max(self.peak_threads, sum(v[3] for v in mine.values()))
            return mine

    def reset_peaks(self) -> None:
        with self.lock:
            self.peak_procs = self.peak_threads = 0


class CpuTime:
    def __init__(self, config) -> None:
        self.csv = config.getoption("cputime_csv")
        self.rows: list[dict] = []
        self.outlived: list[tuple] = []
        self.tracker = _Tracker()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.t0 = time.monotonic()
        self.cpu0 = self._cpu_now()

    def _sample(self) -> None:
        while not self.stop.wait(0.5):
            try:
                self.tracker.update()
            except Exception:  # noqa: BLE001 - measurement only
                pass

    def _cpu_now(self) -> tuple[float, float, dict]:
        t = time.monotonic()
        s = resource.getrusage(resource.RUSAGE_SELF)
        c = resource.getrusage(resource.RUSAGE_CHILDREN)
        live = self.tracker.update()
        return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime, t, live

    def _delta(self, start: tuple[float, float, dict]) -> float:
        base, t0, s_live = start
        now, _, e_live = self._cpu_now()
        tr = self.tracker
        cpu = now - base
        for k, v in e_live.items():
            if k[0] != tr.me:
                cpu += v[1] + v[2] - (s_live[k][1] + s_live[k][2] if k in s_live else 0.0)
        for k, v in s_live.items():
            if k in e_live or k[0] == tr.me:
                continue
            if tr.last[k][0] != 1:  # reaped by pytest or a live descendant: counted there; drop its past
                cpu -= v[1] + v[2]
            else:  # orphaned (reaped by init): only what the sampler saw
                cpu += tr.last[k][1] + tr.last[k][2] - (v[1] + v[2])
        # born and died during the phase, orphaned: what the sampler saw
        for k, seen in tr.last_seen.items():
            if seen >= t0 and k not in s_live and k not in e_live and tr.last[k][0] == 1:
                cpu += tr.last[k][1] + tr.last[k][2]
        return cpu

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        """Processes a test started that outlive it (a pool or a daemon, or a leak)."""
        before = set(self.tracker.update())
        yield
        after = self.tracker.update()
        for k in set(after) - before:
            try:
                cmd = open(f"/proc/{k[0]}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            self.outlived.append((item.nodeid, k, cmd[:160]))

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_setup(self, item):
        yield from self._phase(item, "setup")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_call(self, item):
        yield from self._phase(item, "call")

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item):
        yield from self._phase(item, "teardown")

    def _phase(self, item, phase):
        self.tracker.reset_peaks()
        t = time.monotonic()
        start = self._cpu_now()
        pythons = len(self.tracker.pythons)
        yield
        cpu = self._delta(start)
        self.rows.append(dict(test=item.nodeid, phase=phase, wall=round(time.monotonic() - t, 3),
                              cpu=round(cpu, 3), peak_procs=self.tracker.peak_procs,
                              peak_threads=self.tracker.peak_threads,
                              pythons_started=len(self.tracker.pythons) - pythons))

    def pytest_terminal_summary(self, terminalreporter):
        self.stop.set()
        wall = time.monotonic() - self.t0
        cpu = self._delta(self.cpu0)
        tr = terminalreporter
        tr.write_sep("=", "cputime: heaviest phases (cpu s, wall s, peak processes / threads, pythons started)")
        for r in sorted(self.rows, key=lambda r: -r["cpu"])[:40]:
            tr.write_line(f"{r['cpu']:8.1f} {r['wall']:8.1f}  {r['peak_procs']:3d}/{r['peak_threads']:4d} "
                          f"{r['pythons_started']:3d}  {r['phase']:8s} {r['test']}")
        by_file: dict[str, list[float]] = {}
        for r in self.rows:
            acc = by_file.setdefault(r["test"].split("::")[0], [0.0, 0.0])
            acc[0] += r["cpu"]
            acc[1] += r["wall"]
        tr.write_sep("-", "cputime: per file (cpu s, wall s)")
        for f, (c, w) in sorted(by_file.items(), key=lambda kv: -kv[1][0])[:40]:
            tr.write_line(f"{c:8.1f} {w:8.1f}  {f}")
        tr.write_sep("-", "cputime: processes that outlived the test that started them (pid, cpu s at the end)")
        final = self.tracker.update()
        for nodeid, k, cmd in self.outlived:
            end = self.tracker.last.get(k)
            state = "alive at the end" if k in final else "exited later"
            tr.write_line(f"{nodeid}: {k[0]} {state}, {end[1] if end else 0:.1f} cpu s: {cmd}")
        tr.write_line(f"cputime: session {cpu:.1f} cpu s, {wall:.1f} wall s "
                      f"(sum of phases {sum(r['cpu'] for r in self.rows):.1f} cpu s), "
                      f"{len(self.tracker.pythons)} python processes started")
        self._write_csv(wall, cpu)

    def _write_csv(self, wall: float, cpu: float) -> None:
        if not self.csv:
            return
        worker = os.environ.get("PYTEST_XDIST_WORKER")  # under xdist each worker writes its own file
        path = f"{self.csv}.{worker}" if worker else self.csv
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["test", "phase", "wall", "cpu", "peak_procs", "peak_threads",
                                              "pythons_started"])
            w.writeheader()
            w.writerows(self.rows)
            w.writerow(dict(test="<session>", phase="all", wall=round(wall, 3), cpu=round(cpu, 3)))

    def pytest_sessionfinish(self, session):
        if os.environ.get("PYTEST_XDIST_WORKER"):  # workers have no terminal summary
            self.stop.set()
            self._write_csv(time.monotonic() - self.t0, self._delta(self.cpu0))


def pytest_addoption(parser):
    parser.addoption("--cputime-csv", default=None, help="write CPU/wall per test phase to this CSV")


def pytest_configure(config):
    config.pluginmanager.register(CpuTime(config), "cputime-tracker")

