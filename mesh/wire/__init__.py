"""The wire: bytes on streams between members, shared by inference and training.

Framed msgpack control messages, tensor frames with codecs, one outbound link per peer,
and content-addressed transfer. It knows nothing of membership or of what frames mean.
"""

from ._codecs import CODECS as CODECS
from ._codecs import WIRE_DTYPES as WIRE_DTYPES
from ._frames import encode_frame as encode_frame
from ._frames import payload_size as payload_size
from ._frames import read_header as read_header
from ._frames import read_payload as read_payload
from ._frames import write_frame as write_frame
from ._links import LinkError as LinkError
from ._links import Links as Links
from ._links import Streams as Streams
from ._messages import field as field
from ._messages import read_message as read_message
from ._messages import write_message as write_message
from ._transfer import FETCH_PROTOCOL as FETCH_PROTOCOL
from ._transfer import Fetcher as Fetcher
from ._transfer import Progress as Progress
from ._transfer import serve_fetch as serve_fetch
