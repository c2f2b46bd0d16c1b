"""Everything between devices, in four rooms whose imports point down:

- ``membership``: the libp2p host, the mesh key, discovery and the member table;
- ``wire``: frames, codecs, links and transfer, shared by the two below;
- ``inference``: placement, stage servers, routing with replay, deploys;
- ``training``: training jobs, stages and their driver.
"""

# First: libp2p cannot be imported on Android until this has run (see _resolver).
from . import _resolver  # noqa: F401

# isort: split
from ._errors import AuthError as AuthError
from ._errors import ListenAddressError as ListenAddressError
from ._errors import MeshError as MeshError
from ._errors import WireError as WireError
from ._peerid import short_id as short_id
from .inference import DEFAULT_KV_BUDGET as DEFAULT_KV_BUDGET
from .inference import BadTokenError as BadTokenError
from .inference import ContextLengthError as ContextLengthError
from .inference import DeployError as DeployError
from .inference import Inference as Inference
from .inference import NoRouteError as NoRouteError
from .inference import PlacementError as PlacementError
from .inference import Sampling as Sampling
from .inference import StageRefusal as StageRefusal
from .inference import UnknownDeploymentError as UnknownDeploymentError
from .inference import generate_tokens as generate_tokens
from .inference import open_inference as open_inference
from .membership import InterfaceError as InterfaceError
from .membership import InviteError as InviteError
from .membership import LocalState as LocalState
from .membership import Mesh as Mesh
from .membership import MeshConfig as MeshConfig
from .membership import MeshKey as MeshKey
from .membership import MeshKeyError as MeshKeyError
from .membership import make_invite as make_invite
from .membership import open_mesh as open_mesh
from .membership import parse_invite as parse_invite
from .training import JobError as JobError
from .training import Training as Training
from .training import TrainingError as TrainingError
from .training import TrainJob as TrainJob
from .training import open_training as open_training
from .training import parse_job as parse_job
from .wire import CODECS as CODECS
from .wire import FrameBudget as FrameBudget
