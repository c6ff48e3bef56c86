#!/usr/bin/env python3
"""kvgate serve as a user runs it: a server process on loopback, clients through
`kvgate generate --server` and `kvgate info`. Run by ctest (label `integration`):

    python3 tests/integration/serve_test.py --kvgate build/cli/kvgate

Checks: greedy output through the server equals the local engine token for token (stories260K
and the default model, with and without eviction); concurrent streams with mixed policies and
seeded sampling all equal their local runs, and run together (continuous batching); malformed requests get INVALID_ARGUMENT naming the
field; a client deadline cancels a long generation and the server is idle again at once; the
server stops cleanly on SIGTERM.
"""

import argparse
import concurrent.futures as cf
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
STORIES = os.path.join(REPO, "..", "shared", "models", "stories260K")
DEFAULT = os.path.join(REPO, "models", "kvgate-default")
KVGATE = os.path.join(REPO, "build", "cli", "kvgate")
STORIES_LOCRET = os.path.join(REPO, "models", "stories260K-eviction", "locret.safetensors")


class Server:
    """kvgate serve (a coordinator and its local workers) on a free port; its stderr is drained
    into self.log by a thread once it serves."""

    def __init__(self, model, *extra):
        self.proc = subprocess.Popen([KVGATE, "serve", "--model", model, "--port", "0",
                                      "--threads", "1", *extra],
                                     stderr=subprocess.PIPE, text=True)
        self.log = []
        m = None
        while m is None:
            line = self.proc.stderr.readline()
            if not line:
                self.proc.kill()
                raise RuntimeError("kvgate serve did not start:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(r"serving .* on 127\.0\.0\.1:(\d+)", line)
        self.addr = f"127.0.0.1:{m.group(1)}"
        self.drain = threading.Thread(target=lambda: [self.log.append(l) for l in self.proc.stderr],
                                      daemon=True)
        self.drain.start()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=10)
        self.drain.join(timeout=5)
        return code


def run(args, check=True):
    p = subprocess.run([KVGATE] + args, capture_output=True, text=True, timeout=300)
    if check and p.returncode != 0:
        raise AssertionError(f"kvgate {' '.join(args)[:200]} failed: {p.stderr.strip()}")
    return p


def generate(where, flags):
    """JSON of kvgate generate, locally (where = model dir) or through a server (host:port)."""
    target = ["--server", where] if ":" in where else ["--model", where, "--threads", "1"]
    return json.loads(run(["generate", "--json"] + target + flags).stdout)


class ServeTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # The stories model's Locret heads live beside it: registered as the locret default.
        cls.stories = Server(STORIES, "--kv-weights", STORIES_LOCRET) \
            if os.path.exists(STORIES_LOCRET) else Server(STORIES)
        cls.default = Server(DEFAULT) if os.path.exists(os.path.join(DEFAULT, "config.json")) \
            else None

    @classmethod
    def tearDownClass(cls):
        for s in (cls.stories, cls.default):
            if s is not None:
                if s.proc.poll() is None:
                    s.proc.kill()
                    s.proc.wait()

    def cases(self):
        yield STORIES, self.stories, ["--prompt", "Once upon a time", "--max-tokens", "40"]
        if self.default is not None:
            yield DEFAULT, self.default, ["--prompt", "And God said", "--max-tokens", "40"]

    def test_greedy_matches_local_engine(self):
        policies = [[], ["--kv-policy", "h2o", "--kv-budget", "8", "--kv-chunk", "4"],
                    ["--kv-policy", "streaming", "--kv-budget", "6", "--kv-chunk", "4"]]
        for model, server, prompt in self.cases():
            weights = STORIES_LOCRET if model == STORIES \
                else os.path.join(DEFAULT, "locret.safetensors")
            # The server uses the weights it registered (the policy's default); the local
            # engine is given the same file.
            extra = [["--kv-policy", "locret", "--kv-budget", "8", "--kv-chunk", "4",
                      "--kv-protected-tail", "2"]] if os.path.exists(weights) else []
            for kv in policies + extra:
                with self.subTest(model=os.path.basename(model), kv=" ".join(kv)):
                    flags = prompt + ["--temperature", "0"] + kv
                    local = generate(model, flags + (["--kv-weights", weights]
                                                     if "locret" in kv else []))
                    remote = generate(server.addr, flags)
                    self.assertEqual(remote["token_ids"], local["token_ids"])
                    self.assertEqual(remote["text"], local["text"])
                    self.assertEqual(remote["finish_reason"], local["finish_reason"])
                    for key in ("evicted_tokens", "max_retained_per_head", "peak_kv_bytes"):
                        self.assertEqual(remote["kv"][key], local["kv"][key], key)
                    if kv:
                        self.assertGreater(remote["kv"]["evicted_tokens"], 0)

    def test_concurrent_streams_with_mixed_parameters(self):
        jobs = []
        for i in range(16):
            flags = ["--prompt", ["Once upon a time", "The cat", "Lily and Ben"][i % 3],
                     "--max-tokens", str(10 + 3 * i), "--seed", str(i)]
            flags += [["--temperature", "0"], ["--temperature", "0.8", "--top-p", "0.9"],
                      ["--temperature", "1.0", "--top-k", "20", "--min-p", "0.05"]][i % 3]
            flags += [[], ["--kv-policy", "tova", "--kv-budget", "12", "--kv-chunk", "8"],
                      ["--kv-policy", "snapkv", "--kv-budget", "16", "--kv-chunk", "8",
                       "--kv-window", "4"],
                      ["--kv-policy", "streaming", "--kv-budget", "10"]][i % 4]
            jobs.append(flags)
        with cf.ThreadPoolExecutor(max_workers=16) as ex:
            remote = list(ex.map(lambda f: generate(self.stories.addr, f), jobs))
        for flags, r in zip(jobs, remote):
            with self.subTest(flags=" ".join(flags)):
                self.assertEqual(r["token_ids"], generate(STORIES, flags)["token_ids"])
        info = json.loads(run(["info", "--server", self.stories.addr]).stdout)
        self.assertGreaterEqual(info["server"]["requests_served"], 16)
        self.assertEqual(info["server"]["requests_running"], 0)

    def test_requests_run_together(self):
        """Continuous batching: concurrent streams are stepped together, not one after another."""
        flags = ["--prompt", "Once upon a time", "--max-tokens", "400", "--ignore-eos",
                 "--temperature", "0"]
        with cf.ThreadPoolExecutor(max_workers=4) as ex:
            futures = [ex.submit(generate, self.stories.addr, flags) for _ in range(4)]
            most = 0
            deadline = time.time() + 10
            while not all(f.done() for f in futures) and time.time() < deadline:
                info = json.loads(run(["info", "--server", self.stories.addr]).stdout)["server"]
                most = max(most, info["requests_running"])
            results = [f.result() for f in futures]
        self.assertGreaterEqual(most, 2, "the streams ran one at a time")
        self.assertTrue(all(r["token_ids"] == results[0]["token_ids"] for r in results))
        self.assertEqual(len(results[0]["token_ids"]), 400)

    def test_malformed_requests_name_the_field(self):
        addr = self.stories.addr
        cases = [
            (["--prompt", "x", "--max-tokens", "100000"], "max_tokens"),
            (["--prompt", "x", "--temperature", "-1"], "sampling"),
            (["--prompt", "x", "--top-p", "2"], "sampling"),
            (["--prompt", "x", "--kv-policy", "bogus", "--kv-budget", "4"], "kv"),
            (["--prompt", "x", "--kv-policy", "attention-gate", "--kv-budget", "8"],
             "kv.weights_name"),
            (["--prompt", "x", "--kv-policy", "locret", "--kv-budget", "8",
              "--kv-weights-name", "../../etc/shadow"], "kv.weights_name"),
            (["--prompt", "x", "--kv-policy", "locret", "--kv-budget", "8",
              "--kv-weights-name", "nope"], "kv.weights_name"),
            (["--prompt", "x", "--kv-policy", "h2o", "--kv-budget", "8",
              "--kv-weights-name", "locret"], "kv.weights_name"),
            (["--prompt-ids", ",".join(["5"] * 600)], "prompt"),
            (["--prompt-ids", "1,2,99999"], "prompt.token_ids"),
            (["--prompt", "x", "--stop", ""], "stop"),
            # Limits on every field (issue 13, point 7).
            (["--prompt", "x", "--request-id", "r" * 129], "request_id"),
            (["--prompt", "x", "--request-id", "a\x01b"], "request_id"),
            (["--prompt", "x"] + [a for i in range(17) for a in ("--stop", f"s{i}")], "stop"),
            (["--prompt", "x", "--stop", "y" * 513], "stop"),
            (["--prompt", "x", "--stop-token-id", "99999"], "stop_token_ids"),
            (["--prompt", "x", "--kv-policy", "h2o", "--kv-budget", str(1 << 32)], "kv.budget"),
        ]
        for flags, field in cases:
            with self.subTest(flags=" ".join(flags)[:60]):
                p = run(["generate", "--server", addr] + flags, check=False)
                self.assertNotEqual(p.returncode, 0)
                self.assertIn("INVALID_ARGUMENT", p.stderr)
                self.assertIn(field + ":", p.stderr)
                self.assertEqual(p.stderr.count("\n"), 1, p.stderr)
                self.assertLess(len(p.stderr), 300, "an error never echoes a large field")

    def test_server_made_request_ids_are_random(self):
        addr = self.stories.addr
        ids = [generate(addr, ["--prompt", "x", "--max-tokens", "1"])["request_id"]
               for _ in range(2)]
        for rid in ids:
            self.assertRegex(rid, r"^req-[0-9a-f]{32}$")
        self.assertNotEqual(ids[0], ids[1])

    def test_deadline_cancels_and_frees(self):
        server = self.default or self.stories
        t0 = time.time()
        p = run(["generate", "--server", server.addr, "--prompt", "And", "--ignore-eos",
                 "--max-tokens", "2000", "--temperature", "0", "--timeout", "0.3"], check=False)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("DEADLINE_EXCEEDED", p.stderr)
        self.assertLess(time.time() - t0, 5)
        deadline = time.time() + 2
        while True:
            info = json.loads(run(["info", "--server", server.addr]).stdout)["server"]
            if info["requests_running"] == 0 and info["requests_queued"] == 0:
                break
            self.assertLess(time.time(), deadline, f"still running 2 s after the deadline: {info}")
            time.sleep(0.05)
        r = generate(server.addr, ["--prompt", "And", "--max-tokens", "5", "--temperature", "0"])
        self.assertEqual(len(r["token_ids"]), 5)

    def test_deadline_during_a_long_prefill(self):
        if self.default is None:
            self.skipTest("models/kvgate-default is missing")
        # 2,000 prompt tokens one at a time take over 10 s to prefill on one thread here.
        ids = ",".join(["0"] + [str(5 + i % 1000) for i in range(1999)])
        t0 = time.time()
        p = run(["generate", "--server", self.default.addr, "--prompt-ids", ids,
                 "--prefill-chunk", "1", "--max-tokens", "1", "--timeout", "0.2"], check=False)
        self.assertIn("DEADLINE_EXCEEDED", p.stderr)
        deadline = time.time() + 1.0
        while True:
            info = json.loads(run(["info", "--server", self.default.addr]).stdout)["server"]
            if info["requests_running"] == 0:
                break
            self.assertLess(time.time(), deadline,
                            "the prefill was not cancelled within 1 s of the deadline")
            time.sleep(0.02)
        self.assertLess(time.time() - t0, 2.0)

    def test_abort_by_request_id(self):
        if self.default is None:
            self.skipTest("models/kvgate-default is missing")
        addr = self.default.addr  # 1,500 tokens of the default model: seconds, not milliseconds
        flags = ["--prompt", "And", "--max-tokens", "1500", "--ignore-eos", "--temperature", "0",
                 "--request-id", "long-one"]
        with cf.ThreadPoolExecutor(max_workers=1) as ex:
            future = ex.submit(run, ["generate", "--server", addr] + flags, False)
            deadline = time.time() + 5
            while True:  # until the request is known to the server
                p = run(["abort", "--server", addr, "--request-id", "long-one"], check=False)
                if p.returncode == 0:
                    break
                self.assertIn("no request 'long-one'", p.stderr)
                self.assertLess(time.time(), deadline)
            gen = future.result()
        self.assertNotEqual(gen.returncode, 0)
        self.assertIn("CANCELLED", gen.stderr)
        p = run(["abort", "--server", addr, "--request-id", "long-one"], check=False)
        self.assertNotEqual(p.returncode, 0)  # gone
        info = json.loads(run(["info", "--server", addr]).stdout)["server"]
        self.assertEqual(info["requests_running"], 0)

    def test_model_info(self):
        info = json.loads(run(["info", "--server", self.stories.addr]).stdout)
        self.assertEqual(info["model"]["num_layers"], 5)
        self.assertEqual(info["model"]["vocab_size"], 512)
        self.assertTrue(info["model"]["has_tokenizer"])
        self.assertEqual(info["server"]["stages"], 1)

    def test_bad_flags_are_one_line_errors_and_dry_run_checks_them(self):
        model = os.path.join(REPO, "models", "kvgate-default")
        fd, token = tempfile.mkstemp()  # private: mode 0600
        os.write(fd, os.urandom(16).hex().encode())
        os.close(fd)
        self.addCleanup(os.unlink, token)
        for cmd in ("serve", "coordinator"):
            extra = ["--workers", "2", "--cluster-token-file", token] if cmd == "coordinator" else []
            for flags, says in [(["--kv-policy", "nonsense"], "unknown --kv-policy 'nonsense'"),
                                (["--max-batch", "0"], "--max-batch must be >= 1"),
                                (["--health-port", "70000"], "--health-port must be in")]:
                with self.subTest(cmd=cmd, flags=flags):
                    p = run([cmd, "--model", model, "--dry-run"] + extra + flags, check=False)
                    self.assertEqual(p.returncode, 1, p.stderr)
                    self.assertIn(says, p.stderr)
                    self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        p = run(["serve", "--model", model, "--stages", "2", "--dry-run"], check=False)
        self.assertEqual(p.returncode, 0, p.stderr)
        self.assertIn("dry run: flags and files check out", p.stdout)

    def test_stops_on_sigterm(self):
        s = Server(STORIES)
        self.assertEqual(s.stop(), 0)
        p = run(["generate", "--server", s.addr, "--prompt", "x", "--timeout", "2"], check=False)
        self.assertIn("UNAVAILABLE", p.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvgate", default=KVGATE)
    args, rest = ap.parse_known_args()
    KVGATE = os.path.abspath(args.kvgate)
    if not os.path.exists(os.path.join(STORIES, "config.json")):
        print(f"{STORIES} is missing: this test needs ../shared/models beside the repository",
              file=sys.stderr)
        sys.exit(1)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
