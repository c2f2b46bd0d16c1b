"""Membership and discovery: who is in the mesh, how to reach them, who stays out.

The libp2p host, the mesh key and its handshake, signed capacity adverts and their
exchange, the member table, mDNS on chosen interfaces, and invites.
"""

from ._adverts import DEPLOYMENT as DEPLOYMENT
from ._adverts import MAX_SERVING as MAX_SERVING
from ._adverts import SERVING_ENTRY as SERVING_ENTRY
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
