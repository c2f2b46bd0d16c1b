"""A training job as ``salala train JOB.toml`` and ``node.train(...)`` describe it.

package = "digits-mlp"        # a training package folder (relative to the file)
dataset = "digits"            # data the requester loads and feeds in
steps = 200
batch = 64
micro_batches = 4             # per replica and step, pipelined through the stages
replicas = 1                  # data-parallel copies of the pipeline
checkpoint_every = 10         # steps; also the most a lost peer can cost
output = "digits-trained"     # the trained model's name in the store
seed = 0
[optimizer]
kind = "adam"                 # or "sgd" (with momentum = ...)
lr = 0.01
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ...models import ModelError, check_name
from ...runtime import OptimizerError, make_optimizer
from .._errors import MeshError

DATASETS = ("digits",)
MAX_MICRO_BATCHES = 32


class JobError(MeshError, ValueError):
    """A job description with a missing, unknown or out-of-range setting."""


@dataclass(frozen=True)
class TrainJob:
    package: Path
    steps: int
    output: str
    dataset: str = "digits"
    batch: int = 64
    micro_batches: int = 4
    replicas: int = 1
    checkpoint_every: int = 10
    seed: int = 0
    optimizer: dict[str, Any] = field(default_factory=lambda: {"kind": "sgd", "lr": 0.1})


def parse_job(table: dict[str, Any], base: Path) -> TrainJob:
    """Validate a job table; ``package`` is resolved against ``base``."""
    known = set(TrainJob.__dataclass_fields__)
    unknown = set(table) - known
    if unknown:
        raise JobError(f"unknown job settings: {', '.join(sorted(unknown))}")
    for required in ("package", "steps", "output"):
        if required not in table:
            raise JobError(f"the job needs {required!r}")
    values = dict(table)
    values["package"] = (base / str(values["package"])).resolve()
    for name in ("steps", "batch", "micro_batches", "replicas", "checkpoint_every", "seed"):
        if name in values and (not isinstance(values[name], int) or isinstance(values[name], bool)):
            raise JobError(f"{name} must be an integer, not {values[name]!r}")
    for name in ("output", "dataset"):
        if name in values and not isinstance(values[name], str):
            raise JobError(f"{name} must be a string, not {values[name]!r}")
    job = TrainJob(**values)
    if job.seed < 0:
        raise JobError(f"seed must be 0 or more, not {job.seed}")
    if job.steps < 1 or job.batch < 1 or job.replicas < 1 or job.checkpoint_every < 1:
        raise JobError("steps, batch, replicas and checkpoint_every must be at least 1")
    if not 1 <= job.micro_batches <= MAX_MICRO_BATCHES:
        raise JobError(f"micro_batches must be between 1 and {MAX_MICRO_BATCHES}")
    if job.batch < job.replicas * job.micro_batches:
        raise JobError("batch must hold at least one sample per replica and micro-batch")
    if job.dataset not in DATASETS:
        raise JobError(f"unknown dataset {job.dataset!r}; known: {', '.join(DATASETS)}")
    if not isinstance(job.optimizer, dict):
        raise JobError("[optimizer] must be a table")
    try:
        make_optimizer(job.optimizer)
        check_name(job.output)
    except (OptimizerError, ModelError) as exc:
        raise JobError(str(exc)) from exc
    return job
