"""Everything between devices: the libp2p host, the mesh key, discovery and membership."""

from ._codecs import CODECS as CODECS
from ._deploy import DeployError as DeployError
from ._errors import AuthError as AuthError
from ._errors import ListenAddressError as ListenAddressError
from ._errors import MeshError as MeshError
from ._errors import WireError as WireError
from ._inference import Inference as Inference
from ._inference import open_inference as open_inference
from ._interfaces import InterfaceError as InterfaceError
from ._invite import InviteError as InviteError
from ._invite import make_invite as make_invite
from ._invite import parse_invite as parse_invite
from ._mesh import LocalState as LocalState
from ._mesh import Mesh as Mesh
from ._mesh import MeshConfig as MeshConfig
from ._mesh import open_mesh as open_mesh
from ._meshkey import MeshKey as MeshKey
from ._meshkey import MeshKeyError as MeshKeyError
from ._peerid import short_id as short_id
from ._placement import PlacementError as PlacementError
from ._router import NoRouteError as NoRouteError
from ._router import StageRefusal as StageRefusal
from ._router import UnknownDeploymentError as UnknownDeploymentError
