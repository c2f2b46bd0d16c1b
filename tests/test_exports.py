"""Each package's public surface is its __init__; everything else is private."""

import ast
import importlib
import pathlib

import pytest

SURFACES = {
    "salala.node": {
        "AsyncGenerationStream",
        "Generated",
        "GenerationStream",
        "connect",
        "connect_async",
        "Client",
        "AsyncClient",
        "SalalaError",
        "NodeNotRunningError",
        "NodeAlreadyRunningError",
        "NodeDisconnectedError",
        "RequestError",
        "UnknownModelError",
        "ContextLengthError",
        "InvalidInputError",
        "InvalidModelError",
        "CannotSplitError",
        "BadRequestError",
        "NodeError",
        "ConfigError",
        "CannotDeployError",
        "NoRouteError",
        "InvalidJobError",
        "TrainingFailedError",
        "StoreFullError",
    },
    "salala.mesh": {
        "open_mesh",
        "open_inference",
        "Inference",
        "CODECS",
        "FrameBudget",
        "DeployError",
        "PlacementError",
        "NoRouteError",
        "StageRefusal",
        "UnknownDeploymentError",
        "BadTokenError",
        "ContextLengthError",
        "generate_tokens",
        "Sampling",
        "DEFAULT_KV_BUDGET",
        "LocalState",
        "Mesh",
        "MeshConfig",
        "MeshKey",
        "MeshKeyError",
        "MeshError",
        "AuthError",
        "WireError",
        "ListenAddressError",
        "InterfaceError",
        "InviteError",
        "make_invite",
        "parse_invite",
        "short_id",
        "open_training",
        "Training",
        "TrainingError",
        "TrainJob",
        "JobError",
        "parse_job",
    },
    "salala.mesh.wire": {
        "CODECS",
        "WIRE_DTYPES",
        "encode_frame",
        "frame_timeout",
        "FrameBudget",
        "Lease",
        "payload_size",
        "read_header",
        "read_payload",
        "read_leased_payload",
        "skip_payload",
        "write_frame",
        "LinkError",
        "Links",
        "Streams",
        "CertificateError",
        "LinkIdentity",
        "load_link_identity",
        "DirectLinks",
        "LinkAddress",
        "LinkFrame",
        "decode_payload",
        "parse_header",
        "read_message",
        "NAME",
        "PEER_ID",
        "SHA256",
        "TENSOR_NAME",
        "TENSORS",
        "Check",
        "SchemaError",
        "array",
        "blob",
        "choice",
        "flag",
        "integer",
        "mapping",
        "nullable",
        "number",
        "opaque",
        "record",
        "row",
        "tagged",
        "text",
        "validate",
        "where",
        "write_message",
        "FETCH_PROTOCOL",
        "Fetcher",
        "Progress",
        "serve_fetch",
    },
    "salala.mesh.membership": {
        "SERVING_ENTRY",
        "DEPLOYMENT",
        "MAX_SERVING",
        "InterfaceError",
        "InviteError",
        "make_invite",
        "parse_invite",
        "LocalState",
        "Mesh",
        "MeshConfig",
        "open_mesh",
        "MeshKey",
        "MeshKeyError",
    },
    "salala.mesh.inference": {
        "DeployError",
        "Inference",
        "open_inference",
        "PlacementError",
        "NoRouteError",
        "StageRefusal",
        "UnknownDeploymentError",
        "BadTokenError",
        "ContextLengthError",
        "generate_tokens",
        "Sampling",
        "DEFAULT_KV_BUDGET",
    },
    "salala.mesh.training": {
        "Training",
        "TrainingError",
        "open_training",
        "JobError",
        "TrainJob",
        "parse_job",
    },
    "salala.runtime": {
        "ModelSession",
        "TensorSpec",
        "Capacity",
        "Hardware",
        "probe_hardware",
        "Policy",
        "PolicyError",
        "parse_quiet_hours",
        "refusal",
        "probe_capacity",
        "BatterySource",
        "BatteryState",
        "Throughput",
        "cached_throughput",
        "measure_throughput",
        "available_providers",
        "Accelerator",
        "find_accelerators",
        "RuntimeFault",
        "ModelLoadError",
        "InputMismatchError",
        "Optimizer",
        "OptimizerError",
        "make_optimizer",
        "default_battery_source",
    },
    "salala.models": {
        "DEFAULT_LLM",
        "smollm2_gguf",
        "ChatTemplateError",
        "check_messages",
        "render_chat",
        "TextStream",
        "LlmCard",
        "llm_card",
        "import_llm",
        "ModelStore",
        "StoredModel",
        "split_graph",
        "split_stored",
        "held_fragments",
        "MODEL_FILE",
        "digest_order",
        "split_stored_at",
        "analyze",
        "Cut",
        "CutAnalysis",
        "SplitPlan",
        "Fragment",
        "builtin_models",
        "DEFAULT_MODEL",
        "encode_texts",
        "sentence_embeddings",
        "ModelError",
        "InvalidModelError",
        "UnknownModelError",
        "SplitError",
        "TokenizerMissingError",
        "check_name",
        "Dataset",
        "load_digits",
        "batch_indices",
        "digits_mlp",
        "export_digits",
        "export_training",
        "TrainingFragment",
        "TrainingPackage",
        "load_package",
        "compose_inference",
        "PathEscapeError",
        "inside",
        "StoreFullError",
        "GB",
        "default_quota",
        "plan_eviction",
        "build_llm",
        "LlmImportError",
        "QUANTIZE",
        "OnnxMissingError",
        "analyze_stored",
    },
}


@pytest.mark.parametrize("package", sorted(SURFACES))
def test_public_names_are_exactly_the_surface(package: str) -> None:
    module = importlib.import_module(package)
    public = {
        name
        for name in vars(module)
        if not name.startswith("_") and not isinstance(vars(module)[name], type(module))
    }
    public |= getattr(module, "_NEED_ONNX", set())  # loaded on first use
    assert public == SURFACES[package]


# Each room may import only the rooms listed here, besides itself.
LAYERS = {
    "salala.runtime": set(),
    "salala.models": set(),
    "salala.mesh.wire": {"salala.models", "salala.runtime"},
    "salala.mesh.membership": {"salala.mesh.wire", "salala.models", "salala.runtime"},
    "salala.mesh.inference": {
        "salala.mesh.wire",
        "salala.mesh.membership",
        "salala.models",
        "salala.runtime",
    },
    "salala.mesh.training": {
        "salala.mesh.wire",
        "salala.mesh.membership",
        "salala.models",
        "salala.runtime",
    },
    "salala.mesh": {
        "salala.mesh.wire",
        "salala.mesh.membership",
        "salala.mesh.inference",
        "salala.mesh.training",
    },
}
ROOMS = ["salala.node", *LAYERS]
# The error tree and how peer ids are shown are leaves every room of the mesh may use.
SHARED_BY_MESH = ("salala.mesh._errors", "salala.mesh._peerid")


def _room(module: str) -> str:
    return next(room for room in sorted(ROOMS, key=len, reverse=True) if module.startswith(room))


def _imports(source: pathlib.Path, module: str) -> list[str]:
    package = module.rpartition(".")[0] if source.name != "__init__.py" else module
    found = []
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module or "") if p)
            found += [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
    return [name for name in found if name.startswith("salala.")]


def test_imports_point_down_and_cross_rooms_only_through_their_faces() -> None:
    root = pathlib.Path(__file__).resolve().parent.parent
    checked = 0
    for folder in ("runtime", "models", "mesh"):
        for source in (root / folder).rglob("*.py"):
            parts = source.relative_to(root).with_suffix("").parts
            module = ".".join(("salala", *parts)).removesuffix(".__init__")
            room = _room(module)
            for target in _imports(source, module):
                other = _room(target)
                if other == room or (target.startswith(SHARED_BY_MESH) and room in LAYERS):
                    continue
                assert other in LAYERS[room], f"{module} imports {target}: not below {room}"
                private = target.removeprefix(other).lstrip(".").split(".")
                assert not private[0].startswith("_"), f"{module} reaches into {target}"
                checked += 1
    assert checked > 20  # the walk really saw the cross-room imports
