"""A compact two-layer graph attention network (GAT) on an edge list, in plain PyTorch.

Attention logits are computed per edge from per-node terms (gathered by ``src``/``dst``); the
softmax over each node's incoming edges subtracts a per-node maximum (``scatter_reduce``
"amax") before exponentiating, so large logits cannot overflow; sums use ``index_add``.
Self loops are appended, so every node also attends to itself.

Aggregation (sum over incoming edges of alpha x W h_src) is where the cost is. Gathering
``h[src]`` into an E x heads x hidden tensor and scattering it back with ``index_add`` moved
~10x more memory than a CSR sparse-dense product on this machine (60k nodes, 800k edges: 1.9 s
vs 0.2 s per layer), so the aggregation is a custom autograd function built on CSR products:
forward A @ h, backward A^T @ grad for h and a sampled dense-dense product (SDDMM) for the
attention weights. Nothing E x hidden is ever materialised; per layer the network keeps
E x heads floats of attention. Edges are therefore kept sorted by (dst, src).

Large graphs train on induced subgraphs of whole node groups (the graph builder's batches or
buckets, Cluster-GCN style) to bound the autograd memory; attention is then computed on the
full graph without autograd.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F


@dataclass(frozen=True)
class GATConfig:
    """Hyper-parameters; defaults follow the spec (2 layers, 4 heads, hidden 32, dropout 0.3,
    Adam lr 0.01). The output layer has ``heads`` heads of width n_classes, averaged.

    ``train_mode``: "full" (one autograd pass over the whole graph per epoch), "cluster"
    (induced subgraphs of about ``batch_nodes`` nodes built from whole node groups; one epoch =
    one pass over all groups) or "auto" (full when E x heads x hidden <= ``full_batch_max_elems``).

    ``num_threads``: torch intra-op threads while training (None: leave torch's setting). The
    default is 1 because on the shared 2-core development machine, with other processes busy,
    two threads made training 4x slower (digits, 100 epochs: 53 s vs 12 s, measured with an
    earlier gather/scatter aggregation) - spinning OpenMP threads wait on a core that is busy.
    """

    hidden: int = 32
    heads: int = 4
    dropout: float = 0.3
    lr: float = 0.01
    weight_decay: float = 5e-4
    epochs: int = 100
    negative_slope: float = 0.2
    train_mode: str = "auto"
    batch_nodes: int = 32768
    full_batch_max_elems: int = 1 << 27
    device: str | None = None
    num_threads: int | None = 1


@dataclass
class GATResult:
    """Attention of the trained network, evaluated on the full graph (no dropout).

    ``src``/``dst`` are the graph's edges plus the N self loops (i -> i), sorted by (dst, src).
    ``attention[layer]`` is a float32 (len(src), heads) array: the weight with which ``dst``
    attends to ``src``; for every node and head the weights over its incoming edges sum to 1.
    """

    src: np.ndarray
    dst: np.ndarray
    attention: list[np.ndarray]
    train_mode: str
    epochs: int
    loss_history: list[float]
    train_accuracy: float
    device: str
    timings: dict[str, float] = field(default_factory=dict)


class GATLayer(nn.Module):
    """One multi-head graph attention layer (Velickovic et al. 2018 formulation)."""

    def __init__(
        self, in_dim: int, out_dim: int, heads: int, *, concat: bool, dropout: float,
        negative_slope: float,
    ) -> None:
        super().__init__()
        self.heads, self.out_dim, self.concat = heads, out_dim, concat
        self.dropout, self.negative_slope = dropout, negative_slope
        self.lin = nn.Linear(in_dim, heads * out_dim, bias=False)
        self.att_src = nn.Parameter(torch.empty(heads, out_dim))
        self.att_dst = nn.Parameter(torch.empty(heads, out_dim))
        self.bias = nn.Parameter(torch.zeros(heads * out_dim if concat else out_dim))
        nn.init.xavier_uniform_(self.lin.weight)
        nn.init.xavier_uniform_(self.att_src)
        nn.init.xavier_uniform_(self.att_dst)

    def forward(self, x: torch.Tensor, plan: EdgePlan) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (node outputs, attention (E, heads) in ``plan`` edge order)."""
        n = x.shape[0]
        h = self.lin(x).view(n, self.heads, self.out_dim)
        # The logit a^T [W h_dst || W h_src] splits into a per-node source and destination
        # term, so only (N, heads) is computed per node and gathered per edge.
        score_src = (h * self.att_src).sum(dim=-1)
        score_dst = (h * self.att_dst).sum(dim=-1)
        logits = score_src[plan.src]
        logits += score_dst[plan.dst]
        # In-place where autograd allows: at 30M edges each E x heads temporary is ~0.5 GB.
        logits = (F.leaky_relu_(logits, self.negative_slope) if not torch.is_grad_enabled()
                  else F.leaky_relu(logits, self.negative_slope))
        alpha = segment_softmax(logits, plan.dst, n)
        del logits
        weights = F.dropout(alpha, p=self.dropout, training=self.training)
        out = _CSRAggregate.apply(weights, h.transpose(0, 1).contiguous(), plan)
        out = out.transpose(0, 1)  # (N, heads, out_dim)
        out = out.reshape(n, -1) if self.concat else out.mean(dim=1)
        return out + self.bias, alpha


class GAT(nn.Module):
    """Two GAT layers: concatenated hidden heads + ELU, then averaged output heads."""

    def __init__(self, in_dim: int, n_classes: int, config: GATConfig) -> None:
        super().__init__()
        self.dropout = config.dropout
        self.layer1 = GATLayer(in_dim, config.hidden, config.heads, concat=True,
                               dropout=config.dropout, negative_slope=config.negative_slope)
        self.layer2 = GATLayer(config.hidden * config.heads, n_classes, config.heads,
                               concat=False, dropout=config.dropout,
                               negative_slope=config.negative_slope)

    def forward(self, x: torch.Tensor, plan: EdgePlan) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = F.dropout(x, p=self.dropout, training=self.training)
        x, alpha1 = self.layer1(x, plan)
        x = F.elu(x)
        x = F.dropout(x, p=self.dropout, training=self.training)
        logits, alpha2 = self.layer2(x, plan)
        return logits, [alpha1, alpha2]


@dataclass
class EdgePlan:
    """An edge list (self loops included) prepared for CSR products.

    Edges are sorted by (dst, src): row ``dst`` of the CSR matrix A holds the attention of dst
    over its sources. ``t_perm`` reorders edges by (src, dst), giving A^T in CSR form.
    """

    n: int
    src: torch.Tensor
    dst: torch.Tensor
    crow: torch.Tensor
    t_perm: torch.Tensor
    t_crow: torch.Tensor
    t_col: torch.Tensor

    @staticmethod
    def build(src: np.ndarray, dst: np.ndarray, n: int, device: torch.device) -> EdgePlan:
        """``src``/``dst`` must already be sorted by (dst, src)."""
        t_perm = np.lexsort((dst, src))
        as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device)
        return EdgePlan(
            n=n, src=as_t(src), dst=as_t(dst), crow=as_t(_crow(dst, n)),
            t_perm=as_t(t_perm), t_crow=as_t(_crow(src[t_perm], n)), t_col=as_t(dst[t_perm]),
        )

    def matrix(self, values: torch.Tensor, transpose: bool = False) -> torch.Tensor:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
            if transpose:
                return torch.sparse_csr_tensor(self.t_crow, self.t_col, values[self.t_perm],
                                               size=(self.n, self.n), check_invariants=False)
            return torch.sparse_csr_tensor(self.crow, self.src, values,
                                           size=(self.n, self.n), check_invariants=False)


class _CSRAggregate(torch.autograd.Function):
    """out[k] = A_k @ h[k] per head k, where A_k[dst, src] = weights[e, k].

    weights: (E, heads) in plan order; h: (heads, N, C) contiguous; returns (heads, N, C).
    """

    @staticmethod
    def forward(ctx, weights: torch.Tensor, h: torch.Tensor, plan: EdgePlan) -> torch.Tensor:
        out = torch.empty_like(h)
        for k in range(h.shape[0]):
            out[k] = torch.sparse.mm(plan.matrix(weights[:, k].contiguous()), h[k])
        ctx.save_for_backward(weights, h)
        ctx.plan = plan
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        weights, h = ctx.saved_tensors
        plan: EdgePlan = ctx.plan
        grad_out = grad_out.contiguous()
        grad_w = grad_h = None
        if ctx.needs_input_grad[1]:
            grad_h = torch.empty_like(h)
            for k in range(h.shape[0]):
                grad_h[k] = torch.sparse.mm(
                    plan.matrix(weights[:, k].contiguous(), transpose=True), grad_out[k])
        if ctx.needs_input_grad[0]:
            # d out[dst] / d w[e] = h[src]: the gradient is <grad_out[dst], h[src]> per edge,
            # an SDDMM that torch computes on the CSR pattern without gathering E x C.
            grad_w = torch.empty_like(weights)
            pattern = plan.matrix(torch.zeros(weights.shape[0], dtype=weights.dtype,
                                              device=weights.device))
            for k in range(h.shape[0]):
                grad_w[:, k] = torch.sparse.sampled_addmm(
                    pattern, grad_out[k], h[k].T, beta=0.0).values()
        return grad_w, grad_h, None


def _crow(sorted_rows: np.ndarray, n: int) -> np.ndarray:
    crow = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(sorted_rows, minlength=n), out=crow[1:])
    return crow


class _Adam:
    """Adam with L2 weight decay, the update of torch.optim.Adam (default settings).

    Written out because constructing a torch.optim optimiser imports torch._dynamo, which took
    2-9 s per process here - longer than a whole GAIS run on a small data set.
    """

    def __init__(self, params, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]
        self.t = 0

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            g = p.grad.add(p, alpha=self.weight_decay) if self.weight_decay else p.grad
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (v / c2).sqrt_().add_(self.eps)
            p.addcdiv_(m, denom, value=-self.lr / c1)


def segment_softmax(logits: torch.Tensor, index: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Softmax of ``logits`` (E, H) over the rows sharing the same ``index`` (E,)."""
    expanded = index.unsqueeze(-1).expand_as(logits)
    with torch.no_grad():
        # The shift cancels in the ratio, so it needs no gradient.
        seg_max = torch.full((n_segments, logits.shape[1]), float("-inf"),
                             dtype=logits.dtype, device=logits.device)
        seg_max.scatter_reduce_(0, expanded, logits, reduce="amax", include_self=True)
    if not torch.is_grad_enabled():
        # Same arithmetic, in place: no E x heads temporaries beyond the result.
        expo = logits.clone().sub_(seg_max[index]).exp_()
        denom = torch.zeros_like(seg_max).index_add_(0, index, expo)
        return expo.div_(denom[index])
    expo = (logits - seg_max[index]).exp()
    denom = torch.zeros((n_segments, logits.shape[1]), dtype=logits.dtype,
                        device=logits.device).index_add(0, index, expo)
    return expo / denom[index]


def train_gat(
    X: np.ndarray,
    y: np.ndarray,
    src: np.ndarray,
    dst: np.ndarray,
    config: GATConfig = GATConfig(),
    *,
    groups: np.ndarray | None = None,
    seed: int = 0,
) -> GATResult:
    """Train a GAT to predict ``y`` (integer codes 0..C-1) on the graph and return its attention.

    ``src``/``dst`` must not contain self loops (they are added here). ``groups`` (one int label
    per node) drives cluster training; without it cluster mode uses seeded random node chunks,
    which drops most edges from the training subgraphs (fine for tests, poor for quality).
    Deterministic for a given seed and device: RNG state is forked so the caller's is untouched.
    """
    X, y, src, dst = _check_inputs(X, y, src, dst)
    n = X.shape[0]
    n_classes = int(y.max()) + 1
    if config.epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {config.epochs}")
    mode = _pick_mode(config, src.size + n)
    device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loop = np.arange(n, dtype=np.int64)
    full_src, full_dst = _sorted_by_dst(np.concatenate([src, loop]), np.concatenate([dst, loop]), n)
    timings: dict[str, float] = {}
    with _deterministic(seed, device), _torch_threads(config.num_threads):
        model = GAT(X.shape[1], n_classes, config).to(device)
        optimiser = _Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        x_t = torch.from_numpy(X).to(device)
        y_t = torch.from_numpy(y).to(device)
        t0 = time.perf_counter()
        if mode == "full":
            plan = EdgePlan.build(full_src, full_dst, n, device)
            losses = _train_full(model, optimiser, x_t, y_t, plan, config)
        else:
            losses = _train_cluster(model, optimiser, x_t, y_t, src, dst, groups, config,
                                    device, seed)
            plan = EdgePlan.build(full_src, full_dst, n, device)
        timings["train_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.eval()
        with torch.no_grad():
            logits, alphas = model(x_t, plan)
            accuracy = float((logits.argmax(dim=1) == y_t).float().mean().item())
            attention = [a.float().cpu().numpy() for a in alphas]
            del plan, logits, alphas
        timings["attention_s"] = time.perf_counter() - t0
    return GATResult(
        src=full_src, dst=full_dst, attention=attention, train_mode=mode,
        epochs=config.epochs, loss_history=losses, train_accuracy=accuracy,
        device=str(device), timings=timings,
    )


def _train_full(
    model: GAT, optimiser: _Adam, x: torch.Tensor, y: torch.Tensor, plan: EdgePlan,
    config: GATConfig,
) -> list[float]:
    losses = []
    model.train()
    for _ in range(config.epochs):
        optimiser.zero_grad()
        logits, _ = model(x, plan)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.item()))
    return losses


def _train_cluster(
    model: GAT, optimiser: _Adam, x: torch.Tensor, y: torch.Tensor,
    src: np.ndarray, dst: np.ndarray, groups: np.ndarray | None, config: GATConfig,
    device: torch.device, seed: int,
) -> list[float]:
    """Cluster-GCN-style training: each step takes whole groups until ``batch_nodes`` nodes are
    gathered and trains on their induced subgraph (plus self loops)."""
    n = x.shape[0]
    rng = np.random.default_rng(seed)
    if groups is None:
        n_chunks = max(1, -(-n // config.batch_nodes))
        groups = rng.permutation(n) % n_chunks
    groups = np.asarray(groups, dtype=np.int64)
    if groups.shape != (n,):
        raise ValueError(f"groups must hold one label per node ({n}), got shape {groups.shape}")
    node_order = np.argsort(groups, kind="stable")
    g_sorted = groups[node_order]
    g_starts = np.flatnonzero(np.concatenate([[True], g_sorted[1:] != g_sorted[:-1]]))
    g_ends = np.concatenate([g_starts[1:], [n]])
    # Edges sorted by the destination's group, so a group's incoming edges are one slice.
    edge_order = np.argsort(groups[dst], kind="stable")
    e_src, e_dst = src[edge_order], dst[edge_order]
    e_group = groups[e_dst]
    uniq = g_sorted[g_starts]
    e_starts = np.searchsorted(e_group, uniq, side="left")
    e_ends = np.searchsorted(e_group, uniq, side="right")
    del edge_order, e_group
    local = np.full(n, -1, dtype=np.int64)
    losses = []
    model.train()
    for _ in range(config.epochs):
        perm = rng.permutation(uniq.size)
        epoch_loss, epoch_nodes = 0.0, 0
        pos = 0
        while pos < perm.size:
            picked, count = [], 0
            while pos < perm.size and (count < config.batch_nodes or not picked):
                g = perm[pos]
                picked.append(g)
                count += int(g_ends[g] - g_starts[g])
                pos += 1
            nodes = np.concatenate([node_order[g_starts[g]:g_ends[g]] for g in picked])
            local[nodes] = np.arange(nodes.size)
            es = np.concatenate([e_src[e_starts[g]:e_ends[g]] for g in picked])
            ed = np.concatenate([e_dst[e_starts[g]:e_ends[g]] for g in picked])
            inside = local[es] >= 0
            loop = np.arange(nodes.size, dtype=np.int64)
            b_src, b_dst = _sorted_by_dst(np.concatenate([local[es[inside]], loop]),
                                          np.concatenate([local[ed[inside]], loop]), nodes.size)
            local[nodes] = -1
            plan = EdgePlan.build(b_src, b_dst, nodes.size, device)
            node_t = torch.from_numpy(nodes).to(device)
            optimiser.zero_grad()
            logits, _ = model(x[node_t], plan)
            loss = F.cross_entropy(logits, y[node_t])
            loss.backward()
            optimiser.step()
            epoch_loss += float(loss.item()) * nodes.size
            epoch_nodes += nodes.size
        losses.append(epoch_loss / max(epoch_nodes, 1))
    return losses


def _sorted_by_dst(src: np.ndarray, dst: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(dst * np.int64(n) + src, kind="stable")
    return src[order], dst[order]


def _pick_mode(config: GATConfig, n_edges_with_loops: int) -> str:
    if config.train_mode not in ("auto", "full", "cluster"):
        raise ValueError(
            f"train_mode must be 'auto', 'full' or 'cluster', got {config.train_mode!r}"
        )
    if config.train_mode != "auto":
        return config.train_mode
    elems = n_edges_with_loops * config.heads * config.hidden
    return "full" if elems <= config.full_batch_max_elems else "cluster"


@contextmanager
def _torch_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    if n < 1:
        raise ValueError(f"num_threads must be >= 1 or None, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def _deterministic(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch inside a forked RNG (the caller's RNG state is restored afterwards).

    On CUDA, deterministic kernels are also required (atomic-add scatters are not). On CPU the
    ops used here are deterministic already, and torch.use_deterministic_algorithms imports
    torch._dynamo (seconds per process), so it is left alone.
    """
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if device.type != "cuda":
            yield
            return
        was_deterministic = torch.are_deterministic_algorithms_enabled()
        torch.use_deterministic_algorithms(True, warn_only=True)
        try:
            yield
        finally:
            torch.use_deterministic_algorithms(was_deterministic)


def _check_inputs(
    X: np.ndarray, y: np.ndarray, src: np.ndarray, dst: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    X = np.ascontiguousarray(X, dtype=np.float32)
    if X.ndim != 2:
        raise ValueError(f"X must be 2-D (nodes x features), got shape {X.shape}")
    n = X.shape[0]
    y = np.asarray(y)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer) or (n and y.min() < 0):
        raise ValueError("y must hold one non-negative integer class code per row of X")
    src = np.asarray(src, dtype=np.int64)
    dst = np.asarray(dst, dtype=np.int64)
    if src.shape != dst.shape or src.ndim != 1:
        raise ValueError(f"src and dst must be 1-D and equally long, got {src.shape}, {dst.shape}")
    if src.size and (min(src.min(), dst.min()) < 0 or max(src.max(), dst.max()) >= n):
        raise ValueError(f"edge endpoints must lie in [0, {n}); was the graph built on this X?")
    if np.any(src == dst):
        raise ValueError("src/dst contain self loops; train_gat adds them itself")
    return X, y.astype(np.int64), src, dst
