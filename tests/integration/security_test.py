#!/usr/bin/env python3
"""kvgate's planes under attack, as another local process would try it: Python grpcio (Debian's
python3-grpcio, a client nobody here wrote) with stubs protoc makes from proto/ at run time,
server reflection, raw TCP. Every probe of issue 13 is repeated against `kvgate serve --stages 2`
with API keys, once in plaintext and once with TLS (mutual on the cluster planes), and must be
refused or harmless:

- the public port serves only the public API (and health, reflection); nothing public reveals a
  worker's address; admin and cluster listeners are on loopback;
- a missing or wrong API key is UNAUTHENTICATED; the admin API wants an admin key; keys reload
  on SIGHUP; only the key that started a request (or an admin key) aborts it;
- workers obey only their coordinator (LoadShard, Connect, Step, Free from anyone else are
  refused), the coordinator takes Register and Heartbeat only from holders of the cluster's
  credential, a stranger on a worker's data port changes nothing;
- no request makes the server open a file (the old kv.weights path field is gone); every field
  is bounded.

    /usr/bin/python3 tests/integration/security_test.py --kvgate build/cli/kvgate
"""

import argparse
import concurrent.futures as cf
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STORIES = os.path.join(REPO, "..", "shared", "models", "stories260K")
DEFAULT = os.path.join(REPO, "models", "kvgate-default")
# The default model: long generations take seconds, time enough to probe them while they run.
MODEL = DEFAULT
KVGATE = os.path.join(REPO, "build", "cli", "kvgate")
WORK = tempfile.mkdtemp(prefix="kvgate-security-")

try:
    import grpc
except ImportError:  # the test command installs python3-grpcio; say so instead of failing
    grpc = None


def make_stubs():
    """protoc + grpc_python_plugin on proto/kvgate/v1 into WORK; returns the modules."""
    out = os.path.join(WORK, "py")
    os.makedirs(out, exist_ok=True)
    subprocess.run(["protoc", "-I" + os.path.join(REPO, "proto"), "--python_out=" + out,
                    "--grpc_python_out=" + out,
                    "--plugin=protoc-gen-grpc_python=" + shutil.which("grpc_python_plugin"),
                    "kvgate/v1/kvgate.proto", "kvgate/v1/internal.proto"], check=True)
    sys.path.insert(0, out)
    from kvgate.v1 import internal_pb2, internal_pb2_grpc, kvgate_pb2, kvgate_pb2_grpc
    return kvgate_pb2, kvgate_pb2_grpc, internal_pb2, internal_pb2_grpc


def write_secret(path, lines):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join(lines) + "\n")


def certs(name):
    d = os.path.join(WORK, name)
    if not os.path.exists(os.path.join(d, "node.pem")):
        subprocess.run(["bash", os.path.join(REPO, "scripts", "make_certs.sh"), d], check=True,
                       capture_output=True)
    return {k: os.path.join(d, f) for k, f in
            (("ca", "ca.pem"), ("cert", "node.pem"), ("key", "node.key"))}


def read(path):
    with open(path, "rb") as f:
        return f.read()


def varint(data, i):
    value, shift = 0, 0
    while True:
        b = data[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def fields(data):
    """(field number, wire type, value) of a protobuf message's bytes."""
    i = 0
    while i < len(data):
        key, i = varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(data, i)
        elif wire == 2:
            n, i = varint(data, i)
            value, i = data[i:i + n], i + n
        elif wire == 1:
            value, i = data[i:i + 8], i + 8
        elif wire == 5:
            value, i = data[i:i + 4], i + 4
        else:
            raise ValueError("unsupported wire type")
        yield number, wire, value


class Cluster:
    """`kvgate serve --stages 2` with API and admin keys; `tls`: with certificates and a CA."""

    def __init__(self, tls):
        self.tls = tls
        self.api_keys = os.path.join(WORK, f"api-keys-{tls}")
        self.admin_keys = os.path.join(WORK, f"admin-keys-{tls}")
        self.key, self.other_key = "user-key-" + "a" * 20, "other-key-" + "b" * 20
        self.admin_key = "admin-key-" + "c" * 20
        write_secret(self.api_keys, [self.key, self.other_key])
        write_secret(self.admin_keys, [self.admin_key])
        args = [KVGATE, "serve", "--model", MODEL, "--port", "0", "--stages", "2",
                "--threads", "1", "--api-keys", self.api_keys, "--admin-keys", self.admin_keys]
        if tls:
            self.certs = certs("cluster-ca")
            args += ["--tls-cert", self.certs["cert"], "--tls-key", self.certs["key"],
                     "--tls-ca", self.certs["ca"]]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        self.log = []
        self.workers, self.data = [], []
        m = None
        while m is None:
            line = self.proc.stderr.readline()
            if not line:
                self.proc.kill()
                raise RuntimeError("kvgate serve did not start:\n" + "".join(self.log))
            self.log.append(line)
            w = re.search(r"listening on (\S+), data on (\S+)\)", line)
            if w:
                self.workers.append(w.group(1))
                self.data.append(w.group(2))
            m = re.search(r"serving .* on ([\d.]+):(\d+) .*admin ([\d.]+):(\d+), "
                          r"cluster ([\d.]+):(\d+)", line)
        self.start_line = line
        self.public = f"127.0.0.1:{m.group(2)}"
        self.admin_host, self.admin = m.group(3), f"127.0.0.1:{m.group(4)}"
        self.cluster_host, self.cluster = m.group(5), f"127.0.0.1:{m.group(6)}"
        self.drain = threading.Thread(target=lambda: [self.log.append(l) for l in self.proc.stderr],
                                      daemon=True)
        self.drain.start()

    def channel(self, addr, client_cert=None):
        """A grpcio channel; with TLS it trusts the cluster's CA, and shows `client_cert`
        ({"cert", "key"}) when given."""
        if not self.tls:
            return grpc.insecure_channel(addr)
        creds = grpc.ssl_channel_credentials(
            root_certificates=read(self.certs["ca"]),
            private_key=read(client_cert["key"]) if client_cert else None,
            certificate_chain=read(client_cert["cert"]) if client_cert else None)
        return grpc.secure_channel(addr, creds)

    def cli(self, args, key=None, check=True, server=None):
        """kvgate CLI client against the public API (or `server`)."""
        head = 2 if args[0] == "budget" else 1  # after `budget show`
        full = [KVGATE] + args[:head] + ["--server", server or self.public] + args[head:]
        if self.tls:
            full += ["--tls-ca", self.certs["ca"]]
        if key:
            full += ["--api-key", key]
        p = subprocess.run(full, capture_output=True, text=True, timeout=120)
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(full)[:200]}: {p.stderr}")
        return p

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.drain.join(timeout=5)


class SecurityProbes:
    """The probes; subclasses pick plaintext or TLS."""
    TLS = False

    @classmethod
    def setUpClass(cls):
        if grpc is None:
            raise unittest.SkipTest("python3-grpcio is not installed (scripts/setup.sh installs it)")
        cls.pb, cls.pb_grpc, cls.ipb, cls.ipb_grpc = make_stubs()
        cls.c = Cluster(cls.TLS)

    @classmethod
    def tearDownClass(cls):
        if hasattr(cls, "c"):
            cls.c.stop()

    # --- helpers ---
    def meta(self, key):
        return (("authorization", f"Bearer {key}"),) if key else ()

    def public_stub(self):
        return self.pb_grpc.KvgateStub(self.c.channel(self.c.public))

    def admin_stub(self):
        return self.pb_grpc.KvgateAdminStub(self.c.channel(self.c.admin))

    def generate(self, key, **fields):
        req = self.pb.GenerateRequest(**fields)
        stream = self.public_stub().Generate(req, metadata=self.meta(key), timeout=60)
        ids = []
        for msg in stream:
            if msg.HasField("chunk"):
                ids += list(msg.chunk.token_ids)
        return ids

    def greedy(self):
        return self.generate(self.c.key, text="And God said", max_tokens=30,
                             sampling=self.pb.SamplingParams(temperature=0))

    def budgets(self):
        return self.admin_stub().GetBudgets(self.pb.GetBudgetsRequest(),
                                            metadata=self.meta(self.c.admin_key), timeout=10)

    def assertRefused(self, call, codes=None):
        """The call fails with UNAUTHENTICATED (or one of `codes`), saying nothing else."""
        codes = codes or (grpc.StatusCode.UNAUTHENTICATED,)
        with self.assertRaises(grpc.RpcError) as e:
            call()
        self.assertIn(e.exception.code(), codes, e.exception.details())
        return e.exception

    def healthy(self):
        """The service still serves, and serves the same tokens."""
        self.assertEqual(self.greedy(), self.baseline)
        b = self.budgets()
        self.assertTrue(b.ready)
        self.assertEqual(len(b.nodes), 2)
        for n in b.nodes:
            self.assertFalse(n.pressure)
            self.assertLess(n.kv_used_bytes, 1 << 40)
            self.assertEqual(list(n.layer_caps), [0] * (n.last_layer - n.first_layer))

    def setUp(self):
        if not hasattr(type(self), "baseline"):
            type(self).baseline = self.greedy()
            self.assertEqual(len(self.baseline), 30)

    # --- listeners ---
    def test_public_port_serves_only_the_public_api(self):
        ch = self.c.channel(self.c.public)
        # Server reflection: list_services (ServerReflectionRequest field 7).
        call = ch.stream_stream("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                                request_serializer=lambda b: b, response_deserializer=lambda b: b)
        reply = next(iter(call(iter([b"\x3a\x00"]), timeout=10)))
        services = set()
        for number, _, value in fields(reply):
            if number == 6:  # list_services_response
                for n2, _, service in fields(value):
                    if n2 == 1:
                        services.update(v.decode() for n3, _, v in fields(service) if n3 == 1)
        self.assertIn("kvgate.v1.Kvgate", services)
        self.assertFalse({"kvgate.v1.KvgateAdmin", "kvgate.v1.Coordinator", "kvgate.v1.Worker"}
                         & services, services)
        # Calling them anyway: UNIMPLEMENTED.
        self.assertRefused(lambda: self.pb_grpc.KvgateAdminStub(ch).SetBudget(
            self.pb.SetBudgetRequest(tokens=1), metadata=self.meta(self.c.admin_key), timeout=5),
            (grpc.StatusCode.UNIMPLEMENTED,))
        self.assertRefused(lambda: self.ipb_grpc.CoordinatorStub(ch).Register(
            self.ipb.RegisterRequest(address="x:1", data_address="x:2",
                                     memory_limit_bytes=1 << 62), timeout=5),
            (grpc.StatusCode.UNIMPLEMENTED,))
        self.assertRefused(lambda: self.ipb_grpc.WorkerStub(ch).Free(
            self.ipb.FreeRequest(all=True), timeout=5), (grpc.StatusCode.UNIMPLEMENTED,))
        # Health stays open (load balancers and probes).
        check = ch.unary_unary("/grpc.health.v1.Health/Check", request_serializer=lambda b: b,
                               response_deserializer=lambda b: b)
        self.assertEqual(check(b"", timeout=5), b"\x08\x01")

    def test_admin_and_cluster_listen_on_loopback(self):
        self.assertEqual(self.c.admin_host, "127.0.0.1")
        self.assertEqual(self.c.cluster_host, "127.0.0.1")
        self.assertNotEqual(self.c.admin, self.c.public)
        self.assertNotEqual(self.c.cluster, self.c.public)

    def test_nothing_public_reveals_workers(self):
        stub = self.public_stub()
        replies = [stub.GetServerInfo(self.pb.GetServerInfoRequest(), metadata=self.meta(self.c.key),
                                      timeout=5),
                   stub.GetModelInfo(self.pb.GetModelInfoRequest(), metadata=self.meta(self.c.key),
                                     timeout=5)]
        for msg in stub.Generate(self.pb.GenerateRequest(text="Hi", max_tokens=3),
                                 metadata=self.meta(self.c.key), timeout=30):
            replies.append(msg)
        blob = b"".join(r.SerializeToString() for r in replies)
        for addr in self.c.workers + self.c.data + [self.c.cluster, self.c.admin]:
            self.assertNotIn(addr.encode(), blob)
            self.assertNotIn(addr.rsplit(":", 1)[1].encode(), blob.replace(b"127.0.0.1", b""))
        self.assertNotIn(os.path.abspath(MODEL).encode(), blob)

    # --- API keys ---
    def test_a_missing_or_wrong_key_is_unauthenticated(self):
        stub = self.public_stub()
        for meta in ((), self.meta("wrong-key-" + "z" * 20), (("authorization", "Basic abc"),),
                     self.meta(self.c.admin_key)):
            e = self.assertRefused(lambda: stub.GetServerInfo(self.pb.GetServerInfoRequest(),
                                                              metadata=meta, timeout=5))
            self.assertEqual(e.details(), "a valid API key is required")
            e = self.assertRefused(lambda: list(stub.Generate(
                self.pb.GenerateRequest(text="Hi", max_tokens=2), metadata=meta, timeout=5)))
            self.assertEqual(e.details(), "a valid API key is required")
        # The CLI, with the key as a flag and from the environment.
        p = self.c.cli(["info"], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("UNAUTHENTICATED", p.stderr)
        self.assertEqual(json.loads(self.c.cli(["info"], key=self.c.key).stdout)["health"],
                         "SERVING")
        full = [KVGATE, "info", "--server", self.c.public] + \
            (["--tls-ca", self.c.certs["ca"]] if self.TLS else [])
        p = subprocess.run(full, capture_output=True, text=True,
                           env=dict(os.environ, KVGATE_API_KEY=self.c.other_key))
        self.assertEqual(p.returncode, 0, p.stderr)
        # Keys never reach the log.
        self.assertFalse(any(k in "".join(self.c.log)
                             for k in (self.c.key, self.c.other_key, self.c.admin_key)))

    def test_admin_api_needs_an_admin_key(self):
        admin = self.admin_stub()
        for meta in ((), self.meta(self.c.key)):
            self.assertRefused(lambda: admin.SetBudget(self.pb.SetBudgetRequest(tokens=1),
                                                       metadata=meta, timeout=5))
            self.assertRefused(lambda: admin.GetBudgets(self.pb.GetBudgetsRequest(),
                                                        metadata=meta, timeout=5))
            self.assertRefused(lambda: next(iter(admin.WatchUsage(
                self.pb.WatchUsageRequest(period_ms=50), metadata=meta, timeout=5))))
        p = self.c.cli(["budget", "show"], server=self.c.admin, check=False)
        self.assertIn("UNAUTHENTICATED", p.stderr)
        self.c.cli(["budget", "show", "--json"], server=self.c.admin, key=self.c.admin_key)
        self.healthy()

    def test_only_the_owner_aborts(self):
        stub = self.public_stub()
        req = self.pb.GenerateRequest(text="And", max_tokens=1500, ignore_eos=True,
                                      request_id="mine-" + str(self.TLS))
        stream = stub.Generate(req, metadata=self.meta(self.c.key), timeout=120)
        first = next(iter(stream))  # running now
        self.assertTrue(first.HasField("chunk"))
        found = stub.Abort(self.pb.AbortRequest(request_id=req.request_id),
                           metadata=self.meta(self.c.other_key), timeout=5)
        self.assertFalse(found.found)
        self.assertRefused(lambda: stub.Abort(self.pb.AbortRequest(request_id=req.request_id),
                                              timeout=5))
        found = stub.Abort(self.pb.AbortRequest(request_id=req.request_id),
                           metadata=self.meta(self.c.key), timeout=5)
        self.assertTrue(found.found)
        e = self.assertRefused(lambda: list(stream), (grpc.StatusCode.CANCELLED,))
        # An admin key aborts anyone's request.
        req.request_id += "-2"
        stream = stub.Generate(req, metadata=self.meta(self.c.other_key), timeout=120)
        next(iter(stream))
        self.assertTrue(stub.Abort(self.pb.AbortRequest(request_id=req.request_id),
                                   metadata=self.meta(self.c.admin_key), timeout=5).found)
        self.assertRefused(lambda: list(stream), (grpc.StatusCode.CANCELLED,))

    def test_keys_reload_on_sighup(self):
        new_key = "rotated-key-" + "d" * 20
        try:
            write_secret(self.c.api_keys, [new_key, self.c.other_key])
            self.c.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 5
            while not any("reloaded 2 API keys" in l for l in self.c.log):
                self.assertLess(time.time(), deadline, "".join(self.c.log[-5:]))
                time.sleep(0.05)
            stub = self.public_stub()
            stub.GetServerInfo(self.pb.GetServerInfoRequest(), metadata=self.meta(new_key),
                               timeout=5)
            self.assertRefused(lambda: stub.GetServerInfo(self.pb.GetServerInfoRequest(),
                                                          metadata=self.meta(self.c.key),
                                                          timeout=5))
            # A bad file keeps the keys in force.
            write_secret(self.c.api_keys, ["short"])
            self.c.proc.send_signal(signal.SIGHUP)
            deadline = time.time() + 5
            while not any("keeping the API keys" in l for l in self.c.log):
                self.assertLess(time.time(), deadline)
                time.sleep(0.05)
            stub.GetServerInfo(self.pb.GetServerInfoRequest(), metadata=self.meta(new_key),
                               timeout=5)
        finally:
            write_secret(self.c.api_keys, [self.c.key, self.c.other_key])
            self.c.proc.send_signal(signal.SIGHUP)
            time.sleep(0.5)
        self.healthy()

    # --- workers and the cluster plane ---
    def stranger_channels(self, addr):
        """Channels a stranger can open to an internal listener: plaintext (or, under mutual
        TLS: no client certificate, and a certificate from another CA)."""
        if not self.TLS:
            return [grpc.insecure_channel(addr)]
        other = certs("other-ca")
        return [self.c.channel(addr),
                self.c.channel(addr, client_cert=other)]

    def test_workers_obey_only_their_coordinator(self):
        # A long stream runs while strangers try to drive the workers.
        stub = self.public_stub()
        req = self.pb.GenerateRequest(text="And", max_tokens=300, ignore_eos=True,
                                      sampling=self.pb.SamplingParams(temperature=0))
        with cf.ThreadPoolExecutor(max_workers=1) as ex:
            running = ex.submit(lambda: list(stub.Generate(req, metadata=self.meta(self.c.key),
                                                           timeout=120)))
            time.sleep(0.3)
            refused = [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE]
            channels = []
            for addr in self.c.workers:
                channels += self.stranger_channels(addr)
                if self.TLS:  # an insider's certificate without the control token
                    channels.append(self.c.channel(addr, client_cert=self.c.certs))
            for ch in channels:
                w = self.ipb_grpc.WorkerStub(ch)
                self.assertRefused(lambda: w.LoadShard(self.ipb.ShardAssignment(
                    model_dir="/etc", stage=1, num_stages=2, first_layer=0, last_layer=1),
                    timeout=5), refused)
                self.assertRefused(lambda: w.Free(self.ipb.FreeRequest(all=True), timeout=5),
                                   refused)
                self.assertRefused(lambda: w.Connect(self.ipb.PipelineWiring(
                    next_data_address="127.0.0.1:9", first_step_id=1 << 40), timeout=5), refused)
                self.assertRefused(lambda: w.Step(self.ipb.StepPlan(step_id=1 << 41), timeout=5),
                                   refused)
                # A guessed control token is no better.
                self.assertRefused(lambda: w.Free(
                    self.ipb.FreeRequest(all=True), timeout=5,
                    metadata=(("x-kvgate-control", "0" * 64),)), refused)
            chunks = running.result()
        self.assertEqual(sum(len(c.chunk.token_ids) for c in chunks if c.HasField("chunk")), 300)
        self.healthy()

    def test_only_cluster_members_register_or_heartbeat(self):
        refused = [grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.UNAVAILABLE]
        usage = self.ipb.WorkerUsage(kv_used_bytes=1 << 62, pressure=True)
        node_ids = [n.node_id for n in self.budgets().nodes]
        for n in node_ids:
            self.assertRegex(n, r"^w-[0-9a-f]{32}$")
        for ch in self.stranger_channels(self.c.cluster):
            coord = self.ipb_grpc.CoordinatorStub(ch)
            for meta in ((), (("x-kvgate-cluster-token", "f" * 64),)):
                self.assertRefused(lambda: coord.Register(self.ipb.RegisterRequest(
                    address="127.0.0.1:1", data_address="127.0.0.1:2",
                    memory_limit_bytes=1 << 62, control_token="x" * 64), metadata=meta,
                    timeout=5), refused)
                for wid in node_ids + ["w1", "w2"]:
                    self.assertRefused(lambda: coord.Heartbeat(self.ipb.HeartbeatRequest(
                        worker_id=wid, usage=usage), metadata=meta, timeout=5), refused)
        time.sleep(0.5)  # past a heartbeat, had one been believed
        self.healthy()

    def test_a_worker_without_the_credential_cannot_join(self):
        args = [KVGATE, "worker", "--coordinator", self.c.cluster, "--threads", "1"]
        if self.TLS:
            other = certs("other-ca")
            args += ["--tls-cert", other["cert"], "--tls-key", other["key"], "--tls-ca",
                     other["ca"]]
        else:
            token = os.path.join(WORK, "wrong-token")
            write_secret(token, ["e" * 64])
            args += ["--cluster-token-file", token]
        w = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        try:
            lines = []
            while not any("waiting for the coordinator" in l for l in lines):
                line = w.stderr.readline()
                self.assertTrue(line, "".join(lines))
                lines.append(line)
            time.sleep(1)
            self.assertEqual(len(self.budgets().nodes), 2)
        finally:
            w.send_signal(signal.SIGTERM)
            w.wait(timeout=10)
            w.stderr.close()
        self.healthy()

    def test_strangers_on_the_data_plane_change_nothing(self):
        for addr in self.c.data:
            host, port = addr.rsplit(":", 1)
            for payload in (b"junk" * 100, b"HGvk" + b"\x40\x00\x00\x00" + b"0" * 64,
                            b"\x31Gvk" + b"\x00" * 20 + b"\xff" * 8):
                with socket.create_connection((host, int(port)), timeout=5) as s:
                    try:
                        s.sendall(payload)
                        time.sleep(0.05)
                    except OSError:
                        pass
            # One that connects and says nothing.
            idle = socket.create_connection((host, int(port)), timeout=5)
            self.healthy()
            idle.close()
        self.healthy()

    # --- requests ---
    def test_no_request_opens_a_file(self):
        canary = os.path.join(WORK, "canary.safetensors")
        with open(canary, "wb") as f:
            f.write(b"CANARY-SECRET-" * 40)
        # A policy whose weights the server has none of (attention-gate; locret too for stories).
        kv = self.pb.KvParams(policy="locret", budget=8, weights_name="absent")
        # The removed field 7 (a server path), written by hand: ignored.
        path = canary.encode()
        kv_bytes = kv.SerializeToString() + b"\x3a" + bytes([len(path)]) + path
        raw = self.pb.GenerateRequest(text="Hi", max_tokens=2).SerializeToString() + \
            b"\x52" + bytes([len(kv_bytes)]) + kv_bytes
        call = self.c.channel(self.c.public).unary_stream(
            "/kvgate.v1.Kvgate/Generate", request_serializer=lambda b: b,
            response_deserializer=lambda b: b)
        for request in (raw,
                        self.pb.GenerateRequest(text="Hi", kv=self.pb.KvParams(
                            policy="locret", budget=8, weights_name=canary)).SerializeToString(),
                        self.pb.GenerateRequest(text="Hi", kv=self.pb.KvParams(
                            policy="attention-gate", budget=8,
                            weights_name="../../etc/shadow")).SerializeToString()):
            e = self.assertRefused(lambda: list(call(request, metadata=self.meta(self.c.key),
                                                     timeout=10)),
                                   (grpc.StatusCode.INVALID_ARGUMENT,))
            self.assertTrue(e.details().startswith("kv.weights_name:"), e.details())
            self.assertNotIn("CANARY", e.details())
            self.assertNotIn("560", e.details())  # the canary's size

    def test_every_field_is_bounded(self):
        stub = self.public_stub()
        cases = [
            (dict(text="x", request_id="r" * (1 << 20)), "request_id"),
            (dict(text="x", request_id="a\x01b"), "request_id"),
            (dict(text="x", stop=["s"] * 100000), "stop"),
            (dict(text="x", kv=self.pb.KvParams(policy="locret", budget=8, stabilizers=-1)),
             "kv.stabilizers"),
            (dict(text="x", stop_token_ids=[1 << 30]), "stop_token_ids"),
        ]
        for fields_, name in cases:
            e = self.assertRefused(lambda: list(stub.Generate(
                self.pb.GenerateRequest(**fields_), metadata=self.meta(self.c.key), timeout=10)),
                (grpc.StatusCode.INVALID_ARGUMENT,))
            self.assertTrue(e.details().startswith(name + ":"), e.details())
            self.assertLess(len(e.details()), 300)
        ids = set()
        for _ in range(2):
            for msg in stub.Generate(self.pb.GenerateRequest(text="x", max_tokens=1),
                                     metadata=self.meta(self.c.key), timeout=10):
                if msg.HasField("final"):
                    ids.add(msg.final.request_id)
        self.assertEqual(len(ids), 2)
        for rid in ids:
            self.assertRegex(rid, r"^req-[0-9a-f]{32}$")


class PlaintextTest(SecurityProbes, unittest.TestCase):
    TLS = False


class TlsTest(SecurityProbes, unittest.TestCase):
    TLS = True

    def test_plaintext_clients_are_refused(self):
        p = subprocess.run([KVGATE, "info", "--server", self.c.public, "--api-key", self.c.key,
                            "--timeout", "3"], capture_output=True, text=True)
        self.assertNotEqual(p.returncode, 0)
        ch = grpc.insecure_channel(self.c.public)
        self.assertRefused(lambda: self.pb_grpc.KvgateStub(ch).GetServerInfo(
            self.pb.GetServerInfoRequest(), metadata=self.meta(self.c.key), timeout=3),
            (grpc.StatusCode.UNAVAILABLE,))
        # A client trusting another CA does not talk to this server.
        other = certs("other-ca")
        p = subprocess.run([KVGATE, "info", "--server", self.c.public, "--api-key", self.c.key,
                            "--tls-ca", other["ca"], "--timeout", "3"],
                           capture_output=True, text=True)
        self.assertNotEqual(p.returncode, 0)


class StartupTest(unittest.TestCase):
    """Exposing a plane without its credential is refused at start, with the flag to give."""

    def refuse(self, args, want):
        p = subprocess.run([KVGATE] + args, capture_output=True, text=True, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn(want, p.stderr)
        self.assertEqual(p.stderr.count("\n"), 1, p.stderr)

    def test_refusals(self):
        base = ["--model", STORIES, "--port", "0"]
        self.refuse(["coordinator", "--workers", "1"] + base, "--cluster-token-file")
        self.refuse(["serve", "--admin-host", "0.0.0.0"] + base, "--admin-keys")
        self.refuse(["serve", "--cluster-host", "0.0.0.0"] + base, "--cluster-token-file")
        self.refuse(["worker", "--coordinator", "127.0.0.1:1"], "--cluster-token-file")
        loose = os.path.join(WORK, "loose-token")
        with open(loose, "w") as f:
            f.write("x" * 64)
        os.chmod(loose, 0o644)
        self.refuse(["worker", "--coordinator", "127.0.0.1:1", "--cluster-token-file", loose],
                    "chmod 600")
        c = certs("cluster-ca")
        self.refuse(["serve", "--tls-ca", c["ca"]] + base, "--tls-cert")
        self.refuse(["serve", "--tls-cert", c["cert"]] + base, "--tls-key")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--kvgate", default=KVGATE)
    args, rest = parser.parse_known_args()
    KVGATE = os.path.abspath(args.kvgate)
    try:
        unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
    finally:
        shutil.rmtree(WORK, ignore_errors=True)
