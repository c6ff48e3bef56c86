#!/usr/bin/env python3
"""kvgate under a real Slurm: Debian's munged, slurmctld and slurmd started here with a
generated slurm.conf (one node, this machine), deploy/slurm/kvgate.sbatch submitted with
sbatch. Run by ctest (label `integration`; needs root and slurm-wlm + munge, which
scripts/setup.sh installs):

    python3 tests/integration/slurm_test.py --kvgate build/cli/kvgate

Checks: the job prints its address once the pipeline (two workers, as two tasks of one srun
step) is ready; greedy output through it equals local generation; a worker killed with
SIGKILL is started again by its step, takes its stage back and serving resumes with the same
output; after `scancel` no process of the job is left. Skips, saying why, only where the
Slurm daemons cannot start.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KVGATE = os.path.join(REPO, "build", "cli", "kvgate")
MODEL = os.path.join(REPO, "models", "kvgate-default")
SBATCH = os.path.join(REPO, "deploy", "slurm", "kvgate.sbatch")
PROMPT = "Once upon a time"


def read(path):
    if not os.path.exists(path):
        return ""
    with open(path) as f:
        return f.read()


def free_ports(n):
    """n consecutive free TCP ports on every address (the job's public, admin, cluster)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("", 0))
            base = s.getsockname()[1]
        if base + n > 65535:
            continue
        socks = []
        try:
            for i in range(n):
                t = socket.socket()
                socks.append(t)
                t.bind(("", base + i))
            return base
        except OSError:
            continue
        finally:
            for t in socks:
                t.close()
    raise RuntimeError("no run of free ports")


class LocalSlurm:
    """munged, slurmctld and slurmd of a one-node cluster, in a scratch directory."""

    def __init__(self, root):
        self.root = root
        self.procs = []
        self.node = socket.gethostname().split(".")[0]
        self.env = dict(os.environ, SLURM_CONF=os.path.join(root, "slurm.conf"))

    def unavailable(self):
        """Why the daemons cannot run here ("" when they can)."""
        missing = [b for b in ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scancel")
                   if shutil.which(b) is None and not os.path.exists(f"/usr/sbin/{b}")]
        if missing:
            return (f"{', '.join(missing)} not installed (scripts/setup.sh installs slurm-wlm "
                    "and munge)")
        if os.geteuid() != 0:
            return "slurmd needs root"
        return ""

    def start(self):
        r = self.root
        for d in ("state", "spool", "munge"):
            os.makedirs(os.path.join(r, d), mode=0o700)
        # Our own munged: its own key and socket, nothing of the machine's touched.
        key = os.path.join(r, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        self.munge_socket = os.path.join(r, "munge", "munge.socket")
        munged = shutil.which("munged") or "/usr/sbin/munged"
        self.spawn([munged, "--foreground", "--force", f"--key-file={key}",
                    f"--socket={self.munge_socket}",
                    f"--pid-file={os.path.join(r, 'munge', 'munged.pid')}",
                    f"--log-file={os.path.join(r, 'munge', 'munged.log')}",
                    f"--seed-file={os.path.join(r, 'munge', 'munged.seed')}"], "munged.out")
        self.wait_for(lambda: os.path.exists(self.munge_socket), 10, "munged's socket")
        ctld, slurmd = free_ports(1), free_ports(1)
        with open(self.env["SLURM_CONF"], "w") as f:
            f.write(f"""ClusterName=kvgatetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={ctld}
SlurmdPort={slurmd}
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=10
NodeName={self.node} NodeAddr=127.0.0.1 CPUs=4 RealMemory=6000 State=UNKNOWN
PartitionName=kvgate Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        self.spawn(["slurmctld", "-D", "-i", "-f", self.env["SLURM_CONF"]], "slurmctld.out")
        self.spawn(["slurmd", "-D", "-f", self.env["SLURM_CONF"], "-N", self.node],
                   "slurmd.out")
        self.wait_for(lambda: "idle" in self.run(["sinfo", "-h", "-o", "%T"], check=False).stdout,
                      60, "the node to be idle in sinfo")

    def spawn(self, args, log):
        with open(os.path.join(self.root, log), "w") as out:
            self.procs.append(subprocess.Popen(args, env=self.env, stdout=out, stderr=out,
                                               start_new_session=True))

    def run(self, args, check=True, timeout=60):
        p = subprocess.run(args, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed: {p.stderr.strip()}")
        return p

    def wait_for(self, cond, timeout, what):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{p.args[0]} exited ({p.returncode}): {self.logs()}")
            if cond():
                return
            time.sleep(0.3)
        raise RuntimeError(f"timed out waiting for {what}: {self.logs()}")

    def logs(self):
        text = []
        for name in ("slurmctld.log", "slurmd.log", "slurmctld.out", "slurmd.out", "munged.out"):
            lines = read(os.path.join(self.root, name)).splitlines()[-15:]
            if lines:
                text.append(f"--- {name}\n" + "\n".join(lines))
        return "\n".join(text)

    def stop(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()


def job_processes(run_dir):
    """Pids of processes whose command line or environment names this job's run directory."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if run_dir.encode() in cmd or f"KVGATE_RUN_DIR={run_dir}".encode() in env:
            pids.append(int(pid))
    return pids


def kvgate(args, check=True, timeout=120):
    p = subprocess.run([KVGATE] + args, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"kvgate {' '.join(args)} failed: {p.stderr.strip()}")
    return p


def generate(target):
    flags = ["--prompt", PROMPT, "--max-tokens", "24", "--temperature", "0", "--json"]
    where = ["--server", target] if ":" in target else ["--model", target, "--threads", "1"]
    return json.loads(kvgate(["generate"] + where + flags).stdout)["token_ids"]


class SlurmTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.root = tempfile.mkdtemp(prefix="kvgate-slurm-")
        os.chmod(cls.root, 0o755)
        cls.slurm = LocalSlurm(cls.root)
        why = cls.slurm.unavailable()
        if not why:
            try:
                cls.slurm.start()
            except (RuntimeError, OSError) as e:
                why = f"the Slurm daemons did not start: {e}"
        if why:
            cls.slurm.stop()
            raise unittest.SkipTest(why)
        cls.port = free_ports(3)
        cls.run_dir = os.path.join(cls.root, "run")
        cls.out = os.path.join(cls.root, "job.out")
        env = (f"ALL,KVGATE={KVGATE},KVGATE_PORT={cls.port},KVGATE_WORKERS_PER_NODE=2,"
               f"KVGATE_RUN_DIR={cls.run_dir},KVGATE_COORDINATOR_MEM=512")
        p = cls.slurm.run(["sbatch", "--parsable", "-N", "1", "-n", "1", "--mem=3000",
                           f"--export={env}", "-o", cls.out, SBATCH, "--model", MODEL,
                           "--max-batch", "8"])
        cls.job = p.stdout.strip().split(";")[0]
        cls.addr = None
        deadline = time.time() + 240
        while time.time() < deadline and cls.addr is None:
            text = read(cls.out)
            m = re.search(r"serving at (\S+:\d+)", text)
            if m:
                cls.addr = m.group(1)
            elif cls.slurm.run(["squeue", "-h", "-j", cls.job], check=False).stdout.strip() == "":
                break
            time.sleep(0.5)
        if cls.addr is None:
            text = read(cls.out) or "(no output)"
            cls.tearDownClass()
            raise AssertionError(f"the job did not print its address:\n{text}")

    @classmethod
    def tearDownClass(cls):
        if getattr(cls, "job", None):
            cls.slurm.run(["scancel", cls.job], check=False)
            deadline = time.time() + 40
            while time.time() < deadline and job_processes(cls.run_dir):
                time.sleep(0.5)
        for pid in job_processes(getattr(cls, "run_dir", "/nonexistent")):
            os.kill(pid, signal.SIGKILL)
        cls.slurm.stop()
        shutil.rmtree(cls.root, ignore_errors=True)

    def budgets(self):
        host, port = self.addr.rsplit(":", 1)
        admin = f"127.0.0.1:{int(port) + 1}"  # loopback on the first node: this machine
        return json.loads(kvgate(["budget", "show", "--json", "--server", admin]).stdout)

    def test_1_job_serves_with_two_workers_and_output_equals_local(self):
        b = self.budgets()
        self.assertTrue(b["ready"])
        self.assertEqual(len([n for n in b["nodes"] if n.get("pid")]), 2)
        # The allocation's memory (3000 MiB less 512 for the coordinator) split between the two.
        for n in b["nodes"]:
            self.assertEqual(int(n["memory_limit_bytes"]), (3000 - 512) // 2 * (1 << 20), n)
        self.assertEqual(generate(self.addr), generate(MODEL))

    def test_2_a_killed_worker_is_started_again_by_its_step(self):
        before = sorted(n["pid"] for n in self.budgets()["nodes"] if n.get("pid"))
        os.kill(before[-1], signal.SIGKILL)
        deadline = time.time() + 120
        while time.time() < deadline:
            b = self.budgets()
            pids = sorted(n["pid"] for n in b["nodes"] if n.get("pid"))
            if b["ready"] and len(pids) == 2 and before[-1] not in pids:
                break
            time.sleep(0.5)
        else:
            self.fail(f"the pipeline did not come back: {b}\n{read(self.out)}")
        self.assertIn("starting it again", read(self.out))
        self.assertEqual(generate(self.addr), generate(MODEL))

    def test_3_scancel_leaves_no_process_behind(self):
        self.assertTrue(job_processes(self.run_dir), "the job's processes are not found")
        self.slurm.run(["scancel", self.job])
        deadline = time.time() + 40
        while time.time() < deadline:
            gone = self.slurm.run(["squeue", "-h", "-j", self.job], check=False).stdout.strip()
            if not gone and not job_processes(self.run_dir):
                break
            time.sleep(0.5)
        self.assertEqual(job_processes(self.run_dir), [])
        self.assertEqual(self.slurm.run(["squeue", "-h", "-j", self.job], check=False)
                         .stdout.strip(), "")
        type(self).job = None
        print(f"\n--- the job's output\n{read(self.out)}", file=sys.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvgate", default=KVGATE)
    args, rest = ap.parse_known_args()
    KVGATE = os.path.abspath(args.kvgate)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
