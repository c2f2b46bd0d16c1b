"""Everything between devices: the libp2p host (discovery, membership and routing follow)."""

from ._errors import ListenAddressError as ListenAddressError
from ._errors import MeshError as MeshError
from ._host import MeshHost as MeshHost
from ._host import open_host as open_host
