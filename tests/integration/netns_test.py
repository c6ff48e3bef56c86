#!/usr/bin/env python3
"""Several hosts, for real: three network namespaces on one bridge (veth pairs), the
coordinator in one and a worker in each of the others, with TLS on every plane (mutual inside
the cluster), API keys and the cluster token. Run by ctest (label `integration`; needs root):

    python3 tests/integration/netns_test.py --kvgate build/cli/kvgate

The workers dial the coordinator by name and advertise stable names (`--advertise`), as on
Kubernetes (deploy/k8s): each namespace's /etc/hosts maps them, and the certificate carries
`kvgate` and `*.kvgate-worker.default.svc` (gRPC refuses a wildcard over one label). Checks: greedy output through the two hosts equals local
generation; `ip link set down` on
the second worker's link mid-stream ends the streams with UNAVAILABLE within 2 s while the
coordinator keeps answering; bringing the link up restores serving (the worker re-registers);
with `tc netem delay 5ms loss 1%` on every link (or, where the kernel has no netem, 1% random
loss by nftables, said so) the output is unchanged. Skips, saying why, only where network
namespaces cannot be created.
"""

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pipeline_test as pt  # noqa: E402  (the pipeline tests' process helper)

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KVGATE = os.path.join(REPO, "build", "cli", "kvgate")
MODEL = os.path.join(REPO, "models", "kvgate-default")
PROMPT = "And God said"
TAG = f"kvg{os.getpid() % 100000}"
NS = {"c": f"{TAG}c", "w1": f"{TAG}w1", "w2": f"{TAG}w2"}
IP = {"c": "10.77.0.1", "w1": "10.77.0.2", "w2": "10.77.0.3"}
# The names the processes dial, as on Kubernetes: the coordinator's Service and the workers'
# StatefulSet names (each namespace's /etc/hosts, by `ip netns exec`'s /etc/netns convention).
NAME = {"c": "kvgate", "w1": "kvgate-worker-0.kvgate-worker.default.svc",
        "w2": "kvgate-worker-1.kvgate-worker.default.svc"}


def sh(*args, check=True):
    p = subprocess.run(list(args), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {p.stderr.strip()}")
    return p


def netns_unavailable():
    """Why network namespaces cannot be made here ("" when they can)."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    p = sh("ip", "netns", "add", f"{TAG}probe", check=False)
    if p.returncode != 0:
        return f"ip netns add failed ({p.stderr.strip()}): needs root and a kernel with netns"
    sh("ip", "netns", "del", f"{TAG}probe", check=False)
    return ""


def build_network():
    """The coordinator's namespace holds a bridge; each worker's namespace a veth into it."""
    hosts = "127.0.0.1 localhost\n" + "".join(f"{IP[k]} {NAME[k]}\n" for k in IP)
    for ns in NS.values():
        sh("ip", "netns", "add", ns)
        os.makedirs(f"/etc/netns/{ns}", exist_ok=True)
        with open(f"/etc/netns/{ns}/hosts", "w") as f:
            f.write(hosts)
    c = NS["c"]
    sh("ip", "-n", c, "link", "add", "br0", "type", "bridge")
    sh("ip", "-n", c, "addr", "add", f"{IP['c']}/24", "dev", "br0")
    sh("ip", "-n", c, "link", "set", "br0", "up")
    for ns in NS.values():
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    for w in ("w1", "w2"):
        # One veth pair per worker: eth0 in its namespace, the peer on the bridge.
        sh("ip", "link", "add", f"{TAG}{w}a", "type", "veth", "peer", "name", f"{TAG}{w}b")
        sh("ip", "link", "set", f"{TAG}{w}a", "netns", NS[w], "name", "eth0")
        sh("ip", "link", "set", f"{TAG}{w}b", "netns", c)
        sh("ip", "-n", c, "link", "set", f"{TAG}{w}b", "master", "br0")
        sh("ip", "-n", c, "link", "set", f"{TAG}{w}b", "up")
        sh("ip", "-n", NS[w], "addr", "add", f"{IP[w]}/24", "dev", "eth0")
        sh("ip", "-n", NS[w], "link", "set", "eth0", "up")


def tear_down_network():
    for ns in NS.values():
        sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(f"/etc/netns/{ns}", ignore_errors=True)


def Proc(ns, args, ready):  # noqa: N802  (it makes a pipeline_test.Proc)
    """A kvgate process in network namespace `ns`, its stderr collected by a thread."""
    return pt.Proc(args, ready, command=["ip", "netns", "exec", ns, KVGATE] + args)


class NetnsTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        why = netns_unavailable()
        if why:
            raise unittest.SkipTest(f"network namespaces cannot be created here: {why}")
        cls.tmp = tempfile.mkdtemp(prefix="kvgate-netns-")
        certs = os.path.join(cls.tmp, "certs")
        sh("bash", os.path.join(REPO, "scripts", "make_certs.sh"), certs, *IP.values(),
           "kvgate", "*.kvgate-worker.default.svc")
        cls.token = os.path.join(cls.tmp, "cluster.token")
        cls.keys = os.path.join(cls.tmp, "api.keys")
        cls.key = secrets.token_hex(24)
        for path, text in ((cls.token, secrets.token_hex(32)), (cls.keys, cls.key)):
            with open(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600), "w") as f:
                f.write(text + "\n")
        cls.tls = ["--tls-cert", f"{certs}/node.pem", "--tls-key", f"{certs}/node.key",
                   "--tls-ca", f"{certs}/ca.pem"]
        cls.client_tls = ["--tls-ca", f"{certs}/ca.pem", "--api-key", cls.key]
        build_network()
        cls.procs = []
        try:
            cls.coord = Proc(NS["c"], ["coordinator", "--model", MODEL, "--workers", "2",
                                       "--host", IP["c"], "--port", "50051",
                                       "--admin-host", "127.0.0.1", "--admin-port", "50052",
                                       "--cluster-host", IP["c"], "--cluster-port", "50053",
                                       "--cluster-token-file", cls.token, "--api-keys", cls.keys]
                             + cls.tls, r"coordinator for")
            cls.procs.append(cls.coord)
            cls.workers = {}
            for w in ("w1", "w2"):
                # By name, as a StatefulSet's worker: the coordinator's Service name, its own
                # advertised stable name (a wildcard in the certificate).
                cls.workers[w] = Proc(NS[w], ["worker", "--coordinator", f"{NAME['c']}:50053",
                                              "--host", IP[w], "--advertise", NAME[w],
                                              "--threads", "1",
                                              "--cluster-token-file", cls.token] + cls.tls,
                                      r"registered")
                cls.procs.append(cls.workers[w])
        except Exception:
            cls.tearDownClass()
            raise

    @classmethod
    def tearDownClass(cls):
        for p in getattr(cls, "procs", []):
            p.stop()
        tear_down_network()
        shutil.rmtree(getattr(cls, "tmp", ""), ignore_errors=True)

    def kvgate_in_c(self, args, timeout=120):
        return subprocess.run(["ip", "netns", "exec", NS["c"], KVGATE] + args,
                              capture_output=True, text=True, timeout=timeout)

    def ready(self):
        p = self.kvgate_in_c(["budget", "show", "--json", "--server", "127.0.0.1:50052"] +
                             self.client_tls[:2], timeout=10)
        return p.returncode == 0 and json.loads(p.stdout)["ready"]

    def wait_ready(self, timeout):
        end = time.time() + timeout
        while time.time() < end:
            if self.ready():
                return True
            time.sleep(0.2)
        return False

    def remote(self, flags):
        p = self.kvgate_in_c(["generate", "--json", "--server", f"{IP['c']}:50051"] +
                             self.client_tls + flags)
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout)

    def local(self, flags):
        p = subprocess.run([KVGATE, "generate", "--json", "--model", MODEL, "--threads", "1"] +
                           flags, capture_output=True, text=True, timeout=300)
        self.assertEqual(p.returncode, 0, p.stderr)
        return json.loads(p.stdout)

    def test_1_greedy_output_equals_local_generation(self):
        self.assertTrue(self.wait_ready(60), "".join(self.coord.log))
        for kv in ([], ["--kv-policy", "h2o", "--kv-budget", "16", "--kv-chunk", "8"]):
            with self.subTest(kv=" ".join(kv)):
                flags = ["--prompt", PROMPT, "--max-tokens", "40", "--temperature", "0"] + kv
                self.assertEqual(self.remote(flags)["token_ids"], self.local(flags)["token_ids"])
        # Each worker is in its own namespace, dialled by the name it advertised.
        p = self.kvgate_in_c(["budget", "show", "--json", "--server", "127.0.0.1:50052"] +
                             self.client_tls[:2])
        addresses = sorted(n["address"].split(":")[0] for n in json.loads(p.stdout)["nodes"])
        self.assertEqual(addresses, [NAME["w1"], NAME["w2"]])

    def test_2_a_link_down_ends_streams_and_up_restores_serving(self):
        self.assertTrue(self.wait_ready(60))
        clients = [subprocess.Popen(
            ["ip", "netns", "exec", NS["c"], KVGATE, "generate", "--server", f"{IP['c']}:50051"]
            + self.client_tls + ["--prompt", PROMPT, "--max-tokens", "2000", "--ignore-eos",
                                 "--seed", str(i)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(4)]
        try:
            time.sleep(1.5)  # streaming
            t0 = time.time()
            sh("ip", "-n", NS["w2"], "link", "set", "eth0", "down")
            for c in clients:
                c.wait(timeout=10)
            elapsed = time.time() - t0
            for c in clients:
                err = c.stderr.read()
                self.assertNotEqual(c.returncode, 0)
                self.assertIn("UNAVAILABLE", err)
            self.assertLess(elapsed, 2.0)
            # The coordinator keeps answering.
            p = self.kvgate_in_c(["info", "--server", f"{IP['c']}:50051"] + self.client_tls)
            self.assertEqual(p.returncode, 0, p.stderr)
            self.assertEqual(json.loads(p.stdout)["health"], "NOT_SERVING")
        finally:
            for c in clients:
                if c.poll() is None:
                    c.kill()
                c.stderr.close()
            sh("ip", "-n", NS["w2"], "link", "set", "eth0", "up")
        self.assertTrue(self.wait_ready(60), "".join(self.coord.log[-10:]))
        flags = ["--prompt", PROMPT, "--max-tokens", "30", "--temperature", "0"]
        self.assertEqual(self.remote(flags)["token_ids"], self.local(flags)["token_ids"])

    def test_3_delay_and_loss_leave_the_output_unchanged(self):
        self.assertTrue(self.wait_ready(60))
        links = [(NS["w1"], "eth0"), (NS["w2"], "eth0"), (NS["c"], f"{TAG}w1b"),
                 (NS["c"], f"{TAG}w2b")]
        netem = all(sh("tc", "-n", ns, "qdisc", "add", "dev", dev, "root", "netem", "delay", "5ms",
                       "loss", "1%", check=False).returncode == 0 for ns, dev in links)
        how = "tc netem delay 5ms loss 1% on every link"
        if not netem:
            for ns, dev in links:
                sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            if shutil.which("nft") is None:
                self.fail("this kernel has no netem qdisc and nftables (nft) is not installed: "
                          "scripts/setup.sh installs it")
            for ns in NS.values():
                sh("ip", "netns", "exec", ns, "nft", "add", "table", "inet", "kvgloss")
                sh("ip", "netns", "exec", ns, "nft", "add", "chain", "inet", "kvgloss", "out",
                   "{ type filter hook output priority 0; }")
                sh("ip", "netns", "exec", ns, "nft", "add", "rule", "inet", "kvgloss", "out",
                   "oifname", "!=", "lo", "numgen", "random", "mod", "100", "<", "1", "drop")
            how = ("1% random loss on every host's sends (nftables); no delay: this kernel has no "
                   "netem qdisc (sch_netem)")
        print(f"\nimpairment: {how}", file=sys.stderr)
        try:
            flags = ["--prompt", PROMPT, "--max-tokens", "60", "--temperature", "0"]
            want = self.local(flags)["token_ids"]
            for _ in range(2):
                self.assertEqual(self.remote(flags)["token_ids"], want)
            self.assertTrue(self.ready())
        finally:
            for ns, dev in links:
                sh("tc", "-n", ns, "qdisc", "del", "dev", dev, "root", check=False)
            for ns in NS.values():
                sh("ip", "netns", "exec", ns, "nft", "delete", "table", "inet", "kvgloss",
                   check=False)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kvgate", default=KVGATE)
    args, rest = parser.parse_known_args()
    KVGATE = os.path.abspath(args.kvgate)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
