"""Each package's public surface is its __init__; everything else is private."""

import importlib

import pytest

SURFACES = {
    "salala.node": {
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
    },
    "salala.mesh": {
        "open_mesh",
        "open_inference",
        "Inference",
        "CODECS",
        "DeployError",
        "PlacementError",
        "NoRouteError",
        "StageRefusal",
        "UnknownDeploymentError",
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
    "salala.runtime": {
        "ModelSession",
        "TensorSpec",
        "Capacity",
        "probe_capacity",
        "BatterySource",
        "BatteryState",
        "Throughput",
        "cached_throughput",
        "measure_throughput",
        "available_providers",
        "RuntimeFault",
        "ModelLoadError",
        "InputMismatchError",
        "Optimizer",
        "OptimizerError",
        "make_optimizer",
    },
    "salala.models": {
        "ModelStore",
        "StoredModel",
        "split_graph",
        "split_stored",
        "held_fragments",
        "MODEL_FILE",
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
    assert public == SURFACES[package]


def test_lower_layers_do_not_import_upper_ones() -> None:
    import pathlib

    root = pathlib.Path(__file__).resolve().parent.parent
    for package, forbidden in {
        "runtime": ("mesh", "node"),
        "models": ("mesh", "node"),
        "mesh": ("node",),
    }.items():
        for source in (root / package).glob("*.py"):
            text = source.read_text()
            for upper in forbidden:
                assert f"from ..{upper}" not in text, f"{source} imports {upper}"
                assert f"salala.{upper}" not in text, f"{source} imports {upper}"
