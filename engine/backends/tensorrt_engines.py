"""TensorRT engines from the exported ONNX graphs, cached on disk (TensorRT 10 and 11 Python API).

- FP32 engines build from the FP32 graph. FP16 engines build from an FP16 copy of the graph made by
  onnxconverter-common with FP32 inputs and outputs kept: TensorRT 11 has no FP16 builder flag (networks are strongly
  typed: the graph's types are the engine's), and the same route works on TensorRT 10.
- One optimization profile: on the batch axis (min 1 / opt 64 / max 512 by default), and for the whole-repair
  graphs of export/repair_graphs.py on the steps axis of their stacked parameters and on the ``steps`` trip count
  (a shape input; 1 / 40 / 80 by default). Their ONNX ``Loop`` carries a fixed shape (the batch of images), which
  TensorRT's loops require. Never built here: no machine this project ran on had TensorRT.
- A timing cache beside the engines makes rebuilds fast.
- The cache key is sha256 over the ONNX file's sha256, the TensorRT version, the GPU name and compute capability,
  the precision and the profile; an entry whose engine bytes do not match its record, or that fails to
  deserialize, is rebuilt with a message.

The library calls are confined to ``build_engine`` and ``load_engine``; the rest (keys, cache, FP16 graphs) is plain
Python and tested on machines without TensorRT.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import onnx

from . import BackendUnavailable
from runtime.files import atomic_write, sha256sum, write_json

PROFILE = (1, 64, 512)
STEPS_PROFILE = (1, 40, 80)
WORKSPACE_BYTES = 1 << 30


class TensorRTUnavailable(BackendUnavailable):
    """TensorRT or a CUDA GPU is missing; the message says which and how to get it."""


def import_tensorrt():
    """The tensorrt module, or TensorRTUnavailable with the reason (no package; no CUDA GPU)."""
    import torch

    try:
        import tensorrt as trt
    except ImportError:
        raise TensorRTUnavailable("TensorRT is not installed: pip install '.[tensorrt]' (its library wheels come from "
                                  "NVIDIA's package index; a CUDA GPU is needed too)") from None
    if not torch.cuda.is_available():
        raise TensorRTUnavailable("TensorRT needs a CUDA GPU, and PyTorch sees none here")
    return trt


@dataclass(frozen=True)
class EngineKey:
    onnx_sha256: str
    tensorrt: str
    gpu: str
    compute_capability: str
    precision: str
    profile: tuple[int, int, int]
    steps_profile: tuple[int, int, int] = STEPS_PROFILE      # the repair graphs' steps axis and trip count

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:24]


def engine_key(onnx_path: Path, tensorrt_version: str, gpu: str, compute_capability: str, precision: str,
               profile: tuple[int, int, int] = PROFILE) -> EngineKey:
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be fp32 or fp16, not {precision!r}")
    if not 1 <= profile[0] <= profile[1] <= profile[2]:
        raise ValueError(f"the profile must satisfy 1 <= min <= opt <= max, got {profile}")
    return EngineKey(sha256sum(onnx_path), tensorrt_version, gpu, compute_capability, precision, tuple(profile))


def fp16_graph(onnx_path: Path, out_path: Path) -> Path:
    """An FP16 copy of a graph whose inputs and outputs stay FP32 (Cast nodes at the edges)."""
    from onnxconverter_common import float16

    model = float16.convert_float_to_float16(onnx.load(str(onnx_path)), keep_io_types=True)
    atomic_write(out_path, lambda tmp: onnx.save(model, str(tmp)))
    return out_path


class EngineCache:
    """Serialized engines in ``root/<key digest>.engine`` with a JSON record of the key and the engine's sha256."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        stem = self.root / key.digest()
        return stem.with_suffix(".engine"), stem.with_suffix(".json")

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes], check: Callable[[bytes], object],
                     log: Callable[[str], None] = print) -> object:
        """``check(engine bytes)`` (deserialization) of the cached entry; where it is missing, mismatched or
        corrupt, ``build()`` a new one first (with a message for a bad entry)."""
        engine_path, record_path = self.paths(key)
        if engine_path.exists() and record_path.exists():
            problem = self._problem(key, engine_path, record_path)
            if problem is None:
                data = engine_path.read_bytes()
                try:
                    return check(data)
                except Exception as e:                  # a deserialization failure: rebuild
                    problem = f"it does not deserialize ({e})"
            log(f"rebuilding the TensorRT engine {engine_path.name}: {problem}")
        data = build()
        atomic_write(engine_path, lambda tmp: tmp.write_bytes(data))
        write_json(record_path, {"key": asdict(key), "engine_sha256": hashlib.sha256(data).hexdigest()})
        return check(data)

    @staticmethod
    def _problem(key: EngineKey, engine_path: Path, record_path: Path) -> str | None:
        try:
            record = json.loads(record_path.read_text())
        except ValueError:
            return "its record is not valid JSON"
        if record.get("key") != json.loads(json.dumps(asdict(key))):
            return "its record names another graph, TensorRT, GPU or precision"
        if sha256sum(engine_path) != record.get("engine_sha256"):
            return "the engine file does not match its record (corrupt)"
        return None


def parser_errors(parser) -> str:
    """The ONNX parser's errors, each with the node it failed on (name and operator where the API gives them)."""
    lines = []
    for i in range(parser.num_errors):
        err = parser.get_error(i)
        node_name = err.node_name() if hasattr(err, "node_name") else ""
        operator = err.node_operator() if hasattr(err, "node_operator") else ""
        lines.append(f"node {err.node()} {node_name} ({operator}): {err.desc()}")
    return "\n".join(lines)


def input_profiles(onnx_path: Path, profile: tuple[int, int, int] = PROFILE,
                   steps: tuple[int, int, int] = STEPS_PROFILE) -> dict[str, tuple[tuple[int, ...], ...]]:
    """(min, opt, max) of each graph input that is not fixed: a shape per input with a dynamic axis, named by the
    exporter's ``batch`` / ``steps`` axes (any other name is taken as a batch); for the 0-D int64 ``steps`` input of
    the Loop graph, its value (a TensorRT shape input)."""
    sizes = {"steps": steps}
    out = {}
    for graph_input in onnx.load(str(onnx_path), load_external_data=False).graph.input:
        tensor = graph_input.type.tensor_type
        dims = list(tensor.shape.dim)
        if not dims and graph_input.name == "steps" and tensor.elem_type == onnx.TensorProto.INT64:
            out[graph_input.name] = tuple((v,) for v in steps)
            continue
        if not any(d.dim_param or not d.HasField("dim_value") for d in dims):
            continue
        out[graph_input.name] = tuple(
            tuple(d.dim_value if d.HasField("dim_value") else sizes.get(d.dim_param, profile)[i] for d in dims)
            for i in range(3))
    return out


def build_engine(trt, onnx_path: Path, profile: tuple[int, int, int], timing_cache_path: Path) -> bytes:
    """Serialized engine for ``onnx_path`` (its types decide the precision: a strongly typed network)."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    flags = 0
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if strongly_typed is not None:
        flags |= 1 << int(strongly_typed)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise RuntimeError(f"TensorRT could not parse {onnx_path.name}:\n{parser_errors(parser)}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    opt_profile = builder.create_optimization_profile()
    shapes = input_profiles(onnx_path, profile)
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        if tensor.name not in shapes:
            continue
        if tensor.is_shape_tensor:                 # the Loop's trip count: a range of values, not of shapes
            opt_profile.set_shape_input(tensor.name, *shapes[tensor.name])
        else:
            opt_profile.set_shape(tensor.name, *shapes[tensor.name])
    config.add_optimization_profile(opt_profile)
    cache_bytes = timing_cache_path.read_bytes() if timing_cache_path.exists() else b""
    timing_cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(timing_cache, ignore_mismatch=True)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError(f"TensorRT failed to build an engine for {onnx_path.name} (see its log above)")
    atomic_write(timing_cache_path, lambda tmp: tmp.write_bytes(bytes(timing_cache.serialize())))
    return bytes(serialized)


def load_engine(onnx_path: Path, cache_dir: Path, precision: str = "fp32", profile: tuple[int, int, int] = PROFILE,
                log: Callable[[str], None] = print):
    """A deserialized ICudaEngine for a graph, from the cache or freshly built."""
    import torch

    trt = import_tensorrt()
    if precision == "fp16":
        onnx_path = fp16_graph(onnx_path, cache_dir / f"{onnx_path.stem}.fp16.onnx")
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    key = engine_key(onnx_path, trt.__version__, props.name, f"{props.major}.{props.minor}", precision, profile)
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))

    def deserialize(data: bytes):
        engine = runtime.deserialize_cuda_engine(data)
        if engine is None:
            raise RuntimeError("deserialize_cuda_engine returned None")
        return engine

    cache = EngineCache(cache_dir)
    return cache.get_or_build(key, lambda: build_engine(trt, onnx_path, profile, cache_dir / "timing.cache"),
                              deserialize, log)
