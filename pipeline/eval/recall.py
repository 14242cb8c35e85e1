"""MQAR-style associative recall (multi-query associative recall, as in the Zoology / xLSTM papers),
zero-shot: a probe of what the recurrent memory holds, not a trained skill.

A sequence is `<eos> k1 v1 k2 v2 ... kn vn  kq1 vq1 kq2 vq2 ...`: n key-value pairs of random
tokens (keys and values from disjoint random sets of ordinary vocabulary pieces, all keys distinct),
then queries: keys from the pairs in random order, each followed by its value (teacher forcing).
At each query key the model should predict the value that followed that key earlier.

- `acc`: the correct value has the highest logit among the n values of the sequence (chance 1/n);
- `acc_vocab`: the correct value is the argmax over the whole vocabulary (chance about 0);
- by distance: tokens between the query and the pair it asks about, in power-of-two buckets.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from xlp.pipeline.eval.common import finite


def _pools(vocab: int, rng: np.random.Generator, first_id: int) -> tuple[np.ndarray, np.ndarray]:
    ids = rng.permutation(np.arange(first_id, vocab))
    half = len(ids) // 2
    return ids[:half], ids[half:2 * half]


def _distance_edges(max_dist: int) -> list[int]:
    edges, b = [0], 2
    while b <= max_dist:
        edges.append(b)
        b *= 2
    return edges


@torch.no_grad()
def recall_probe(model, *, pairs: list[int], queries: int, trials: int, batch_size: int, vocab_size: int,
                 eos_id: int, device: torch.device, seed: int = 0, first_id: int = 4, log=print) -> dict:
    """vocab_size: the tokenizer's (ids the model saw); first_id: lowest id used (past the specials;
    the stage passes 260 to skip SentencePiece's 256 byte-fallback pieces too when there is room)."""
    rng = np.random.default_rng(seed)
    key_pool, val_pool = _pools(vocab_size, rng, first_id)
    results = []
    for n in pairs:
        if n > len(key_pool):
            results.append({"pairs": n, "skipped": f"needs {2 * n} distinct token ids, the vocabulary has {2 * len(key_pool)}"})
            continue
        q = min(queries, n)
        L = 1 + 2 * n + 2 * q
        seqs = np.empty((trials, L), dtype=np.int64)
        values = np.empty((trials, n), dtype=np.int64)
        qpos = np.empty((trials, q), dtype=np.int64)  # position of each query key in the sequence
        qidx = np.empty((trials, q), dtype=np.int64)  # which pair it asks about
        for t in range(trials):
            keys = rng.choice(key_pool, size=n, replace=False)
            vals = rng.choice(val_pool, size=n, replace=False)
            which = rng.choice(n, size=q, replace=False)
            seq = [eos_id]
            for k, v in zip(keys, vals):
                seq += [k, v]
            for j, w in enumerate(which):
                qpos[t, j] = len(seq)
                seq += [keys[w], vals[w]]
            seqs[t] = seq
            values[t] = vals
            qidx[t] = which
        # distance from the query key back to the key of its pair (at 1 + 2 * index)
        dist = qpos - (1 + 2 * qidx)
        correct = np.zeros((trials, q), dtype=bool)
        correct_vocab = np.zeros((trials, q), dtype=bool)
        t0 = time.perf_counter()
        for s in range(0, trials, batch_size):
            x = torch.from_numpy(seqs[s:s + batch_size, :-1]).to(device)
            d = torch.zeros_like(x, dtype=torch.bool)
            d[:, :2] = True  # <eos> then a document starting at the first key (training semantics)
            logits = model(x, doc_starts=d).float()
            for b in range(x.shape[0]):
                t = s + b
                lq = logits[b, torch.from_numpy(qpos[t]).to(device)]  # (q, V)
                target = torch.from_numpy(values[t, qidx[t]]).to(device)
                cand = torch.from_numpy(values[t]).to(device)
                pick = lq[:, cand].argmax(-1)
                correct[t] = (cand[pick] == target).cpu().numpy()
                correct_vocab[t] = (lq.argmax(-1) == target).cpu().numpy()
        edges = _distance_edges(int(dist.max()))
        by_dist = []
        for i, lo in enumerate(edges):
            hi = edges[i + 1] if i + 1 < len(edges) else int(dist.max()) + 1
            m = (dist >= lo) & (dist < hi)
            if m.any():
                by_dist.append({"lo": int(lo), "hi": int(hi), "queries": int(m.sum()),
                                "acc": finite(correct[m].mean())})
        res = {"pairs": n, "queries_per_seq": q, "trials": trials, "seq_len": L,
               "acc": finite(correct.mean()), "acc_vocab": finite(correct_vocab.mean()), "chance": 1.0 / n,
               "by_distance": by_dist, "seconds": round(time.perf_counter() - t0, 2)}
        results.append(res)
        log(f"eval recall: {n} pairs: acc {res['acc']:.3f} (chance {1 / n:.3f}), vocab-argmax acc {res['acc_vocab']:.3f}")
    return {"results": results}
