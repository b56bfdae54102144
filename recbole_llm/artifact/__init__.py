"""The artifact contract, numpy only: what ``recbole-llm export`` writes and the runtime, the service and Triton read.

Written by :mod:`recbole_llm.export`, read by :mod:`recbole_llm.serving`; imports neither torch nor RecBole.
One idea per module, every public name re-exported here (``from recbole_llm import artifact``, then
``artifact.MODEL_FILE``, ``artifact.top_k``):

- :mod:`~recbole_llm.artifact.spec`: file names, format constants, the graph's inputs and outputs;
- :mod:`~recbole_llm.artifact.ranking`: the numpy post-processing of a graph that scores every item;
- :mod:`~recbole_llm.artifact.metadata`: metadata.json's schema and checks, and its agreement with the graph;
- :mod:`~recbole_llm.artifact.files`: reading the files safely, and the graph's signature that vouches for them;
- :mod:`~recbole_llm.artifact.folder`: writing an artifact folder atomically.

A broken artifact raises :class:`recbole_llm.errors.ArtifactError` (also here as ``artifact.ArtifactError``).
"""

from recbole_llm.errors import ArtifactError
from recbole_llm.artifact.spec import (EXCLUDE_ITEMS, FILES_DIGEST, FORMAT_VERSION, ITEM_LENGTH, ITEM_SEQ,
                                       ITEM_VECTORS, ITEM_VECTORS_FILE, MAX_LENGTH_LIMIT, MAX_TEXT_TOKENS,
                                       METADATA_DIGEST, METADATA_FILE, MODEL_FILE, PADDING_TOKEN, PRECISIONS,
                                       REEXPORT, SCORES, TEXT_ATTENTION_MASK, TEXT_INPUT_IDS, TEXT_TOWER_FILE,
                                       TOKENIZER_FILE, TOP_ITEMS, TOP_SCORES, TRITON_FOLDER, USER_VECTORS,
                                       TensorSpec, feeds, input_names, input_specs, output_names, output_specs,
                                       text_tower_specs)
from recbole_llm.artifact.ranking import PARTIAL_SORT_FROM, exclusions, item_scores, top_k
from recbole_llm.artifact.files import (check_regular, check_signature, companion_files, file_record,
                                        metadata_digest, read_companion, read_item_vectors, read_regular,
                                        sha256_of, signed_graph)
from recbole_llm.artifact.metadata import (GRAPH_METADATA_KEYS, REPEAT_RATE_THRESHOLD, check_graph,
                                           check_metadata, metadata_schema, read_metadata, served_exclude_seen)
from recbole_llm.artifact.folder import atomic_folder, remove_leftovers, replace_folder, staging_folder

__all__ = [
    "ArtifactError",
    # spec
    "FORMAT_VERSION", "MODEL_FILE", "METADATA_FILE", "TRITON_FOLDER", "PADDING_TOKEN", "MAX_LENGTH_LIMIT",
    "PRECISIONS", "MAX_TEXT_TOKENS", "REEXPORT", "METADATA_DIGEST", "FILES_DIGEST", "ITEM_SEQ", "ITEM_LENGTH",
    "EXCLUDE_ITEMS", "SCORES", "TOP_ITEMS", "TOP_SCORES", "ITEM_VECTORS", "USER_VECTORS", "ITEM_VECTORS_FILE",
    "TEXT_TOWER_FILE", "TOKENIZER_FILE", "TEXT_INPUT_IDS", "TEXT_ATTENTION_MASK", "TensorSpec", "input_specs",
    "output_specs", "input_names", "output_names", "text_tower_specs", "feeds",
    # ranking
    "exclusions", "item_scores", "top_k", "PARTIAL_SORT_FROM",
    # metadata
    "REPEAT_RATE_THRESHOLD", "metadata_schema", "check_metadata", "served_exclude_seen", "read_metadata",
    "GRAPH_METADATA_KEYS", "check_graph",
    # files
    "sha256_of", "check_regular", "read_regular", "file_record", "companion_files", "metadata_digest",
    "signed_graph", "check_signature", "read_companion", "read_item_vectors",
    # folder
    "staging_folder", "replace_folder", "remove_leftovers", "atomic_folder",
]
