"""GAIS: graph attention-based instance selection (see docs/gais.md)."""

from pipeline.select.gais.gat import (
    GAT,
    GATConfig,
    GATLayer,
    GATResult,
    segment_softmax,
    train_gat,
)
from pipeline.select.gais.graphs import (
    VARIANTS,
    Graph,
    GraphConfig,
    HashConfig,
    KNNConfig,
    MiniBatchConfig,
    MultiLevelConfig,
    MultiViewConfig,
    build_graph,
    default_config,
    hash_graph,
    knn_graph,
    minibatch_graph,
    multilevel_graph,
    multiview_graph,
    symmetrize,
)
from pipeline.select.gais.coverage import coverage_select
from pipeline.select.gais.selection import (
    EXTENSIONS,
    GAIS_SCORINGS,
    SCORING_RULES,
    GAISResult,
    attention_scores,
    gais_select,
    per_class_quota,
    select_top_per_class,
)

__all__ = [
    "EXTENSIONS", "GAIS_SCORINGS", "coverage_select",
    "GAISResult", "GAT", "GATConfig", "GATLayer", "GATResult", "Graph", "GraphConfig",
    "HashConfig", "KNNConfig", "MiniBatchConfig", "MultiLevelConfig", "MultiViewConfig",
    "SCORING_RULES", "VARIANTS", "attention_scores", "build_graph", "default_config",
    "gais_select", "hash_graph", "knn_graph", "minibatch_graph", "multilevel_graph",
    "multiview_graph", "per_class_quota", "segment_softmax", "select_top_per_class",
    "symmetrize", "train_gat",
]
