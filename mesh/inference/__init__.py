"""Sharded inference: placement, stage servers, the replaying router and deploys."""

from ._deploy import DeployError as DeployError
from ._generate import BadTokenError as BadTokenError
from ._generate import ContextLengthError as ContextLengthError
from ._generate import generate_tokens as generate_tokens
from ._open import Inference as Inference
from ._open import open_inference as open_inference
from ._placement import PlacementError as PlacementError
from ._router import NoRouteError as NoRouteError
from ._router import StageRefusal as StageRefusal
from ._router import UnknownDeploymentError as UnknownDeploymentError
from ._sampling import Sampling as Sampling
from ._serving import DEFAULT_KV_BUDGET as DEFAULT_KV_BUDGET
