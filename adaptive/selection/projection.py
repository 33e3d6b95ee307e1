"""Fixed random low-dimensional sketch of a logits matrix (subsampled randomized Fourier transform).

For a matrix ``X`` (``T × V``, zero-padded to ``T_max`` rows) the sketch is

    P(X) = √(T_max/r₁) √(V/r₂) · R_T Re(F_T D_T (Re(F_V D_V Xᵀ))ᵀ) C_V,

``D`` a fixed random ±1 diagonal, ``F`` the unitary DFT, ``R_T``/``C_V`` fixed random choices of
``r₁`` rows and ``r₂`` columns (without replacement), flattened to ``r₁·r₂`` numbers. It is a
Johnson–Lindenstrauss-style map: distances between sketches track distances between the
matrices, and it costs two FFTs instead of a dense ``TV × r₁r₂`` matrix. This is the diversity
embedding of UDS (Zou et al., arXiv 2510.16882), which samples indices with replacement; sampling
without replacement avoids duplicated coordinates. The real part of the DFT of a real signal is
symmetric (``Re X[k] = Re X[n−k]``), so it is read from the half-spectrum ``rfft``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


class FourierSketch:
    """The fixed map above for ``T_max × V`` matrices; identical for a given seed on any device.

    Args:
        num_rows: ``T_max`` (rows after zero padding; 1 for classifier logits).
        num_columns: ``V``, the vocabulary or number of classes.
        rows: ``r₁``, rows kept (at most ``num_rows``).
        columns: ``r₂``, columns kept (at most ``num_columns``).
        seed: seed of the CPU generator that draws the signs and the kept indices.
    """

    def __init__(self, num_rows: int, num_columns: int, rows: int, columns: int, seed: int):
        self.num_rows, self.num_columns = num_rows, num_columns
        self.rows, self.columns = min(rows, num_rows), min(columns, num_columns)
        gen = torch.Generator().manual_seed(seed)
        # the map's parameters (public so that it can be written out densely, e.g. in tests)
        self.column_signs = torch.randint(0, 2, (num_columns,), generator=gen).float() * 2 - 1
        self.row_signs = torch.randint(0, 2, (num_rows,), generator=gen).float() * 2 - 1
        self.column_frequencies = torch.randperm(num_columns, generator=gen)[: self.columns]
        self.row_frequencies = torch.randperm(num_rows, generator=gen)[: self.rows]
        # index into the half spectrum: Re X[k] = Re X[n - k] for real input
        self._cols = torch.minimum(self.column_frequencies, num_columns - self.column_frequencies)
        self._rws = torch.minimum(self.row_frequencies, num_rows - self.row_frequencies)
        self._col_signs, self._row_signs = self.column_signs, self.row_signs
        self.scale = math.sqrt(num_rows / self.rows) * math.sqrt(num_columns / self.columns)
        self._device: torch.device | None = None

    @property
    def dim(self) -> int:
        return self.rows * self.columns

    def _to(self, device: torch.device) -> None:
        if self._device != device:
            for name in ("_col_signs", "_row_signs", "_cols", "_rws"):
                setattr(self, name, getattr(self, name).to(device))
            self._device = device

    def __call__(self, matrices: Tensor) -> Tensor:
        """``(b, T, V)`` float matrices (``T ≤ T_max``) → ``(b, r₁·r₂)`` sketches."""
        b, t, v = matrices.shape
        if v != self.num_columns or t > self.num_rows:
            raise ValueError(
                f"the sketch was built for at most {self.num_rows} rows × {self.num_columns} "
                f"columns, got a batch of {t} × {v} matrices"
            )
        self._to(matrices.device)
        x = torch.fft.rfft(matrices * self._col_signs, dim=-1, norm="ortho").real
        x = x.index_select(-1, self._cols)  # (b, t, r2)
        if t < self.num_rows:
            x = torch.nn.functional.pad(x, (0, 0, 0, self.num_rows - t))
        x = x * self._row_signs.unsqueeze(-1)
        x = torch.fft.rfft(x, dim=-2, norm="ortho").real.index_select(-2, self._rws)
        return (x * self.scale).reshape(b, -1)
