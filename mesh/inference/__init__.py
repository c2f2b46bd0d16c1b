"""Sharded inference: placement, stage servers, the replaying router and deploys."""

from ._deploy import DeployError as DeployError
from ._open import Inference as Inference
from ._open import open_inference as open_inference
from ._placement import PlacementError as PlacementError
from ._router import NoRouteError as NoRouteError
from ._router import StageRefusal as StageRefusal
from ._router import UnknownDeploymentError as UnknownDeploymentError
