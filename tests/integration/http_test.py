#!/usr/bin/env python3
"""kvgate's OpenAI-compatible HTTP API, driven by clients nobody here wrote: the official `openai`
Python package (PyPI, in .venv: scripts/test.sh installs tests/integration/requirements.txt)
and `curl -N` for the raw server-sent events. Run by ctest (label `integration`):

    python3 tests/integration/http_test.py --kvgate build/cli/kvgate

Checks: /v1/models; a greedy completion equals the local engine's text (`kvgate generate`);
the streamed chunks add up to the same text and end with a finish reason, the usage chunk
(`stream_options.include_usage`) and `data: [DONE]`; kvgate's extra body parameters
(kv_policy, kv_budget) reach the cache and come back in `usage.kv`; errors in OpenAI's shape
with the right status (400 naming the field, 404 for another model or path, 401 without a key);
a client that leaves a stream frees the request on the server; /health and /ready; /metrics
scraped by a real Prometheus (Debian's `prometheus`, started here on loopback with a generated
config): its query API returns kvgate's series with the expected labels and values.
"""

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VENV_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
DEFAULT = os.path.join(REPO, "models", "kvgate-default")
KVGATE = os.path.join(REPO, "build", "cli", "kvgate")
MODEL = "kvgate-default"

try:
    import openai
except ImportError:  # the system interpreter: run again in the test venv, which has openai
    if os.path.exists(VENV_PYTHON) and os.path.realpath(sys.executable) != os.path.realpath(
            VENV_PYTHON) and not os.environ.get("KVGATE_HTTP_TEST_REEXEC"):
        os.environ["KVGATE_HTTP_TEST_REEXEC"] = "1"
        os.execv(VENV_PYTHON, [VENV_PYTHON] + sys.argv)
    sys.exit("http_test: the `openai` package is missing: python3 -m venv .venv && "
             ".venv/bin/pip install -r tests/integration/requirements.txt (scripts/test.sh does)")


class Server:
    """kvgate serve with the HTTP API on a free port; stderr drained into self.log."""

    def __init__(self, *extra):
        self.proc = subprocess.Popen([KVGATE, "serve", "--model", DEFAULT, "--port", "0",
                                      "--http-port", "0", "--threads", "1", *extra],
                                     stderr=subprocess.PIPE, text=True)
        self.log = []
        m = None
        while m is None:
            line = self.proc.stderr.readline()
            if not line:
                self.proc.kill()
                raise RuntimeError("kvgate serve did not start:\n" + "".join(self.log))
            self.log.append(line)
            m = re.search(r"serving .* on 127\.0\.0\.1:(\d+).*HTTP 127\.0\.0\.1:(\d+)", line)
        self.grpc = f"127.0.0.1:{m.group(1)}"
        self.base = f"http://127.0.0.1:{m.group(2)}"
        self.drain = threading.Thread(
            target=lambda: [self.log.append(l) for l in self.proc.stderr], daemon=True)
        self.drain.start()

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=15)
        self.drain.join(timeout=5)
        return code


def kvgate(args, **kw):
    p = subprocess.run([KVGATE] + args, capture_output=True, text=True, timeout=300, **kw)
    if p.returncode != 0:
        raise AssertionError(f"kvgate {' '.join(args)[:200]} failed: {p.stderr.strip()}")
    return p.stdout


def http(method, url, body=None, headers=None):
    """(status, parsed JSON or text) with urllib (no client library in between)."""
    data = body.encode() if isinstance(body, str) else body
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


PROMPT = "VAR QWERT = 12345. The grass is green. VAR ASDFG = VAR QWERT. Which variables"


class ServerTestCase(unittest.TestCase):
    """One `kvgate serve` (with SERVER_ARGS) and an openai client for the class's tests."""
    SERVER_ARGS = ()

    @classmethod
    def setUpClass(cls):
        cls.server = Server(*cls.SERVER_ARGS)
        cls.client = openai.OpenAI(base_url=cls.server.base + "/v1", api_key="unused",
                                   max_retries=0, timeout=120)

    @classmethod
    def tearDownClass(cls):
        code = cls.server.stop()
        assert code == 0, "".join(cls.server.log)


class HttpTest(ServerTestCase):
    def running(self):
        info = json.loads(kvgate(["info", "--server", self.server.grpc]))
        return info["server"]["requests_running"] + info["server"]["requests_queued"]

    def test_models_health_ready(self):
        models = self.client.models.list()
        self.assertEqual([m.id for m in models.data], [MODEL])
        self.assertEqual(http("GET", self.server.base + "/health")[0], 200)
        self.assertEqual(http("GET", self.server.base + "/ready")[0], 200)

    def test_completion_equals_the_local_engine(self):
        local = json.loads(kvgate(["generate", "--json", "--model", DEFAULT, "--threads", "1",
                                   "--prompt", PROMPT, "--max-tokens", "12",
                                   "--temperature", "0"]))
        r = self.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                           temperature=0)
        self.assertEqual(r.object, "text_completion")
        self.assertEqual(r.choices[0].text, local["text"])
        self.assertEqual(r.choices[0].finish_reason, local["finish_reason"])
        self.assertEqual(r.usage.completion_tokens, local["usage"]["completion_tokens"])
        self.assertEqual(r.usage.prompt_tokens, local["usage"]["prompt_tokens"])
        self.assertEqual(r.usage.total_tokens, r.usage.prompt_tokens + r.usage.completion_tokens)
        # max_completion_tokens is the newer name of the same limit.
        r2 = self.client.completions.create(model=MODEL, prompt=PROMPT, temperature=0,
                                            extra_body={"max_completion_tokens": 3})
        self.assertEqual(r2.usage.completion_tokens, 3)
        self.assertEqual(r2.choices[0].finish_reason, "length")

    def test_stream_adds_up_and_reports_usage(self):
        whole = self.client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12,
                                               temperature=0)
        chunks = list(self.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        self.assertEqual(text, whole.choices[0].text)
        reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
        self.assertEqual(reasons[-1], whole.choices[0].finish_reason)
        self.assertTrue(all(r is None for r in reasons[:-1]))
        self.assertGreater(len(chunks), 2)  # streamed, not one piece
        self.assertEqual(chunks[-1].choices, [])
        self.assertEqual(chunks[-1].usage.completion_tokens, whole.usage.completion_tokens)
        self.assertEqual(len({c.id for c in chunks}), 1)

    def test_kv_parameters_reach_the_cache(self):
        long_prompt = " ".join(["The grass is green. The sky is blue."] * 60) + " " + PROMPT
        r = self.client.completions.create(
            model=MODEL, prompt=long_prompt, max_tokens=4, temperature=0,
            extra_body={"kv_policy": "streaming", "kv_budget": 64, "kv_chunk": 64})
        kv = r.usage.model_extra["kv"]
        self.assertEqual(kv["policy"], "streaming")
        self.assertEqual(kv["budget"], 64)
        self.assertGreater(kv["eviction_ratio"], 0.5)
        self.assertLessEqual(kv["max_retained_per_head"], 64)
        local = json.loads(kvgate(["generate", "--json", "--model", DEFAULT, "--threads", "1",
                                   "--prompt", long_prompt, "--max-tokens", "4",
                                   "--temperature", "0", "--kv-policy", "streaming",
                                   "--kv-budget", "64", "--kv-chunk", "64"]))
        self.assertEqual(r.choices[0].text, local["text"])

    def test_errors_have_openai_shape_and_status(self):
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.completions.create(model=MODEL, prompt=PROMPT, n=2)
        self.assertEqual(e.exception.status_code, 400)
        self.assertEqual(e.exception.body["param"], "n")
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.completions.create(model=MODEL, prompt=PROMPT, temperature=-1)
        self.assertIn("temperature", e.exception.message)
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.completions.create(model=MODEL, prompt=PROMPT,
                                           extra_body={"kv_policy": "nonsense"})
        self.assertIn("policy", e.exception.message)
        with self.assertRaises(openai.NotFoundError):
            self.client.completions.create(model="gpt-4", prompt=PROMPT)
        status, body = http("POST", self.server.base + "/v1/completions", "{not json",
                            {"Content-Type": "application/json"})
        self.assertEqual(status, 400)
        self.assertEqual(body["error"]["type"], "invalid_request_error")
        status, body = http("POST", self.server.base + "/v1/completions",
                            json.dumps({"model": MODEL, "prompt": "x", "max_tokenz": 3}))
        self.assertEqual(status, 400)
        self.assertIn("max_tokenz", body["error"]["message"])
        self.assertEqual(http("GET", self.server.base + "/v1/nothing")[0], 404)

    @unittest.skipUnless(shutil.which("curl"), "curl is not installed (scripts/setup.sh installs it)")
    def test_raw_sse_with_curl(self):
        body = json.dumps({"model": MODEL, "prompt": PROMPT, "max_tokens": 5,
                           "temperature": 0, "stream": True})
        out = subprocess.run(["curl", "-sN", "-H", "Content-Type: application/json", "-d", body,
                              self.server.base + "/v1/completions"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
        events = [e for e in out.split("\n\n") if e.strip()]
        self.assertTrue(all(e.startswith("data: ") for e in events), out)
        self.assertEqual(events[-1], "data: [DONE]")
        parsed = [json.loads(e[len("data: "):]) for e in events[:-1]]
        self.assertEqual(parsed[-1]["choices"][0]["finish_reason"], "length")

    def test_granted_budgets_show_while_a_request_runs(self):
        stream = self.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2000, temperature=1.0, stream=True,
            extra_body={"ignore_eos": True, "kv_policy": "streaming", "kv_budget": 48,
                        "kv_chunk": 16})
        next(iter(stream))
        _, text = http("GET", self.server.base + "/metrics")
        stream.close()
        self.assertIn('kvgate:stage_granted_budget_tokens{model_name="kvgate-default",'
                      'stage="0"} 48', text)
        self.assertIn('kvgate:stage_budgeted_sequences{model_name="kvgate-default",'
                      'stage="0"} 1', text)

    def test_a_client_that_leaves_frees_its_request(self):
        stream = self.client.completions.create(
            model=MODEL, prompt=PROMPT, max_tokens=2000, temperature=1.0, stream=True,
            extra_body={"ignore_eos": True})
        first = next(iter(stream))
        self.assertTrue(first.choices)
        self.assertEqual(self.running(), 1)
        stream.close()
        # 2,000 tokens take several seconds here; the request must end well before that.
        deadline = time.time() + 1.5
        while self.running() != 0 and time.time() < deadline:
            time.sleep(0.1)
        self.assertEqual(self.running(), 0, "the server still runs a request nobody reads")


CHAT = [{"role": "system", "content": "You answer briefly."},
        {"role": "user", "content": "Who said, Let there be light?"},
        {"role": "assistant", "content": "God said it."},
        {"role": "user", "content": "And what was there then?"}]


class ChatTest(ServerTestCase):
    """/v1/chat/completions: the conversation rendered by the model's chat template exactly as
    transformers' apply_chat_template renders and tokenizes it."""

    def test_chat_equals_a_completion_of_the_transformers_rendering(self):
        from transformers import AutoTokenizer  # the reference nobody here wrote
        tok = AutoTokenizer.from_pretrained(DEFAULT)
        ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True,
                                      return_dict=False)
        ids = list(ids["input_ids"]) if isinstance(ids, dict) else list(ids)
        chat = self.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=12,
                                                   temperature=0)
        self.assertEqual(chat.object, "chat.completion")
        self.assertTrue(chat.id.startswith("chatcmpl-"))
        self.assertEqual(chat.choices[0].message.role, "assistant")
        self.assertEqual(chat.usage.prompt_tokens, len(ids))
        plain = self.client.completions.create(model=MODEL, prompt=ids, max_tokens=12,
                                               temperature=0)
        self.assertEqual(chat.choices[0].message.content, plain.choices[0].text)
        self.assertEqual(chat.choices[0].finish_reason, plain.choices[0].finish_reason)

    def test_chat_stream_starts_with_the_role_and_adds_up(self):
        whole = self.client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=10,
                                                    temperature=0)
        chunks = list(self.client.chat.completions.create(
            model=MODEL, messages=CHAT, max_tokens=10, temperature=0, stream=True,
            stream_options={"include_usage": True}))
        self.assertEqual(chunks[0].object, "chat.completion.chunk")
        self.assertEqual(chunks[0].choices[0].delta.role, "assistant")
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        self.assertEqual(text, whole.choices[0].message.content)
        self.assertEqual([c.choices[0].finish_reason for c in chunks if c.choices][-1],
                         whole.choices[0].finish_reason)
        self.assertEqual(chunks[-1].usage.completion_tokens, whole.usage.completion_tokens)

    def test_chat_errors(self):
        # The template's own refusal (raise_exception) is the client's 400.
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(
                model=MODEL, messages=[{"role": "tool", "content": "x"}])
        self.assertIn("roles are system, user and assistant", e.exception.message)
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "x"}],
                tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
        self.assertEqual(e.exception.body["param"], "tools")
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(model=MODEL, messages=[])
        self.assertEqual(e.exception.body["param"], "messages")
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(model=MODEL, messages=CHAT, n=3)
        self.assertEqual(e.exception.body["param"], "n")
        # Text parts are joined; an image part is refused by name.
        r = self.client.chat.completions.create(
            model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
                {"type": "text", "text": "And God"}, {"type": "text", "text": "said"}]}])
        self.assertEqual(r.usage.completion_tokens, 2)
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
        self.assertIn("messages[0].content[0]", e.exception.message)


class LogprobsTest(ServerTestCase):
    """logprobs / top_logprobs against transformers' own forward pass of the default model."""

    SERVER_ARGS = ("--stages", "2")  # the last stage computes them

    def test_logprobs_match_transformers(self):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        tok = AutoTokenizer.from_pretrained(DEFAULT)
        import transformers
        transformers.logging.disable_progress_bar()
        model = AutoModelForCausalLM.from_pretrained(DEFAULT).float().eval()
        ids = tok(PROMPT)["input_ids"]
        r = self.client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0,
                                           logprobs=5)
        lp = r.choices[0].logprobs
        self.assertEqual(len(lp.tokens), 6)
        self.assertEqual("".join(lp.tokens), r.choices[0].text)
        self.assertEqual(lp.text_offset[0], 0)
        generated = tok(r.choices[0].text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids + generated])).logits[0].double()
        ref = torch.log_softmax(logits, dim=-1)
        for i, token_logprob in enumerate(lp.token_logprobs):
            pos = len(ids) - 1 + i
            want = ref[pos, generated[i]].item()
            self.assertAlmostEqual(token_logprob, want, delta=2e-3, msg=f"token {i}")
            top = torch.topk(ref[pos], 5)
            want_top = {tok.decode([int(t)]): v.item() for v, t in zip(top.values, top.indices)}
            self.assertEqual(len(lp.top_logprobs[i]), 5)
            for text, value in lp.top_logprobs[i].items():
                self.assertIn(text, want_top)
                self.assertAlmostEqual(value, want_top[text], delta=2e-3)
        # Greedy: the sampled token is the likeliest one.
        self.assertEqual(max(lp.top_logprobs[0].values()), lp.token_logprobs[0])

    def test_chat_logprobs_and_their_stream(self):
        msgs = [{"role": "user", "content": "And God said"}]
        whole = self.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=5,
                                                    temperature=0, logprobs=True, top_logprobs=3)
        content = whole.choices[0].logprobs.content
        self.assertEqual("".join(t.token for t in content), whole.choices[0].message.content)
        for t in content:
            self.assertEqual(len(t.top_logprobs), 3)
            self.assertEqual(bytes(t.bytes).decode(), t.token)
            self.assertLessEqual(t.logprob, 0.0)
        streamed = [c for c in self.client.chat.completions.create(
            model=MODEL, messages=msgs, max_tokens=5, temperature=0, logprobs=True,
            top_logprobs=3, stream=True) if c.choices and c.choices[0].logprobs]
        got = [t.logprob for c in streamed for t in c.choices[0].logprobs.content]
        self.assertEqual(got, [t.logprob for t in content])
        with self.assertRaises(openai.BadRequestError) as e:
            self.client.chat.completions.create(model=MODEL, messages=msgs, top_logprobs=2)
        self.assertEqual(e.exception.body["param"], "top_logprobs")
        # Without logprobs, none come back.
        plain = self.client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=2)
        self.assertIsNone(plain.choices[0].logprobs)


class LogTest(unittest.TestCase):
    """--log-format json: every line of the coordinator and its workers is a JSON object; one
    "request done" line per request; API keys and prompts never appear unless --log-prompts."""

    def run_server(self, *extra):
        with tempfile.TemporaryDirectory() as d:
            keys = os.path.join(d, "api.keys")
            with open(keys, "w") as f:
                f.write("sk-log-test-key-0123456789\n")
            os.chmod(keys, 0o600)
            server = Server("--stages", "2", "--log-format", "json", "--api-keys", keys, *extra)
            try:
                client = openai.OpenAI(base_url=server.base + "/v1",
                                       api_key="sk-log-test-key-0123456789", max_retries=0)
                r = client.completions.create(model=MODEL, prompt="SECRET-PROMPT-WORDS said",
                                              max_tokens=3, temperature=0)
                with self.assertRaises(openai.BadRequestError):
                    client.completions.create(model=MODEL, prompt="x", temperature=-1)
            finally:
                self.assertEqual(server.stop(), 0)
        return r, "".join(server.log)

    def test_json_lines_one_per_request_and_no_secrets(self):
        r, log = self.run_server()
        lines = [json.loads(l) for l in log.splitlines() if l.strip()]  # every line is JSON
        self.assertTrue(all({"ts", "level", "component", "msg"} <= set(l) for l in lines))
        self.assertEqual({l["component"] for l in lines}, {"kvgate", "kvgate worker"})
        done = [l for l in lines if l["msg"] == "request done"]
        self.assertEqual(len(done), 1, log)
        self.assertEqual("cmpl-" + done[0]["request_id"], r.id)
        self.assertEqual(done[0]["completion_tokens"], r.usage.completion_tokens)
        self.assertEqual(done[0]["prompt_tokens"], r.usage.prompt_tokens)
        self.assertEqual(done[0]["finish_reason"], "length")
        self.assertGreater(done[0]["e2e_s"], 0)
        self.assertNotIn("sk-log-test-key", log)
        self.assertNotIn("SECRET-PROMPT", log)

    def test_prompts_only_with_log_prompts(self):
        _, log = self.run_server("--log-prompts")
        done = [json.loads(l) for l in log.splitlines() if '"request done"' in l]
        self.assertIn("SECRET-PROMPT-WORDS", done[0]["prompt"])
        self.assertNotIn("sk-log-test-key", log)


class QuantizeTest(unittest.TestCase):
    def assert_pipeline_equals_local(self, *flags):
        """Two stages served with `flags` give the same greedy text as one local process."""
        server = Server("--stages", "2", *flags)
        try:
            client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused",
                                   max_retries=0, timeout=120)
            r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16,
                                          temperature=0)
        finally:
            self.assertEqual(server.stop(), 0)
        local = json.loads(kvgate(["generate", "--json", "--model", DEFAULT, "--threads", "1",
                                   "--prompt", PROMPT, "--max-tokens", "16",
                                   "--temperature", "0", *flags]))
        self.assertEqual(r.choices[0].text, local["text"])

    def test_a_quantized_pipeline_equals_local_quantized_generation(self):
        self.assert_pipeline_equals_local("--quantize", "q8_0")

    def test_quantize_all_pipeline_equals_local_and_needs_a_format(self):
        # The embedding on the first worker, the tied LM head on the second, each converted
        # there.
        self.assert_pipeline_equals_local("--quantize", "q4_0", "--quantize-all")
        p = subprocess.run([KVGATE, "serve", "--model", DEFAULT, "--port", "0",
                            "--quantize-all"], capture_output=True, text=True, timeout=60)
        self.assertNotEqual(p.returncode, 0)
        self.assertIn("--quantize-all needs --quantize", p.stderr)


class ChatTemplateFlagTest(unittest.TestCase):
    def test_unsupported_template_is_refused_at_startup_and_an_override_serves(self):
        with tempfile.TemporaryDirectory() as d:
            bad = os.path.join(d, "bad.jinja")
            with open(bad, "w") as f:
                f.write("{% macro turn(m) %}{{ m.content }}{% endmacro %}"
                        "{% for m in messages %}{{ turn(m) }}{% endfor %}")
            p = subprocess.run([KVGATE, "serve", "--model", DEFAULT, "--port", "0",
                                "--chat-template", bad], capture_output=True, text=True,
                               timeout=60)
            self.assertNotEqual(p.returncode, 0)
            self.assertIn("macro", p.stderr)
            self.assertIn("line 1", p.stderr)
            good = os.path.join(d, "good.jinja")
            with open(good, "w") as f:
                f.write("{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}"
                        "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")
            server = Server("--chat-template", good)
            try:
                client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused",
                                       max_retries=0, timeout=120)
                r = client.chat.completions.create(
                    model=MODEL, max_tokens=1, messages=[{"role": "user", "content": "hi"}])
                from transformers import AutoTokenizer
                tok = AutoTokenizer.from_pretrained(DEFAULT)
                text = tok.bos_token + "<user>hi<assistant>"
                self.assertEqual(r.usage.prompt_tokens,
                                 len(tok(text, add_special_tokens=False)["input_ids"]))
            finally:
                self.assertEqual(server.stop(), 0)


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrometheusTest(unittest.TestCase):
    """A real Prometheus scrapes /metrics every 0.5 s; its HTTP query API is read back."""

    @unittest.skipUnless(shutil.which("prometheus"),
                         "prometheus is not installed (scripts/setup.sh installs it)")
    def test_prometheus_scrapes_the_metrics(self):
        server = Server()
        tmp = tempfile.mkdtemp(prefix="kvgate-prom-")
        prom = None
        try:
            # Requests first, so that every series has something to show.
            client = openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0)
            for i in range(3):
                client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5 + i,
                                          temperature=0)
            client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=40, temperature=0,
                                      extra_body={"kv_policy": "streaming", "kv_budget": 16,
                                                  "kv_chunk": 16, "ignore_eos": True})
            status, text = http("GET", server.base + "/metrics")
            self.assertEqual(status, 200)
            self.assertIn('kvgate:request_success_total{model_name="kvgate-default",'
                          'finished_reason="length"} 4', text)
            host, port = server.base.rsplit(":", 1)
            cfg = os.path.join(tmp, "prometheus.yml")
            with open(cfg, "w") as f:
                f.write("global:\n  scrape_interval: 500ms\n  evaluation_interval: 500ms\n"
                        "scrape_configs:\n  - job_name: kvgate\n    static_configs:\n"
                        f"      - targets: ['127.0.0.1:{port}']\n")
            web = free_port()
            prom = subprocess.Popen(
                ["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={tmp}/data",
                 f"--web.listen-address=127.0.0.1:{web}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

            def query(q):
                url = f"http://127.0.0.1:{web}/api/v1/query?" + urllib.parse.urlencode(
                    {"query": q})
                try:
                    st, body = http("GET", url)
                except urllib.error.URLError:  # not listening yet
                    return []
                if st != 200 or not isinstance(body, dict) or body.get("status") != "success":
                    return []
                return body["data"]["result"]

            deadline = time.time() + 60
            result = []
            while time.time() < deadline:
                result = query('kvgate:request_success_total{finished_reason="length"}')
                if result:
                    break
                time.sleep(0.5)
            self.assertTrue(result, "Prometheus never scraped kvgate's /metrics")
            metric = result[0]["metric"]
            self.assertEqual(metric["job"], "kvgate")
            self.assertEqual(metric["model_name"], MODEL)
            self.assertEqual(float(result[0]["value"][1]), 4)
            tokens = query("kvgate:generation_tokens_total")
            self.assertEqual(float(tokens[0]["value"][1]), 5 + 6 + 7 + 40)
            ttft = query("kvgate:time_to_first_token_seconds_count")
            self.assertEqual(float(ttft[0]["value"][1]), 4)
            itl = query("kvgate:inter_token_latency_seconds_count")
            self.assertEqual(float(itl[0]["value"][1]), 4 + 5 + 6 + 39)
            p50 = query("histogram_quantile(0.5, kvgate:e2e_request_latency_seconds_bucket)")
            self.assertGreater(float(p50[0]["value"][1]), 0)
            up = query("kvgate:worker_up")
            self.assertEqual([(r["metric"]["stage"], r["value"][1]) for r in up], [("0", "1")])
            evicted = query("kvgate:worker_evicted_tokens_total")
            self.assertGreater(float(evicted[0]["value"][1]), 0)  # the streaming request's
            cap = query("kvgate:worker_kv_capacity_bytes")
            self.assertGreater(float(cap[0]["value"][1]), 0)
            usage = query("kvgate:kv_cache_usage_perc")
            self.assertEqual(float(usage[0]["value"][1]), 0)  # nothing running now
            # Per layer (through the heartbeats): every layer of the model, and what the layers
            # evicted adds up to the worker's total.
            layers = query("kvgate:layer_evicted_tokens_total")
            self.assertEqual(sorted(int(r["metric"]["layer"]) for r in layers), [0, 1, 2, 3])
            self.assertTrue(all(float(r["value"][1]) > 0 for r in layers))
            self.assertEqual(sum(float(r["value"][1]) for r in layers),
                             float(evicted[0]["value"][1]))
            retained = query("kvgate:layer_retained_tokens")
            self.assertEqual([float(r["value"][1]) for r in retained], [0.0] * 4)
            for name in ("kvgate:admission_waits_total", "kvgate:relief_events_total",
                         "kvgate:stage_granted_budget_tokens"):
                series = query(name)
                self.assertTrue(series, name)
                self.assertEqual(float(series[0]["value"][1]), 0, name)
        finally:
            if prom is not None:
                prom.terminate()
                prom.wait(timeout=10)
            shutil.rmtree(tmp, ignore_errors=True)
            self.assertEqual(server.stop(), 0)


class HttpKeysTest(unittest.TestCase):
    def test_keys_are_required_when_configured(self):
        with tempfile.TemporaryDirectory() as d:
            keys = os.path.join(d, "keys")
            with open(keys, "w") as f:
                f.write("sk-kvgate-test-key-0123456789\n")
            os.chmod(keys, 0o600)
            server = Server("--api-keys", keys)
            try:
                bad = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong-key-0123456789",
                                    max_retries=0)
                with self.assertRaises(openai.AuthenticationError):
                    bad.models.list()
                with self.assertRaises(openai.AuthenticationError):
                    bad.completions.create(model=MODEL, prompt="x", max_tokens=1)
                good = openai.OpenAI(base_url=server.base + "/v1",
                                     api_key="sk-kvgate-test-key-0123456789", max_retries=0)
                self.assertEqual(good.models.list().data[0].id, MODEL)
                self.assertEqual(http("GET", server.base + "/health")[0], 200)
                # The key never reaches the log.
                self.assertNotIn("sk-kvgate-test-key", "".join(server.log))
            finally:
                self.assertEqual(server.stop(), 0)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvgate", default=KVGATE)
    args, rest = ap.parse_known_args()
    KVGATE = os.path.abspath(args.kvgate)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
