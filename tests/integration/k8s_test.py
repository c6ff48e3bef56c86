#!/usr/bin/env python3
"""deploy/k8s against Kubernetes' own schemas and the real binary. Run by ctest (label
`integration`):

    python3 tests/integration/k8s_test.py --kvgate build/cli/kvgate

Checks: `kubectl kustomize` renders the cpu and gpu overlays; every rendered object passes
`kubernetes-validate --strict` (PyPI) for three Kubernetes minor versions (and an object with a
misspelt field does not); the objects the issue asks for are there (coordinator Deployment and
Service, worker StatefulSet with stable names, gRPC probes, Secrets, ConfigMap,
PodDisruptionBudget, NetworkPolicy); every container's command line, with `$(VAR)` expanded as
the kubelet would (ConfigMap, downward API) and the mounted paths pointing at local stand-ins
(the model, keys and certificates made here), is accepted by `kvgate ... --dry-run` (and a
missing Secret file is refused), so the manifests cannot drift from the CLI.
"""

import argparse
import copy
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
KVGATE = os.path.join(REPO, "build", "cli", "kvgate")
OVERLAYS = {o: os.path.join(REPO, "deploy", "k8s", "overlays", o) for o in ("cpu", "gpu")}
# Three minor versions kubernetes-validate carries schemas for: the oldest with stable native
# gRPC probes (1.27) is no longer among them, so the three newest it knows.
VERSIONS = 3


def kubectl_missing():
    """Why kubectl cannot render the overlays here ("" when it can)."""
    path = shutil.which("kubectl")
    if path is None:
        return ("kubectl is not installed (Debian 12 has none recent enough; see "
                "https://kubernetes.io/docs/tasks/tools/): the overlays cannot be rendered")
    p = subprocess.run([path, "version", "--client"], capture_output=True, text=True)
    m = re.search(r"Kustomize Version: v(\d+)", p.stdout)
    if m is None or int(m.group(1)) < 4:
        return f"kubectl's Kustomize is older than v4 ({p.stdout.strip()}): needs kubectl >= 1.21"
    return ""


def kubectl():
    return shutil.which("kubectl")


def validator():
    for path in (shutil.which("kubernetes-validate"),
                 os.path.join(REPO, ".venv", "bin", "kubernetes-validate")):
        if path and os.path.exists(path):
            return path
    raise AssertionError("kubernetes-validate is not installed: python3 -m venv .venv && "
                         ".venv/bin/pip install kubernetes-validate (scripts/test.sh does)")


def render(overlay):
    p = subprocess.run([kubectl(), "kustomize", OVERLAYS[overlay]], capture_output=True,
                       text=True)
    if p.returncode != 0:
        raise AssertionError(f"kubectl kustomize {overlay}: {p.stderr}")
    return p.stdout, [d for d in yaml.safe_load_all(p.stdout) if d]


def quantity(text):
    """A Kubernetes quantity in base units (bytes, cores)."""
    m = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text))
    units = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 1 << 10,
             "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40}
    return float(m.group(1)) * units[m.group(2)]


class K8sTest(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        why = kubectl_missing()
        if why:
            raise unittest.SkipTest(why)
        cls.rendered = {o: render(o) for o in OVERLAYS}
        cls.tmp = tempfile.mkdtemp(prefix="kvgate-k8s-")

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.tmp, ignore_errors=True)

    def versions(self):
        root = glob.glob(os.path.join(os.path.dirname(os.path.dirname(validator())), "lib",
                                      "python3*", "site-packages", "kubernetes_validate",
                                      "kubernetes-json-schema"))
        found = sorted({tuple(map(int, re.match(r"v(\d+)\.(\d+)", d).groups()))
                        for r in root for d in os.listdir(r) if re.match(r"v\d+\.\d+", d)})
        self.assertGreaterEqual(len(found), VERSIONS, "kubernetes-validate has too few schemas")
        return [f"{a}.{b}.0" for a, b in found[-VERSIONS:]]

    def validate(self, text, version):
        path = os.path.join(self.tmp, "manifest.yaml")
        with open(path, "w") as f:
            f.write(text)
        return subprocess.run([validator(), "--strict", "--quiet", "-k", version, path],
                              capture_output=True, text=True)

    def test_1_both_overlays_pass_three_kubernetes_versions(self):
        versions = self.versions()
        for overlay, (text, _) in self.rendered.items():
            for v in versions:
                with self.subTest(overlay=overlay, kubernetes=v):
                    p = self.validate(text, v)
                    self.assertEqual(p.returncode, 0, p.stdout + p.stderr)
        # The validator rejects what it should: a misspelt field in the worker StatefulSet.
        docs = copy.deepcopy(self.rendered["cpu"][1])
        sts = next(d for d in docs if d["kind"] == "StatefulSet")
        sts["spec"]["template"]["spec"]["containers"][0]["livenesProbe"] = {"grpc": {"port": 1}}
        p = self.validate(yaml.safe_dump_all(docs), versions[-1])
        self.assertNotEqual(p.returncode, 0, "a misspelt field passed validation")

    def test_2_the_objects_a_deployment_needs_are_there(self):
        for overlay, (_, docs) in self.rendered.items():
            kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
            for want in [("Deployment", "kvgate-coordinator"), ("StatefulSet", "kvgate-worker"),
                         ("Service", "kvgate"), ("Service", "kvgate-worker"),
                         ("ConfigMap", "kvgate-config"), ("PodDisruptionBudget", "kvgate-worker"),
                         ("NetworkPolicy", "kvgate-coordinator"),
                         ("NetworkPolicy", "kvgate-worker")]:
                self.assertIn(want, kinds, overlay)
            by = {(d["kind"], d["metadata"]["name"]): d for d in docs}
            sts = by[("StatefulSet", "kvgate-worker")]
            self.assertEqual(sts["spec"]["serviceName"], "kvgate-worker")
            config = by[("ConfigMap", "kvgate-config")]["data"]
            self.assertEqual(int(config["KVGATE_WORKERS"]), sts["spec"]["replicas"], overlay)
            ports = {p["name"]: p["port"] for p in by[("Service", "kvgate")]["spec"]["ports"]}
            self.assertEqual(set(ports), {"public", "admin", "cluster"})
            for kind, name in [("Deployment", "kvgate-coordinator"),
                               ("StatefulSet", "kvgate-worker")]:
                pod = by[(kind, name)]["spec"]["template"]["spec"]
                c = pod["containers"][0]
                for probe in ("readinessProbe", "livenessProbe"):
                    self.assertIn("grpc", c[probe], f"{overlay} {name} {probe}")
                secrets = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
                self.assertEqual(secrets, {"kvgate-keys", "kvgate-tls"})
                self.assertTrue(pod["securityContext"]["runAsNonRoot"])
            worker = sts["spec"]["template"]["spec"]["containers"][0]
            gpus = worker["resources"].get("limits", {}).get("nvidia.com/gpu")
            self.assertEqual(gpus, "1" if overlay == "gpu" else None, overlay)
            if overlay == "cpu":
                env = {e["name"]: e for e in worker["env"]}
                self.assertEqual(env["MEMORY_LIMIT"]["valueFrom"]["resourceFieldRef"]["resource"],
                                 "limits.memory")
                self.assertIn("--memory-limit=$(MEMORY_LIMIT)", worker["args"])

    def stand_ins(self, pod):
        """Local paths for every volume a pod mounts: the model directory, and Secrets made
        here (a CA and node certificate, API and admin keys, the cluster token)."""
        root = os.path.join(self.tmp, "mounts")
        if not os.path.exists(root):
            os.makedirs(root)
            tls = os.path.join(root, "tls")
            subprocess.run(["bash", os.path.join(REPO, "scripts", "make_certs.sh"), tls, "kvgate",
                            "*.kvgate-worker.default.svc"], check=True, capture_output=True)
            keys = os.path.join(root, "keys")
            os.makedirs(keys, mode=0o700)
            for name in ("api-keys", "admin-keys", "cluster-token"):
                with open(os.path.join(keys, name), "w") as f:
                    f.write(os.urandom(16).hex() + "\n")
                os.chmod(os.path.join(keys, name), 0o400)
            models = os.path.join(root, "models")
            os.makedirs(models)
            os.symlink(os.path.join(REPO, "models", "kvgate-default"),
                       os.path.join(models, "kvgate-default"))
        # What the deploy/README.md commands put in each Secret, made above.
        secret_files = {"kvgate-tls": ("tls", ["ca.pem", "node.pem", "node.key"]),
                        "kvgate-keys": ("keys", ["api-keys", "admin-keys", "cluster-token"])}
        mapping = {}
        for v in pod["volumes"]:
            if "persistentVolumeClaim" in v:
                mapping[v["name"]] = os.path.join(root, "models")
            elif "secret" in v:
                sub, files = secret_files[v["secret"]["secretName"]]
                d = os.path.join(root, f"{v['name']}-{len(mapping)}")
                os.makedirs(d, exist_ok=True)
                items = v["secret"].get("items") or [{"key": k, "path": k} for k in files]
                for it in items:
                    src = os.path.join(root, sub, it["key"])
                    dst = os.path.join(d, it["path"])
                    if not os.path.exists(dst):
                        shutil.copyfile(src, dst)
                        os.chmod(dst, 0o400)
                mapping[v["name"]] = d
        return mapping

    def command_lines(self, docs):
        """(name, argv) of every container, expanded as the kubelet would for pod 0."""
        config = {}
        for d in docs:
            if d["kind"] == "ConfigMap":
                config[d["metadata"]["name"]] = d["data"]
        for d in docs:
            if d["kind"] not in ("Deployment", "StatefulSet"):
                continue
            pod = d["spec"]["template"]["spec"]
            mapping = self.stand_ins(pod)
            for c in pod["containers"]:
                env = {}
                for src in c.get("envFrom", []):
                    env.update(config[src["configMapRef"]["name"]])
                for e in c.get("env", []):
                    if "value" in e:
                        env[e["name"]] = e["value"]
                        continue
                    ref = e["valueFrom"]
                    if "fieldRef" in ref:
                        field = ref["fieldRef"]["fieldPath"]
                        pod_fields = {"metadata.name": f"{d['metadata']['name']}-0",
                                      "metadata.namespace": "default"}
                        self.assertIn(field, pod_fields)
                        env[e["name"]] = pod_fields[field]
                    elif "resourceFieldRef" in ref:
                        r = ref["resourceFieldRef"]
                        kind, what = r["resource"].split(".")
                        value = quantity(c["resources"][kind][what]) / quantity(
                            r.get("divisor", "1"))
                        env[e["name"]] = str(int(-(-value // 1)))  # the kubelet rounds up
                argv = []
                for a in c["command"] + c.get("args", []):
                    a = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a)
                    self.assertNotIn("$(", a, f"{c['name']}: an unset variable in {a}")
                    for m in c.get("volumeMounts", []):
                        a = a.replace(m["mountPath"], mapping[m["name"]])
                    argv.append(a)
                self.assertEqual(argv[0], "kvgate")
                yield c["name"], [KVGATE] + argv[1:]

    def test_3_every_command_line_is_accepted_by_the_binary(self):
        for overlay, (_, docs) in self.rendered.items():
            lines = list(self.command_lines(docs))
            self.assertEqual(sorted(n for n, _ in lines), ["coordinator", "worker"])
            for name, argv in lines:
                with self.subTest(overlay=overlay, container=name):
                    p = subprocess.run(argv + ["--dry-run"], capture_output=True, text=True,
                                       timeout=120)
                    self.assertEqual(p.returncode, 0, f"{' '.join(argv)}\n{p.stderr}")
                    self.assertIn("dry run: flags and files check out", p.stdout)
                    # The dry run checks what it says: a missing Secret file is refused.
                    token = next(a for a in argv if a.startswith("--cluster-token-file="))
                    bad = [a if a != token else token + ".missing" for a in argv]
                    p = subprocess.run(bad + ["--dry-run"], capture_output=True, text=True,
                                       timeout=120)
                    self.assertNotEqual(p.returncode, 0, "a missing cluster token passed")
                    self.assertIn("cluster-token.missing", p.stderr)


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--kvgate", default=KVGATE)
    args, rest = ap.parse_known_args()
    KVGATE = os.path.abspath(args.kvgate)
    unittest.main(argv=[sys.argv[0]] + rest, verbosity=2)
