"""The device's node: the daemon, its local API, and the Python client.

from salala.node import connect
node = connect()
outputs = node.infer("minilm", {"input_ids": ..., "attention_mask": ..., "token_type_ids": ...})
"""

# First: libp2p cannot be imported on Android until this has run (see mesh/_resolver).
from ..mesh import _resolver  # noqa: F401

# isort: split
from ._client import AsyncClient as AsyncClient
from ._client import AsyncGenerationStream as AsyncGenerationStream
from ._client import Client as Client
from ._client import Generated as Generated
from ._client import GenerationStream as GenerationStream
from ._client import connect as connect
from ._client import connect_async as connect_async
from ._errors import BadRequestError as BadRequestError
from ._errors import CannotDeployError as CannotDeployError
from ._errors import CannotSplitError as CannotSplitError
from ._errors import ConfigError as ConfigError
from ._errors import ContextLengthError as ContextLengthError
from ._errors import InvalidInputError as InvalidInputError
from ._errors import InvalidJobError as InvalidJobError
from ._errors import InvalidModelError as InvalidModelError
from ._errors import NodeAlreadyRunningError as NodeAlreadyRunningError
from ._errors import NodeDisconnectedError as NodeDisconnectedError
from ._errors import NodeError as NodeError
from ._errors import NodeNotRunningError as NodeNotRunningError
from ._errors import NoRouteError as NoRouteError
from ._errors import RequestError as RequestError
from ._errors import SalalaError as SalalaError
from ._errors import StoreFullError as StoreFullError
from ._errors import TrainingFailedError as TrainingFailedError
from ._errors import UnknownModelError as UnknownModelError
