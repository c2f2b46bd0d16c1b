"""The wire: bytes between members, shared by inference and training.

Framed msgpack control messages, tensor frames with codecs, direct TLS links between
members (with libp2p streams as the fallback), and content-addressed transfer. It knows
nothing of membership or of what frames mean.
"""

from ._budget import FrameBudget as FrameBudget
from ._budget import Lease as Lease
from ._certs import CertificateError as CertificateError
from ._certs import LinkIdentity as LinkIdentity
from ._certs import load_link_identity as load_link_identity
from ._codecs import CODECS as CODECS
from ._codecs import WIRE_DTYPES as WIRE_DTYPES
from ._direct import DirectLinks as DirectLinks
from ._direct import LinkAddress as LinkAddress
from ._direct import LinkFrame as LinkFrame
from ._frames import decode_payload as decode_payload
from ._frames import encode_frame as encode_frame
from ._frames import frame_timeout as frame_timeout
from ._frames import parse_header as parse_header
from ._frames import payload_size as payload_size
from ._frames import read_header as read_header
from ._frames import read_leased_payload as read_leased_payload
from ._frames import read_payload as read_payload
from ._frames import skip_payload as skip_payload
from ._frames import write_frame as write_frame
from ._links import LinkError as LinkError
from ._links import Links as Links
from ._links import Streams as Streams
from ._messages import read_message as read_message
from ._messages import write_message as write_message
from ._schema import NAME as NAME
from ._schema import PEER_ID as PEER_ID
from ._schema import SHA256 as SHA256
from ._schema import TENSOR_NAME as TENSOR_NAME
from ._schema import TENSORS as TENSORS
from ._schema import Check as Check
from ._schema import SchemaError as SchemaError
from ._schema import array as array
from ._schema import blob as blob
from ._schema import choice as choice
from ._schema import flag as flag
from ._schema import integer as integer
from ._schema import mapping as mapping
from ._schema import nullable as nullable
from ._schema import number as number
from ._schema import opaque as opaque
from ._schema import record as record
from ._schema import row as row
from ._schema import tagged as tagged
from ._schema import text as text
from ._schema import validate as validate
from ._schema import where as where
from ._transfer import FETCH_PROTOCOL as FETCH_PROTOCOL
from ._transfer import Fetcher as Fetcher
from ._transfer import Progress as Progress
from ._transfer import serve_fetch as serve_fetch
