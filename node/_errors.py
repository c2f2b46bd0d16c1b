"""Every error a Salala user can see.

    SalalaError
    ├── NodeNotRunningError       nothing answers on the data dir's API socket
    ├── NodeAlreadyRunningError   another node already serves this data dir
    ├── ConfigError               invalid settings (flags, config.toml, mesh key)
    ├── NodeDisconnectedError     the node closed the connection or stopped answering
    ├── RequestError              the node refused the request (the node is fine)
    │   ├── UnknownModelError     no model by that name
    │   ├── ContextLengthError    a prompt longer than the model's context
    │   ├── InvalidInputError     wrong input names, dtypes or shapes
    │   ├── InvalidModelError     the file is not a valid, self-contained ONNX model
    │   ├── CannotSplitError      too few cut points for the parts asked for
    │   ├── CannotDeployError     no placement fits, or a stage found no host
    │   ├── NoRouteError          a stage of the deployment has no live peer
    │   ├── InvalidJobError       a training job with a bad or missing setting
    │   ├── TrainingFailedError   a training job stopped: a stage refused, or no peers left
    │   ├── StoreFullError        the model store's quota (--max-store-gb) leaves no room
    │   └── BadRequestError       a malformed or oversized request
    └── NodeError                 the node failed while serving the request

The node sends a short code with each refusal; :data:`ERRORS_BY_CODE` turns it back into
the same class on the client, so callers catch one tree whether the node is local or not.
"""


class SalalaError(Exception):
    """Base class for every error Salala raises to its users."""


class NodeNotRunningError(SalalaError):
    """No node is serving the API socket in this data dir."""


class NodeAlreadyRunningError(SalalaError):
    """Another node already serves this data dir."""


class ConfigError(SalalaError, ValueError):
    """The node's settings are invalid; the message names the setting."""


class NodeDisconnectedError(SalalaError):
    """The connection to the node broke or timed out during a call."""


class RequestError(SalalaError):
    """The node refused the request; other requests are unaffected."""

    code = "bad_request"


class UnknownModelError(RequestError, LookupError):
    code = "unknown_model"


class ContextLengthError(RequestError, ValueError):
    """The prompt (plus the tokens asked for) does not fit the model's context length."""

    code = "context_length_exceeded"


class InvalidInputError(RequestError, ValueError):
    code = "invalid_input"


class InvalidModelError(RequestError, ValueError):
    code = "invalid_model"


class CannotSplitError(RequestError, ValueError):
    code = "cannot_split"


class CannotDeployError(RequestError):
    code = "cannot_deploy"


class NoRouteError(RequestError):
    code = "no_route"


class InvalidJobError(RequestError, ValueError):
    code = "invalid_job"


class TrainingFailedError(RequestError):
    code = "training_failed"


class StoreFullError(RequestError):
    code = "store_full"


class BadRequestError(RequestError, ValueError):
    code = "bad_request"


class NodeError(SalalaError):
    """The node hit an internal fault serving this request."""

    code = "internal"


ERRORS_BY_CODE: dict[str, type[SalalaError]] = {
    cls.code: cls
    for cls in (
        UnknownModelError,
        ContextLengthError,
        InvalidInputError,
        InvalidModelError,
        CannotSplitError,
        CannotDeployError,
        NoRouteError,
        InvalidJobError,
        TrainingFailedError,
        StoreFullError,
        BadRequestError,
        NodeError,
    )
}
