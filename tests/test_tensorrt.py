"""TensorRT: everything that runs without the library (engine-cache keys, rebuilds, parser messages, the FP16
graph, the unavailable path); the engine itself only where TensorRT and a CUDA GPU are present."""
import importlib.util
import json

import numpy as np
import onnx
import pytest
import torch
from click.testing import CliRunner

from cli import main
from engine.backends import BackendUnavailable
from engine.backends import tensorrt_engines as trt_export
from engine.pipeline import load_pipeline
from export.onnx_export import export_all
from export.parity import TOLERANCES, compare

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
needs_tensorrt = pytest.mark.skipif(not (HAS_TENSORRT and torch.cuda.is_available()),
                                    reason="needs the tensorrt package and a CUDA GPU")


@pytest.fixture(scope="module")
def exported(tiny_bundle):
    return tiny_bundle          # read only: the session's tiny bundle (tests/conftest.py)


def key(onnx_path, **changes):
    fields = dict(tensorrt_version="10.13.0", gpu="NVIDIA H100", compute_capability="9.0", precision="fp32",
                  profile=(1, 64, 512))
    fields.update(changes)
    return trt_export.engine_key(onnx_path, **fields)


def test_cache_key_covers_graph_version_gpu_precision_and_profile(exported, tmp_path):
    graph = exported / "classifier.onnx"
    base = key(graph)
    assert base.digest() == key(graph).digest() and len(base.digest()) == 24
    variants = [key(graph, tensorrt_version="11.0.0"), key(graph, gpu="NVIDIA H200"),
                key(graph, compute_capability="8.0"), key(graph, precision="fp16"), key(graph, profile=(1, 32, 512)),
                key(exported / "rotation_loss.onnx")]
    assert len({v.digest() for v in variants} | {base.digest()}) == len(variants) + 1
    with pytest.raises(ValueError, match="fp32 or fp16"):
        key(graph, precision="int8")
    with pytest.raises(ValueError, match="min <= opt <= max"):
        key(graph, profile=(8, 4, 512))


class Builds:
    def __init__(self):
        self.count, self.messages = 0, []

    def build(self):
        self.count += 1
        return b"engine-bytes-%d" % self.count

    def log(self, message):
        self.messages.append(message)


def test_engine_cache_builds_once_then_reuses(exported, tmp_path):
    cache, builds = trt_export.EngineCache(tmp_path), Builds()
    k = key(exported / "classifier.onnx")
    assert cache.get_or_build(k, builds.build, lambda b: b, builds.log) == b"engine-bytes-1"
    assert cache.get_or_build(k, builds.build, lambda b: b, builds.log) == b"engine-bytes-1"
    assert builds.count == 1 and builds.messages == []


@pytest.mark.parametrize("damage, message", [
    ("engine", "does not match its record (corrupt)"),
    ("record", "names another graph"),
    ("json", "not valid JSON"),
    ("deserialize", "does not deserialize"),
])
def test_a_bad_cache_entry_is_rebuilt_with_a_message(exported, tmp_path, damage, message):
    cache, builds = trt_export.EngineCache(tmp_path), Builds()
    k = key(exported / "classifier.onnx")
    cache.get_or_build(k, builds.build, lambda b: b, builds.log)
    engine_path, record_path = cache.paths(k)
    check = lambda b: b  # noqa: E731
    if damage == "engine":
        engine_path.write_bytes(b"flipped")
    elif damage == "record":
        record = json.loads(record_path.read_text())
        record["key"]["gpu"] = "another GPU"
        record_path.write_text(json.dumps(record))
    elif damage == "json":
        record_path.write_text("{not json")
    else:
        def check(data):
            if data == b"engine-bytes-1":
                raise RuntimeError("bad engine")
            return data
    assert cache.get_or_build(k, builds.build, check, builds.log) == b"engine-bytes-2"
    assert builds.count == 2 and message in builds.messages[0]


def test_parser_errors_name_the_node():
    class Error:
        def __init__(self, i):
            self.i = i

        def node(self):
            return self.i

        def node_name(self):
            return f"/group{self.i}/Conv"

        def node_operator(self):
            return "Conv"

        def desc(self):
            return "unsupported"

    class Parser:
        num_errors = 2

        def get_error(self, i):
            return Error(i)

    text = trt_export.parser_errors(Parser())
    assert "node 1 /group1/Conv (Conv): unsupported" in text and text.count("\n") == 1


def test_fp16_graph_keeps_fp32_io_and_agrees_with_fp32(tiny_pipeline, exported, tmp_path, images):
    import onnxruntime as ort

    fp16 = trt_export.fp16_graph(exported / "classifier.onnx", tmp_path / "classifier.fp16.onnx")
    model = onnx.load(str(fp16))
    float32 = onnx.TensorProto.FLOAT
    assert all(v.type.tensor_type.elem_type == float32 for v in [*model.graph.input, *model.graph.output])
    assert any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)
    x = images.numpy()
    outs = {}
    for name, path in (("fp32", exported / "classifier.onnx"), ("fp16", fp16)):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs[name] = torch.from_numpy(session.run(None, {"x": x})[0])
        assert outs[name].dtype == torch.float32
    result = compare("logits", outs["fp32"], outs["fp16"], TOLERANCES["fp16"]["logits"])
    assert result.passed, result.report()
    assert np.isfinite(outs["fp16"].numpy()).all()


def test_fp16_export_records_its_precision(tiny_weights, tmp_path):
    one_task = load_pipeline(tiny_weights, tasks=["rotation"], objective="plain")       # every kind of graph, quickly
    manifest, _ = export_all(one_task, tmp_path, precision="fp16")
    assert set(manifest["graphs"]) == {"classifier", "rotation_loss", "multitask_loss"}
    assert {g["precision"] for g in manifest["graphs"].values()} == {"fp16"}
    assert all(g["inputs"][0]["dtype"] == "float32" for g in manifest["graphs"].values())


@pytest.mark.skipif(HAS_TENSORRT and torch.cuda.is_available(), reason="TensorRT can run here")
def test_unavailable_tensorrt_says_why(tiny_weights, tmp_path):
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed|needs a CUDA GPU"):
        trt_export.import_tensorrt()
    from tests.conftest import EXAMPLES

    for args in (["repair", "--input", str(EXAMPLES), "--output", str(tmp_path / "out")],
                 ["eval", "--n", "4"]):
        result = CliRunner().invoke(main, [*args, "--weights", str(tiny_weights), "--backend", "tensorrt"])
        assert result.exit_code == 2 and ("TensorRT is not installed" in result.output
                                          or "needs a CUDA GPU" in result.output)
    assert not (tmp_path / "out").exists()


@needs_tensorrt
def test_tensorrt_engines_match_torch(tiny_pipeline, exported, tmp_path, images):
    from engine.backends.tensorrt_backend import TensorRTBackend
    from tests.conftest import make_tiny_weights

    pipeline = load_pipeline(make_tiny_weights(tmp_path / "w"), device="cuda", objective="plain")
    export_all(pipeline, tmp_path / "onnx", repair_graphs=False)
    backend = TensorRTBackend(tmp_path / "onnx", pipeline.tasks, "cuda", cache_dir=tmp_path / "engines")
    x = images.cuda()
    params = pipeline.objective.sample_params(x, 0)
    tol = TOLERANCES["fp32"]
    assert compare("logits", pipeline.classifier(x), backend.logits(x), tol["logits"]).passed
    for task, loss in pipeline.objective.per_task(x, params).items():
        assert compare(task, loss, backend.task_losses(x, params)[task], tol["loss"]).passed


def test_profiles_of_the_step_and_loop_graphs_cover_batch_steps_and_the_trip_count(tmp_path):
    from onnx import TensorProto, helper

    from export.repair_graphs import loop_graph

    image = ["batch", 3, 32, 32]
    f = lambda name, shape: helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)
    # a stand-in step graph with the exported one's interface: x, x0, eps, step_size, one task parameter
    step = helper.make_model(helper.make_graph(
        [helper.make_node("Identity", ["x"], ["x_next"]),
         helper.make_node("ReduceSum", ["view_p"], ["loss"], keepdims=0, axes=[1])],
        "step", [f("x", image), f("x0", image), f("eps", []), f("step_size", []), f("view_p", ["batch", 4])],
        [f("x_next", image), f("loss", ["batch"])]), opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(step, str(tmp_path / "repair_step.onnx"))
    onnx.save(loop_graph(step), str(tmp_path / "repair.onnx"))
    step_profiles = trt_export.input_profiles(tmp_path / "repair_step.onnx", (1, 8, 16))
    assert step_profiles["x"] == ((1, 3, 32, 32), (8, 3, 32, 32), (16, 3, 32, 32))
    assert step_profiles["view_p"] == ((1, 4), (8, 4), (16, 4)) and "eps" not in step_profiles
    loop = trt_export.input_profiles(tmp_path / "repair.onnx", (1, 8, 16), steps=(1, 20, 40))
    assert loop["steps"] == ((1,), (20,), (40,))                       # the trip count, a shape input
    assert loop["view_p_all"] == ((1, 1, 4), (20, 8, 4), (40, 16, 4))   # steps × batch × …
    assert loop["noise"] == loop["x0"] == step_profiles["x"]
