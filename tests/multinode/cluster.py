"""Two emulated hosts on this machine, and a two-node Slurm cluster on top of them.

Why emulate: users launch on multi-node Slurm clusters, and the parts that break there
(host names, rendezvous across hosts, rank layout, srun, signals, a dead node) never show
on one host. Each "host" is a network namespace joined to the other by a veth pair
(10.200.0.1 = node1, 10.200.0.2 = node2), plus, per command, a private mount and UTS
namespace in which /etc/hosts is our own file and `hostname` is the node's name. So
`socket.gethostname()` -> "node2" -> 10.200.0.2, which is what gloo, torchrun's c10d
rendezvous and srun use to find each other, as on a real cluster.

Why not `ip netns exec`: it remounts /sys, and slurmd then finds no cgroup filesystem.
`nsenter --net` + `unshare --mount --uts` keeps /sys and still isolates what matters.

Network rule: every address used here is loopback or 10.200.0.x inside namespaces that
this module creates; nothing in the root namespace listens or connects.

Cleanup is by PID: every process that ever ran "on a host" lives in that host's network
namespace, so `ip netns pids` finds all of them (torchrun workers, slurmstepd, srun),
including those that left our process group. Namespace names carry the owner's PID, so
a crashed run's leftovers are recognised (owner dead) and removed at the next setup
without touching a concurrent run's namespaces.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

NS_PREFIX = "umn"  # umn<owner pid>x<cluster number>-<host index>
SUBNET = "10.200.0"
HOSTNAMES = ("node1", "node2")
REPO = Path(__file__).resolve().parents[2]
SLURM_PACKAGES = ("slurmd", "slurmctld", "slurm-client", "munge")
SLURM_BINARIES = ("slurmd", "slurmctld", "sbatch", "scontrol", "scancel", "srun", "munged")

# Runs as the command "on a host", after nsenter (network) and unshare (mount, uts):
# $0 = host dir (etc/ files to bind over /etc, run/), $1 = host name, $2 = shared run dir.
_ENTER = ('for f in "$0"/etc/*; do mount --bind "$f" "/etc/${f##*/}" || exit 97; done; '
          'mount --bind "$0/run" "$2" && hostname "$1" && shift 2 && exec "$@"')


class ClusterUnavailable(RuntimeError):
    """This machine cannot emulate hosts (not root, no iproute2, namespaces refused)."""


def _run(argv: list[str], timeout: float = 30, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed (exit {p.returncode}): {p.stderr.strip() or p.stdout.strip()}")
    return p


def why_unavailable() -> str | None:
    """None when two hosts can be emulated here, else the reason (for a skip message)."""
    if os.geteuid() != 0:
        return "emulated hosts need root (network namespaces, bind mounts); run the tests as root"
    missing = [b for b in ("ip", "nsenter", "unshare", "mount", "hostname") if shutil.which(b) is None]
    if missing:
        return f"emulated hosts need {', '.join(missing)} (apt-get install iproute2 util-linux)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def ns_pids(netns: str) -> list[int]:
    p = _run(["ip", "netns", "pids", netns], check=False)
    return [int(x) for x in p.stdout.split()] if p.returncode == 0 else []


def kill_namespace_processes(netns: str, grace: float = 3.0) -> None:
    """SIGTERM every process in `netns`, then SIGKILL what is left after `grace` seconds."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = ns_pids(netns)
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + (grace if sig == signal.SIGTERM else 5.0)
        while pids and time.monotonic() < deadline:
            time.sleep(0.05)
            pids = [p for p in pids if _pid_alive(p) and p in ns_pids(netns)]
        if not pids:
            return


def delete_namespace(netns: str) -> None:
    if Path("/run/netns", netns).exists():
        kill_namespace_processes(netns)
        _run(["ip", "netns", "del", netns], check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by crashed runs (their owner PID is gone); returns their names."""
    removed = []
    p = _run(["ip", "netns", "list"], check=False)
    for line in p.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{NS_PREFIX}(\d+)x\d+-\d", name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            delete_namespace(name)
            removed.append(name)
    return removed


def _write_etc(etc: Path) -> None:
    """Files bound over /etc on every host: names resolve from our hosts file only, so no
    lookup ever goes to a DNS server (the network rule), and the nodes find each other."""
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "hosts").write_text("127.0.0.1 localhost\n::1 localhost\n" +
                               "".join(f"{SUBNET}.{i + 1} {n}\n" for i, n in enumerate(HOSTNAMES)))
    if Path("/etc/nsswitch.conf").exists():
        lines = [ln for ln in Path("/etc/nsswitch.conf").read_text().splitlines() if not ln.startswith("hosts:")]
        (etc / "nsswitch.conf").write_text("\n".join(lines + ["hosts: files"]) + "\n")
    if Path("/etc/resolv.conf").exists():
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\n")


@dataclass
class Host:
    """One emulated host: `wrap(argv)` is argv run with this host's network, name and hosts file."""

    index: int  # 0 or 1
    netns: str
    hostdir: Path  # etc/ (bound over /etc files), run/ (bound over the cluster's shared run dir)
    rundir: Path  # the path that every host sees as its own run dir (munge socket, pid files)

    @property
    def name(self) -> str:
        return HOSTNAMES[self.index]

    @property
    def addr(self) -> str:
        return f"{SUBNET}.{self.index + 1}"

    def wrap(self, argv: list[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.netns}", "unshare", "--mount", "--uts",
                "sh", "-c", _ENTER, str(self.hostdir), self.name, str(self.rundir), *map(str, argv)]

    def popen(self, argv: list[str], log: Path, env: dict | None = None, cwd: Path = REPO) -> subprocess.Popen:
        """Start argv on this host in its own session; output to `log`."""
        with open(log, "ab") as f:
            return subprocess.Popen(self.wrap(argv), stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=cwd, start_new_session=True)

    def run(self, argv: list[str], timeout: float = 60, env: dict | None = None, check: bool = True,
            cwd: Path = REPO) -> subprocess.CompletedProcess:
        p = subprocess.run(self.wrap(argv), capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd,
                           stdin=subprocess.DEVNULL)
        if check and p.returncode != 0:
            raise RuntimeError(f"on {self.name}: {' '.join(map(str, argv))} failed (exit {p.returncode}):\n"
                               f"{p.stdout[-3000:]}{p.stderr[-3000:]}")
        return p

    def pids(self) -> list[int]:
        return ns_pids(self.netns)

    def kill_all(self) -> list[int]:
        """SIGKILL every process of this host at once (a node failure); returns the PIDs."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return pids


_created = 0  # clusters created by this process (unique namespace names)


@dataclass
class TwoHosts:
    """node1 and node2, created by `create()`, removed by `destroy()` (idempotent)."""

    workdir: Path
    hosts: list[Host] = field(default_factory=list)
    _port: int = 29400

    def create(self) -> TwoHosts:
        reason = why_unavailable()
        if reason:
            raise ClusterUnavailable(reason)
        remove_stale_namespaces()
        global _created
        _created += 1
        number = _created
        rundir = self.workdir / "run"
        rundir.mkdir(parents=True, exist_ok=True)
        for i in range(2):
            hostdir = self.workdir / HOSTNAMES[i]
            (hostdir / "run").mkdir(parents=True, exist_ok=True)
            _write_etc(hostdir / "etc")
            self.hosts.append(Host(i, f"{NS_PREFIX}{os.getpid()}x{number}-{i}", hostdir, rundir))
        try:
            a, b = self.hosts
            for h in self.hosts:
                _run(["ip", "netns", "add", h.netns])
            _run(["ip", "link", "add", "eth0", "netns", a.netns, "type", "veth", "peer", "name", "eth0",
                  "netns", b.netns])
            for h in self.hosts:
                _run(["ip", "-n", h.netns, "addr", "add", f"{h.addr}/24", "dev", "eth0"])
                _run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
                _run(["ip", "-n", h.netns, "link", "set", "eth0", "up"])
            # the host really is node2 and reaches node1 by name, through the veth pair
            out = b.run(["sh", "-c", "hostname; getent hosts node1"], timeout=20).stdout.split()
            if out[:2] != ["node2", a.addr]:
                raise RuntimeError(f"node2 sees hostname/hosts {out}, expected ['node2', '{a.addr}', 'node1']")
        except (RuntimeError, subprocess.TimeoutExpired) as e:
            self.destroy()
            raise ClusterUnavailable(f"cannot create network namespaces here: {e}") from e
        return self

    def destroy(self) -> None:
        for h in self.hosts:
            delete_namespace(h.netns)

    def next_port(self) -> int:
        """A fresh rendezvous port per job: a port still in TIME_WAIT cannot trip a later job."""
        self._port += 1
        return self._port

    def torchrun(self, script_args: list[str], tag: str, nproc_per_node: int = 2,
                 env: dict | None = None) -> list[subprocess.Popen]:
        """torchrun --nnodes 2 on both hosts with c10d rendezvous on node1; logs in workdir/tag.nodeN.log."""
        port = self.next_port()
        procs = []
        for h in self.hosts:
            argv = [str(REPO / ".venv/bin/python"), "-m", "torch.distributed.run", "--nnodes", "2",
                    "--nproc-per-node", str(nproc_per_node), "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", f"{HOSTNAMES[0]}:{port}", "--rdzv-id", f"{tag}-{port}",
                    *script_args]
            procs.append(h.popen(argv, self.log(tag, h), env=job_env(env)))
        return procs

    def log(self, tag: str, host: Host) -> Path:
        return self.workdir / f"{tag}.{host.name}.log"

    def tail(self, tag: str, n: int = 4000) -> str:
        """The logs of job `tag`: their error lines, then their last `n` characters."""
        return "\n".join(f"--- {p.name}:\n{digest(p.read_text(errors='replace'), n)}"
                         for p in sorted(self.workdir.glob(f"{tag}*.log")))


def digest(text: str, n: int = 4000) -> str:
    """Error lines of a job log (the root cause is often far from the end), then its tail."""
    keys = ("Error", "error:", "Exception", "Timed out", "timed out", "Traceback")
    errors = list(dict.fromkeys(ln for ln in text.splitlines() if any(k in ln for k in keys)))[:40]
    return ("[error lines]\n" + "\n".join(errors) + "\n[tail]\n" if errors else "") + text[-n:]


def job_env(extra: dict | None = None) -> dict:
    """Environment of a job: this one, one thread per rank, no proxies, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(extra or {})
    return env


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it, found through /proc (workers that left its session too)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Signal `pid` and all its descendants (killing only torchrun leaves its workers running)."""
    pids = descendants(pid)
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass
    return pids


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Wait for every process; on timeout kill their sessions and raise TimeoutError."""
    deadline = time.monotonic() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            for q in procs:
                kill_tree(q.pid)
            raise TimeoutError(f"processes {[q.args[-1] for q in procs]} still running after {timeout:.0f} s") from None
    return codes


# ---------------------------------------------------------------------------------- Slurm

def slurm_missing() -> list[str]:
    return [b for b in SLURM_BINARIES if shutil.which(b) is None]


def install_slurm(timeout: float = 600) -> str | None:
    """apt-get install Slurm + munge when missing; returns None or why it could not."""
    if not slurm_missing():
        return None
    if shutil.which("apt-get") is None:
        return f"Slurm is not installed ({', '.join(slurm_missing())} missing) and there is no apt-get"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    lock = ["-o", "DPkg::Lock::Timeout=120"]  # wait for another apt-get rather than fail
    for argv in (["apt-get", *lock, "update", "-qq"],
                 ["apt-get", *lock, "install", "-y", "-qq", "--no-install-recommends", *SLURM_PACKAGES]):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if p.returncode != 0:
            return f"{' '.join(argv)} failed: {(p.stderr or p.stdout).strip()[-500:]}"
    return f"still missing after apt-get: {slurm_missing()}" if slurm_missing() else None


SLURM_CONF = """\
# Written by tests/multinode/cluster.py: a two-node cluster inside two network namespaces.
ClusterName=emulated
SlurmctldHost={h0}({a0})
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={run}/munge.socket
StateSaveLocation={w}/state
SlurmdSpoolDir={w}/spool/%n
SlurmctldPidFile={w}/slurmctld.pid
SlurmdPidFile={w}/slurmd.%n.pid
SlurmctldLogFile={w}/slurmctld.log
SlurmdLogFile={w}/slurmd.%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=10
{nodes}
PartitionName=debug Nodes={h0},{h1} Default=YES MaxTime=INFINITE State=UP
"""


@dataclass
class Slurm:
    """munged + slurmd on each host, slurmctld on node1; client commands run on node1."""

    cluster: TwoHosts
    procs: list[subprocess.Popen] = field(default_factory=list)

    @property
    def dir(self) -> Path:
        return self.cluster.workdir / "slurm"

    @property
    def conf(self) -> Path:
        return self.dir / "slurm.conf"

    def env(self, extra: dict | None = None) -> dict:
        return job_env({"SLURM_CONF": str(self.conf), **(extra or {})})

    def start(self, timeout: float = 30) -> Slurm:
        h0, h1 = self.cluster.hosts
        run = self.cluster.hosts[0].rundir
        (self.dir / "state").mkdir(parents=True, exist_ok=True)
        (self.dir / "spool").mkdir(exist_ok=True)
        nodes = "\n".join(f"NodeName={h.name} NodeAddr={h.addr} CPUs=2 State=UNKNOWN" for h in self.cluster.hosts)
        self.conf.write_text(SLURM_CONF.format(h0=h0.name, a0=h0.addr, h1=h1.name, run=run, w=self.dir, nodes=nodes))
        keydir = self.dir / "munge"
        keydir.mkdir(mode=0o700, exist_ok=True)
        key = keydir / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for h in self.cluster.hosts:
            self.procs.append(h.popen(
                ["munged", "--foreground", "--force", f"--key-file={key}", f"--socket={run}/munge.socket",
                 f"--pid-file={run}/munged.pid", f"--log-file={keydir}/munged.{h.name}.log",
                 f"--seed-file={keydir}/seed.{h.name}"], self.dir / f"munged.{h.name}.out", env=self.env()))
        for h in self.cluster.hosts:
            self._wait_for(lambda h=h: (h.hostdir / "run" / "munge.socket").exists(), f"munged on {h.name}", timeout)
        self.procs.append(h0.popen(["slurmctld", "-D", "-i", "-f", self.conf], self.dir / "slurmctld.out",
                                   env=self.env()))
        for h in self.cluster.hosts:
            self.procs.append(h.popen(["slurmd", "-D", "-N", h.name, "-f", self.conf],
                                      self.dir / f"slurmd.{h.name}.out", env=self.env()))
        self._wait_for(self._nodes_idle, "both slurmd idle in sinfo", timeout)
        return self

    def _wait_for(self, cond, what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not cond():
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{' '.join(map(str, p.args[-6:]))} exited with {p.returncode} while waiting "
                                       f"for {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"no {what} after {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.2)

    def _nodes_idle(self) -> bool:
        p = self.client(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
        states = dict(line.split() for line in p.stdout.splitlines() if len(line.split()) == 2)
        return all(states.get(h.name) == "idle" for h in self.cluster.hosts)

    def client(self, argv: list[str], check: bool = True, timeout: float = 30, env: dict | None = None,
               cwd: Path = REPO) -> subprocess.CompletedProcess:
        """A Slurm client command, run on node1 (the root namespace has no route to slurmctld)."""
        return self.cluster.hosts[0].run(argv, timeout=timeout, env=self.env(env), check=check, cwd=cwd)

    def sbatch(self, argv: list[str], env: dict | None = None, cwd: Path = REPO) -> int:
        """Submit from `cwd` (the job's SLURM_SUBMIT_DIR); returns the job id."""
        out = self.client(["sbatch", "--parsable", *argv], env=env, cwd=cwd).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int) -> dict:
        """`scontrol show job` as a dict (JobState, ExitCode, NodeList, ...)."""
        out = self.client(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)

    def wait_job(self, job_id: int, timeout: float, states=("RUNNING",), final: bool = True) -> dict:
        """Poll until the job ends (final=True) or reaches one of `states`."""
        deadline = time.monotonic() + timeout
        terminal = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY",
                    "BOOT_FAIL", "DEADLINE"}
        while True:
            info = self.job(job_id)
            state = info.get("JobState", "")
            if (final and state in terminal) or (not final and state in states):
                return info
            if not final and state in terminal:
                raise RuntimeError(f"job {job_id} ended ({state}) before reaching {states}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {state or 'unknown'} after {timeout:.0f} s:\n{self.logs()}")
            time.sleep(0.25)

    def logs(self, n: int = 2000) -> str:
        files = sorted(self.dir.glob("*.log")) + sorted(self.dir.glob("*.out")) + sorted(self.dir.glob("munge/*.log"))
        return "\n".join(f"--- {p.name}:\n{p.read_text(errors='replace')[-n:]}" for p in files if p.stat().st_size)

    def stop(self) -> None:
        """Daemons by PID (SIGTERM, then SIGKILL); job processes go with the namespaces."""
        for p in reversed(self.procs):
            if p.poll() is None:
                kill_tree(p.pid, signal.SIGTERM)
        for p in reversed(self.procs):
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                kill_tree(p.pid)
                p.wait(timeout=5)
        self.procs.clear()
