"""Training across the mesh: jobs, pipeline and data-parallel stages, the driver."""

from ._driver import Training as Training
from ._driver import TrainingError as TrainingError
from ._driver import open_training as open_training
from ._job import JobError as JobError
from ._job import TrainJob as TrainJob
from ._job import parse_job as parse_job
