import numpy as np
import torch
import torch.nn.functional as F

from fastft.knn import knn_predict, knn_top1


def brute_force(train_f, train_y, query_f, num_classes, k, T):
    out = np.zeros((len(query_f), num_classes))
    for i, q in enumerate(query_f):
        sims = train_f @ q
        for j in np.argsort(-sims, kind="stable")[:k]:
            out[i, train_y[j]] += np.exp(sims[j] / T)
    return out


def test_weighted_knn_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    train_f = F.normalize(torch.randn(300, 16, generator=g, dtype=torch.float64), dim=1)
    train_y = torch.randint(0, 5, (300,), generator=g)
    query_f = F.normalize(torch.randn(70, 16, generator=g, dtype=torch.float64), dim=1)
    got = knn_predict(train_f, train_y, query_f, 5, k=20, temperature=0.07, chunk=32)  # several chunks
    want = brute_force(train_f.numpy(), train_y.numpy(), query_f.numpy(), 5, 20, 0.07)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10)


def test_knn_separates_clusters_and_k_is_capped():
    g = torch.Generator().manual_seed(1)
    centers = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    y = torch.arange(3).repeat_interleave(10)
    f = F.normalize(centers[y] + 0.05 * torch.randn(30, 8, generator=g), dim=1)
    assert knn_top1(f, y, f, y, 3, k=5) == 1.0
    # k larger than the memory bank uses all of it, weights still favour near neighbours
    assert knn_top1(f, y, f, y, 3, k=1000, temperature=0.01) == 1.0
    assert knn_top1(f, (y + 1) % 3, f, y, 3, k=5) == 0.0
