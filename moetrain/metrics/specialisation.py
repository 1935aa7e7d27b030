"""Expert specialisation by data source: how much the routing depends on where a token came from.

Input: `counts_SE[s, e]`, the number of top-k assignments that tokens of source `s` made to
expert `e` (one MoE layer). With P(s, e) = counts / total:

    P(e | s) = counts[s, e] / sum_e counts[s, e]        per-source expert distribution
    P(e)     = sum_s counts[s, e] / total               global expert distribution
    MI       = sum_s P(s) KL(P(e | s) || P(e))          mutual information of source and expert (nats)

With the same number of tokens per source P(s) is uniform and MI is the plain mean over sources
of the KL. MI = 0 when every source routes like the whole corpus; its maximum is
min(log S, H(P(e))). `max_share` = mean over sources of max_e P(e | s) (1/E for a uniform
router with k = 1; with top-k, P(e | s) counts assignments, so a source that always uses the
same k experts has max share 1/k).
"""

from __future__ import annotations

import numpy as np


def _as_counts(counts_SE) -> np.ndarray:
    c = np.asarray(counts_SE, dtype=np.float64)
    if c.ndim != 2 or (c < 0).any() or (c.sum(1) <= 0).any():
        raise ValueError("counts_SE must be [sources, experts], non-negative, every row non-empty")
    return c


def kl_divergence(p, q) -> float:
    """KL(p || q) in nats for distributions p, q (0 log 0 = 0; q must cover p's support)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    nz = p > 0
    if (q[nz] <= 0).any():
        return float("inf")
    return float(np.sum(p[nz] * np.log(p[nz] / q[nz])))


def expert_distributions(counts_SE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(P(e | s) [S, E], P(e) [E], P(s) [S])."""
    c = _as_counts(counts_SE)
    total = c.sum()
    return c / c.sum(1, keepdims=True), c.sum(0) / total, c.sum(1) / total


def per_source_kl(counts_SE) -> np.ndarray:
    """KL(P(e | s) || P(e)) for every source s, [S]."""
    p_es, p_e, _ = expert_distributions(counts_SE)
    return np.array([kl_divergence(row, p_e) for row in p_es])


def mutual_information(counts_SE) -> float:
    """I(source; expert) = sum_s P(s) KL(P(e | s) || P(e)), nats."""
    _, _, p_s = expert_distributions(counts_SE)
    return float(np.dot(p_s, per_source_kl(counts_SE)))


def mean_max_share(counts_SE) -> float:
    """Mean over sources of the largest expert share max_e P(e | s)."""
    p_es, _, _ = expert_distributions(counts_SE)
    return float(p_es.max(1).mean())


def entropy(p) -> float:
    p = np.asarray(p, dtype=np.float64)
    nz = p > 0
    return float(-np.sum(p[nz] * np.log(p[nz])))


def specialisation_summary(counts_SE) -> dict:
    """The measures above for one layer, plus H(P(e)) and MI / H(P(e)) (0..1)."""
    p_es, p_e, _ = expert_distributions(counts_SE)
    mi = mutual_information(counts_SE)
    h_e = entropy(p_e)
    return {
        "mutual_information": mi,
        "mi_over_h_expert": mi / h_e if h_e > 0 else 0.0,
        "mean_max_share": mean_max_share(counts_SE),
        "h_expert": h_e,
        "per_source_kl": per_source_kl(counts_SE).tolist(),
        "p_expert": p_e.tolist(),
    }
