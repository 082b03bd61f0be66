"""Vector indexes, kNN graphs and near-duplicate removal on FAISS (numpy/faiss only).

See docs/index.md for sizing rules, GPU behaviour and measured figures.
"""

from pipeline.index.device import (
    FaissDevice,
    describe_device,
    gpu_available,
    index_to_cpu,
    index_to_device,
    resolve_use_gpu,
)
from pipeline.index.faiss_index import (
    BuildInfo,
    FaissIndex,
    IndexSpec,
    VectorSource,
    build_index,
    choose_spec,
    l2_normalize,
    open_source,
    recall_at_k,
)
from pipeline.index.knn_graph import (
    KnnGraph,
    exact_knn_graph,
    knn_graph,
    read_edges_parquet,
    symmetrize_graph,
    write_edges_parquet,
)
from pipeline.index.semdedup import (
    SemDedupReport,
    SemDedupResult,
    choose_n_clusters,
    semdedup,
)

__all__ = [
    "BuildInfo",
    "FaissDevice",
    "FaissIndex",
    "IndexSpec",
    "KnnGraph",
    "SemDedupReport",
    "SemDedupResult",
    "VectorSource",
    "build_index",
    "choose_n_clusters",
    "choose_spec",
    "describe_device",
    "exact_knn_graph",
    "gpu_available",
    "index_to_cpu",
    "index_to_device",
    "knn_graph",
    "l2_normalize",
    "open_source",
    "read_edges_parquet",
    "recall_at_k",
    "resolve_use_gpu",
    "semdedup",
    "symmetrize_graph",
    "write_edges_parquet",
]
