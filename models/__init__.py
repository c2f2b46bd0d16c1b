"""ONNX graph work: checking, storing by hash, splitting into fragments, text encoding."""

from ._builtin import DEFAULT_MODEL as DEFAULT_MODEL
from ._builtin import builtin_models as builtin_models
from ._errors import InvalidModelError as InvalidModelError
from ._errors import ModelError as ModelError
from ._errors import SplitError as SplitError
from ._errors import UnknownModelError as UnknownModelError
from ._fragments import Fragment as Fragment
from ._fragments import SplitPlan as SplitPlan
from ._fragments import held_fragments as held_fragments
from ._fragments import split_stored as split_stored
from ._fragments import split_stored_at as split_stored_at
from ._split import Cut as Cut
from ._split import CutAnalysis as CutAnalysis
from ._split import analyze as analyze
from ._split import split_graph as split_graph
from ._store import MODEL_FILE as MODEL_FILE
from ._store import ModelStore as ModelStore
from ._store import StoredModel as StoredModel
from ._text import TokenizerMissingError as TokenizerMissingError
from ._text import encode_texts as encode_texts
from ._text import sentence_embeddings as sentence_embeddings
