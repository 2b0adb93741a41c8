"""An exact item-vector index: one dense matrix, top-K by batched matrix product.

Rows are unit item vectors from the item tower; a user's scores over the whole catalogue
are one ``[B, d] × [d, N]`` product followed by ``topk``. Exact search is the right call
up to a few million items on a GPU (a 1 M × 128 fp16 matrix is 256 MB and a batch of
1,000 users scores it in a few ms) and ~100 k items on a CPU; beyond that an ANN index
would take this class's place behind the same two methods.

Memory per item: ``embed_dim × 2`` bytes on CUDA (fp16 storage, fp32 accumulation) or
``embed_dim × 4`` bytes on CPU (fp32), plus ≈ 100 bytes for the id maps — 512 B/item
at the default ``embed_dim = 128`` on CPU. The matrix grows by doubling (amortised O(1)
appends) and rows are updated in place, so new catalogue items are searchable at once.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class ItemIndex:
    """``item_id → row`` plus the matrix of unit vectors, and optionally a second matrix
    that search reads: the item side of the retrieval score with each item's id memory
    (``normalise(v + e)``; :attr:`search_matrix`). The outcome head reads :attr:`matrix`.

    >>> idx = ItemIndex(dim=2)
    >>> idx.upsert(["a", "b", "c"], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]))
    >>> idx.search(torch.tensor([[1.0, 0.1]]), k=2)[1]
    [['a', 'c']]
    >>> idx.search(torch.tensor([[1.0, 0.1]]), k=2, exclude=[{"a"}])[1]
    [['c', 'b']]
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu",
                 dtype: torch.dtype | None = None, capacity: int = 1024) -> None:
        self.dim = dim
        self.device = torch.device(device)
        self.dtype = dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self._matrix = torch.zeros(capacity, dim, device=self.device, dtype=self.dtype)
        self._search: torch.Tensor | None = None  # rows with id memory, once any has one
        self._ids: list[str] = []
        self._row: dict[str, int] = {}
        self.version = ""  # the model version whose item tower produced the rows

    def __len__(self) -> int:
        return len(self._ids)

    def __contains__(self, item_id: object) -> bool:
        return item_id in self._row

    @property
    def ids(self) -> list[str]:
        return list(self._ids)

    @property
    def memory_bytes(self) -> int:
        search = 0 if self._search is None else self._search.numel() * self._search.element_size()
        return self._matrix.numel() * self._matrix.element_size() + search + 100 * len(self._ids)

    @property
    def search_matrix(self) -> torch.Tensor:
        """What search scores against ``[N, d]``: the rows with their id memory where any
        item has one, else the rows themselves (a view)."""
        source = self._matrix if self._search is None else self._search
        return source[: len(self._ids)]

    @property
    def matrix(self) -> torch.Tensor:
        """The live rows ``[N, d]`` (a view)."""
        return self._matrix[: len(self._ids)]

    def row(self, item_id: str) -> int | None:
        return self._row.get(item_id)

    def rows_of(self, item_ids: Sequence[str]) -> np.ndarray:
        """Rows of ``item_ids`` (int64), −1 for an item the index does not hold.

        >>> idx = ItemIndex(dim=2)
        >>> idx.upsert(["a", "b"], torch.eye(2))
        >>> idx.rows_of(["b", "x", "a"]).tolist()
        [1, -1, 0]
        """
        get = self._row.get
        return np.fromiter((get(i, -1) for i in item_ids), dtype=np.int64,
                           count=len(item_ids))

    def vectors(self, item_ids: Sequence[str]) -> torch.Tensor:
        rows = torch.tensor([self._row[i] for i in item_ids], device=self.device,
                            dtype=torch.long)
        return self._matrix[rows].float()

    def upsert(self, item_ids: Sequence[str], vectors: torch.Tensor,
               search: torch.Tensor | None = None) -> None:
        """Insert new items and overwrite known ones; ``search`` (``[N, d]``) are the rows
        search reads for them (their vectors with id memory), if not the vectors.

        >>> idx = ItemIndex(dim=2)
        >>> idx.upsert(["a", "b"], torch.eye(2), search=torch.tensor([[1.0, 0.0], [0.8, 0.6]]))
        >>> idx.search(torch.tensor([[1.0, 0.5]]), k=1)[1], idx.vectors(["b"]).tolist()
        ([['b']], [[0.0, 1.0]])
        """
        if len(item_ids) != vectors.shape[0] or vectors.shape[1] != self.dim:
            raise ValueError("need one dim-sized vector per item id")
        rows: list[int] = []
        for item in item_ids:
            r = self._row.get(item)
            if r is None:
                r = len(self._ids)
                self._ids.append(item)
                self._row[item] = r
            rows.append(r)
        if len(self._ids) > self._matrix.shape[0]:
            size = max(2 * self._matrix.shape[0], len(self._ids))
            self._matrix = self._grown(self._matrix, size)
            if self._search is not None:
                self._search = self._grown(self._search, size)
        at = torch.tensor(rows, device=self.device, dtype=torch.long)
        self._matrix[at] = vectors.to(self.device, self.dtype)
        if search is not None and self._search is None:
            self._search = self._matrix.clone()
        if self._search is not None:
            self._search[at] = (vectors if search is None else search).to(self.device,
                                                                           self.dtype)

    def _grown(self, matrix: torch.Tensor, size: int) -> torch.Tensor:
        grown = torch.zeros(size, self.dim, device=self.device, dtype=self.dtype)
        grown[: matrix.shape[0]] = matrix
        return grown

    def remove(self, item_ids: Sequence[str]) -> int:
        """Take items out of the index (a catalogue tombstone); returns how many were in it.
        Each removed row is filled with the last one, so rows stay contiguous.

        >>> idx = ItemIndex(dim=2)
        >>> idx.upsert(["a", "b", "c"], torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]]))
        >>> idx.remove(["a", "zz"]), idx.ids, idx.search(torch.tensor([[1.0, 0.1]]), k=3)[1]
        (1, ['c', 'b'], [['c', 'b']])
        """
        removed = 0
        for item in item_ids:
            row = self._row.pop(item, None)
            if row is None:
                continue
            last = len(self._ids) - 1
            if row != last:
                moved = self._ids[last]
                self._matrix[row] = self._matrix[last]
                if self._search is not None:
                    self._search[row] = self._search[last]
                self._ids[row] = moved
                self._row[moved] = row
            self._ids.pop()
            removed += 1
        return removed

    def replace_all(self, item_ids: Sequence[str], vectors: torch.Tensor, version: str,
                    search: torch.Tensor | None = None) -> None:
        """Swap in a fully recomputed matrix (after a promotion) in one assignment, so a
        concurrent reader sees the old index or the new one."""
        fresh = ItemIndex(self.dim, self.device, self.dtype, capacity=max(len(item_ids), 1))
        fresh.upsert(item_ids, vectors, search)
        self._matrix, self._search, self._ids, self._row = (fresh._matrix, fresh._search,
                                                            fresh._ids, fresh._row)
        self.version = version

    @torch.inference_mode()
    def scores(self, users: torch.Tensor, memory: bool = True) -> torch.Tensor:
        """``[B, N]`` inner products of user vectors with every item (fp32), with the items'
        id memory (``memory=False``: the text rows alone, e.g. for a query's text)."""
        u = users.to(self.device, self.dtype)
        return (u @ (self.search_matrix if memory else self.matrix).T).float()

    @torch.inference_mode()
    def search_rows(self, users: torch.Tensor, k: int,
                    exclude: Sequence[set[str]] | None = None,
                    limit: Sequence[int] | None = None, memory: bool = True
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``k`` rows per user: scores ``[B, k']`` (−inf where fewer than k' items
        were eligible) and row indices ``[B, k']`` into :attr:`matrix`. ``limit[b]``
        makes only rows ``< limit[b]`` eligible for user b (see :meth:`_masked_scores`).

        >>> idx = ItemIndex(dim=2)
        >>> idx.upsert(["a", "b", "c"], torch.tensor([[0.0, 1.0], [0.7, 0.7], [1.0, 0.0]]))
        >>> vals, rows = idx.search_rows(torch.tensor([[1.0, 0.0]]), k=3, limit=[2])
        >>> [idx.id_of(r) for r, v in zip(rows[0].tolist(), vals[0].tolist()) if v > -1e9]
        ['b', 'a']
        """
        top = torch.topk(self._masked_scores(users, exclude, limit=limit, memory=memory),
                         min(k, len(self._ids)), dim=1)
        return top.values, top.indices

    def _masked_scores(self, users: torch.Tensor, exclude: Sequence[set[str]] | None,
                       bias: torch.Tensor | None = None,
                       limit: Sequence[int] | None = None, memory: bool = True
                       ) -> torch.Tensor:
        """Scores ``[B, N]`` (+ ``bias``), −inf on each user's excluded items and, with
        ``limit``, on every row ``≥ limit[b]`` (rows are in insertion order, so a caller
        that inserts items in the order they became known masks the ones not yet known:
        the leak-free evaluation)."""
        s = self.scores(users, memory)
        if bias is not None:
            s = s + bias.to(s)
        if exclude:
            for b, items in enumerate(exclude):
                rows = [self._row[i] for i in items if i in self._row]
                if rows:
                    s[b, rows] = float("-inf")
        if limit is not None:
            cols = torch.arange(s.shape[1], device=s.device)
            bound = torch.as_tensor(list(limit), device=s.device, dtype=torch.long)
            s = s.masked_fill(cols[None, :] >= bound[:, None], float("-inf"))
        return s

    def id_of(self, row: int) -> str:
        return self._ids[row]

    @torch.inference_mode()
    def search(self, users: torch.Tensor, k: int,
               exclude: Sequence[set[str]] | None = None,
               bias: torch.Tensor | None = None) -> tuple[torch.Tensor, list[list[str]]]:
        """Top-``k`` items per user: scores ``[B, k']`` and ids (``k' ≤ k``).

        ``exclude[b]`` removes items from user b's results; ``bias`` (``[N]``) is added
        to every row's scores first (e.g. a popularity correction).
        """
        n = len(self._ids)
        if n == 0 or users.shape[0] == 0:
            return torch.empty(users.shape[0], 0), [[] for _ in range(users.shape[0])]
        top = torch.topk(self._masked_scores(users, exclude, bias), min(k, n), dim=1)
        vals = top.values.cpu()
        idx = top.indices.cpu().tolist()
        ids = [[self._ids[j] for j, v in zip(row, vrow, strict=True) if v != float("-inf")]
               for row, vrow in zip(idx, vals.tolist(), strict=True)]
        return vals, ids
