"""deploy/k8s/triton.yaml serves the repository a server bundle writes: its init container's
command, run here on a real bundle, leaves what Triton's --model-repository names."""

import shlex
import subprocess
from pathlib import Path

import onnx
import pytest
from served_models import outputs_model

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed")
pytest.importorskip("tritonclient.grpc", reason="the 'serve' extra (tritonclient) is not installed")

from google.protobuf import text_format  # noqa: E402
from tritonclient.grpc import model_config_pb2  # noqa: E402

from dsc_export.artifacts import read_manifest  # noqa: E402
from dsc_export.bundle import make_bundle  # noqa: E402
from dsc_export.ort import make_session  # noqa: E402
from dsc_export.splitting import split_model  # noqa: E402

ROOT = Path(__file__).parents[1]
MANIFEST = ROOT / "deploy" / "k8s" / "triton.yaml"


def _docs():
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    assert set(docs) == {"Deployment", "Service"}
    return docs["Deployment"], docs["Service"]


def test_service_reaches_the_triton_pods_on_the_protocol_ports():
    dep, svc = _docs()
    pod = dep["spec"]["template"]
    assert dep["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    (triton,) = pod["spec"]["containers"]
    assert triton["image"].startswith("nvcr.io/nvidia/tritonserver:") and triton["image"].endswith("-py3")
    ports = {p["name"]: p["containerPort"] for p in triton["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002}  # Triton's defaults
    assert {p["targetPort"] for p in svc["spec"]["ports"]} <= set(ports)
    assert triton["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": "http"}
    assert "--strict-readiness=true" in triton["args"]


def test_init_container_unpacks_the_repository_triton_is_told_to_serve(tmp_path):
    """Run the init container's command on a real server bundle, with each volume's mount path
    mapped to a local directory: Triton's --model-repository then holds one model per tail."""
    dep, _ = _docs()
    pod = dep["spec"]["template"]["spec"]
    (init,) = pod["initContainers"]
    (triton,) = pod["containers"]
    local = {v["name"]: tmp_path / v["name"] for v in pod["volumes"]}
    for d in local.values():
        d.mkdir()
    mounts = {m["mountPath"]: local[m["name"]] for m in init["volumeMounts"]}
    (repo_arg,) = [a.split("=", 1)[1] for a in triton["args"] if a.startswith("--model-repository=")]
    (repo_mount,) = [m for m in triton["volumeMounts"] if repo_arg.startswith(m["mountPath"] + "/")]
    assert any(m["name"] == repo_mount["name"] for m in init["volumeMounts"])  # the init container writes it
    command = init["command"][-1]
    (bundle_path,) = [w for w in shlex.split(command) if w.endswith(".tar")]
    onnx.save(outputs_model(), tmp_path / "m.onnx")
    split_model(tmp_path / "m.onnx", tmp_path / "split", verify=False)
    bundle_mount = next(p for p in mounts if bundle_path.startswith(p + "/"))
    make_bundle(tmp_path / "split", "server", mounts[bundle_mount] / bundle_path[len(bundle_mount) + 1:])
    for path in sorted(mounts, key=len, reverse=True):
        command = command.replace(path, str(mounts[path]))
    subprocess.run(init["command"][:-1] + [command], check=True)
    repo = local[repo_mount["name"]] / repo_arg[len(repo_mount["mountPath"]) + 1:]
    man = read_manifest(tmp_path / "split")
    tails = sorted(s.id for s in man.splits if s.tail)
    assert len(tails) >= 2 and sorted(p.parent.name for p in repo.glob("*/config.pbtxt")) == tails
    for split in tails:
        cfg = text_format.Parse((repo / split / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
        assert cfg.platform == "onnxruntime_onnx" and (repo / split / "1" / "model.onnx").is_file()
        make_session(repo / split / "1" / "model.onnx")  # its weights (hard links) were unpacked too
        assert cfg.parameters["dsc_model_sha256"].string_value == man.model.sha256
