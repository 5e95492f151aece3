"""A standard paper ECG drawn with tensor ops on the signal's device, so an image model trains from signal shards.

The page is the usual 12-lead print: three rows of four 2.5-s panels (I, aVR, V1, V4 / II, aVL, V2, V5 /
III, aVF, V3, V6) and a 10-s lead II rhythm strip, at 25 mm/s and 10 mm/mV, on an optional 1-mm/5-mm grid. Each
panel shows its lead at the time it was recorded (column k holds 2.5k..2.5k + 2.5 s), as printers do. There is no
calibration pulse and no lead label (text is not a tensor op): a panel's place names its lead.

Rasterising: for every pixel column the trace's vertical extent is the min and max of the piecewise-linear
signal over that column (the samples inside it and the interpolated values at its two edges, found with one
``scatter_reduce``); a pixel is inked by its distance to that extent, anti-aliased over one pixel. No Python loop
runs over samples or panels, so a batch renders in a few tensor ops on the GPU or CPU. Traces are clipped to their
row's band. The ink is a piecewise-linear function of the samples, so gradients reach the signal where a trace
is drawn (an extent's min/max picks one sample per column).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ecgfm.leads import STANDARD_FS, STANDARD_LEADS

__all__ = ["LAYOUT", "RHYTHM_LEAD", "PaperECG"]

#: The 3 x 4 panel layout (rows top to bottom, columns left to right), lead names as in ``STANDARD_LEADS``.
LAYOUT: tuple[tuple[str, ...], ...] = (("I", "aVR", "V1", "V4"), ("II", "aVL", "V2", "V5"), ("III", "aVF", "V3", "V6"))
#: The lead of the 10-s rhythm strip under the panels.
RHYTHM_LEAD = "II"
_EMPTY = 1e6  # the extent of a pixel column with no trace: [+_EMPTY, -_EMPTY] inks nothing


class PaperECG(nn.Module):
    """[B, 12, T] millivolts (standard lead order, ``fs`` Hz) -> [B, 3, H, W] page in [0, 1] (white paper).

    Args:
        pixels_per_mm: resolution; 4 gives a 1040 x 520 page, 2 gives 520 x 260.
        grid: draw the 1-mm (light) and 5-mm (darker) pink grid; a constant buffer under the traces.
        row_mm: height of each of the four row bands (the traces are clipped to their band).
        baseline: where a row's 0 mV lies, as a fraction of the band height from its top (room for tall R waves).
        line_width_mm: trace width (at least one pixel).
        margin_mm: white border around the grid.
        fs: sampling rate of the input.
        seconds: length of the page (the rhythm strip); a shorter input leaves the rest of the page empty.
    """

    def __init__(
        self,
        pixels_per_mm: float = 2.0,
        grid: bool = True,
        row_mm: float = 30.0,
        baseline: float = 0.6,
        line_width_mm: float = 0.3,
        margin_mm: float = 5.0,
        fs: float = STANDARD_FS,
        seconds: float = 10.0,
    ) -> None:
        super().__init__()
        if pixels_per_mm <= 0 or row_mm <= 0 or fs <= 0 or seconds <= 0 or not 0 < baseline < 1:
            raise ValueError(
                f"PaperECG needs positive pixels_per_mm, row_mm, fs, seconds and 0 < baseline < 1, got "
                f"{pixels_per_mm}, {row_mm}, {fs}, {seconds}, {baseline}"
            )
        self.pixels_per_mm = float(pixels_per_mm)
        self.grid = bool(grid)
        self.row_mm = float(row_mm)
        self.baseline = float(baseline)
        self.line_width_mm = float(line_width_mm)
        self.margin_mm = float(margin_mm)
        self.fs = float(fs)
        self.seconds = float(seconds)
        self.mm_per_s = 25.0
        self.mm_per_mv = 10.0
        self.panel_s = self.seconds / 4
        ppm = self.pixels_per_mm
        self.margin_px = round(margin_mm * ppm)
        self.band_px = round(row_mm * ppm)
        self.height = 2 * self.margin_px + 4 * self.band_px
        self.width = 2 * self.margin_px + round(self.seconds * self.mm_per_s * ppm)
        self.half_width_px = max(line_width_mm * ppm, 1.0) / 2
        index = {lead: i for i, lead in enumerate(STANDARD_LEADS)}
        # lead drawn by (row, column): 3 rows x 4 panels, then the rhythm strip (one lead over every column)
        leads = [[index[lead] for lead in row] for row in LAYOUT] + [[index[RHYTHM_LEAD]] * 4]
        self.register_buffer("panel_leads", torch.tensor(leads), persistent=False)
        self.register_buffer("paper", self._paper(), persistent=False)

    def extra_repr(self) -> str:
        return f"{self.width}x{self.height} px, {self.pixels_per_mm:g} px/mm, grid={self.grid}"

    @property
    def image_size(self) -> tuple[int, int]:
        """``(H, W)`` in pixels."""
        return self.height, self.width

    def _paper(self) -> Tensor:
        """[3, H, W] paper: white, with a pink line on the pixel each mm (darker each 5 mm) inside the margins."""
        paper = torch.ones(3, self.height, self.width)
        if not self.grid:
            return paper
        m = self.margin_px
        lines = []
        for n_mm, size in ((round(self.seconds * self.mm_per_s), self.width), (round(4 * self.row_mm), self.height)):
            k = torch.arange(n_mm + 1)
            pos = (m + k * self.pixels_per_mm).floor().long().clamp(max=size - 1)
            strength = torch.where(k % 5 == 0, 0.45, 0.18)
            lines.append(torch.zeros(size).scatter_reduce(0, pos, strength, "amax"))
        inside = torch.zeros(self.height, self.width)
        inside[m : self.height - m, m : self.width - m] = 1
        shade = torch.maximum(lines[0][None, :], lines[1][:, None]) * inside
        paper[1:] -= shade  # pink: red stays, green and blue darken
        return paper

    def _panel_of_time(self, t: Tensor, rhythm: bool) -> Tensor:
        """Panel (column) index of times ``t`` in seconds; -1 outside the recording."""
        if rhythm:
            return torch.zeros_like(t, dtype=torch.long)
        return (t / self.panel_s).floor().clamp(0, 3).long()

    def traces(self, x: Tensor) -> Tensor:
        """[B, 12, T] mV -> [B, H, W] ink in [0, 1] (1 = trace)."""
        if x.dim() != 3 or x.shape[1] != len(STANDARD_LEADS):
            raise ValueError(f"PaperECG draws [batch, 12 leads, samples] in mV, got shape {tuple(x.shape)}")
        B, _, T = x.shape
        device, ppm = x.device, self.pixels_per_mm
        x = x.float()
        W, m, band = self.width, self.margin_px, self.band_px
        px_per_s = self.mm_per_s * ppm

        # 4 row signals [B, 4, T]: each row's lead switches at the panel boundaries (the rhythm row never does)
        t = torch.arange(T, device=device, dtype=torch.float32) / self.fs
        sample_panel = torch.stack([self._panel_of_time(t, rhythm=r == 3) for r in range(4)])  # [4, T]
        lead = self.panel_leads.gather(1, sample_panel)  # [4, T]
        rows = x.gather(1, lead.unsqueeze(0).expand(B, 4, T))
        baseline = (m + (torch.arange(4, device=device) + self.baseline) * band).float()  # [4]
        y = baseline[None, :, None] - rows * (self.mm_per_mv * ppm)  # pixel rows, down the page

        # the panel each pixel column shows (by its centre time); -1 outside the recording
        col = torch.arange(W, device=device, dtype=torch.float32)
        col_t = (col + 0.5 - m) / px_per_s
        in_time = (col_t >= 0) & (col_t <= (T - 1) / self.fs)
        col_panel = torch.stack([self._panel_of_time(col_t, rhythm=r == 3) for r in range(4)])
        col_panel = torch.where(in_time, col_panel, -1)  # [4, W]

        # samples: each lands in one pixel column; it counts there if the column shows its panel
        sample_col = (m + t * px_per_s).floor().long()  # [T]
        keep = (sample_col >= 0) & (sample_col < W)
        sample_col = sample_col.clamp(0, W - 1)
        own = keep & (col_panel[:, sample_col] == sample_panel)  # [4, T]
        index = sample_col.expand(B, 4, T)
        lo_vals = torch.where(own, y, _EMPTY)
        hi_vals = torch.where(own, y, -_EMPTY)
        lo = torch.full((B, 4, W), _EMPTY, device=device).scatter_reduce(2, index, lo_vals, "amin")
        hi = torch.full((B, 4, W), -_EMPTY, device=device).scatter_reduce(2, index, hi_vals, "amax")

        # column edges: the line's value where it crosses them, unless that segment joins two panels
        edge = torch.arange(W + 1, device=device, dtype=torch.float32)
        u = (edge - m) / px_per_s * self.fs  # fractional sample index at each edge
        s0 = u.floor().clamp(0, max(T - 2, 0)).long()
        s1 = (s0 + 1).clamp(max=T - 1)
        frac = (u - s0).clamp(0, 1)
        edge_val = y[..., s0] * (1 - frac) + y[..., s1] * frac  # [B, 4, W + 1]
        p0, p1 = sample_panel[:, s0], sample_panel[:, s1]
        edge_panel = torch.where((p0 == p1) | (frac == 0), p0, -2)
        edge_panel = torch.where((u >= 0) & (u <= T - 1), edge_panel, -2)  # [4, W + 1]
        for side in (slice(0, W), slice(1, W + 1)):  # left and right edge of each column
            use = edge_panel[:, side] == col_panel
            lo = torch.minimum(lo, torch.where(use, edge_val[..., side], _EMPTY))
            hi = torch.maximum(hi, torch.where(use, edge_val[..., side], -_EMPTY))

        # ink each band's pixels by their distance to the column's extent (clipped to the band)
        centre = (torch.arange(band, device=device, dtype=torch.float32) + 0.5)[:, None] + (
            m + torch.arange(4, device=device) * band
        )[:, None, None].float()  # [4, band, 1]
        distance = (lo.unsqueeze(2) - centre).clamp(min=0) + (centre - hi.unsqueeze(2)).clamp(min=0)
        ink = (self.half_width_px + 0.5 - distance).clamp(0, 1)  # [B, 4, band, W]
        ink = ink.reshape(B, 4 * band, W)
        return nn.functional.pad(ink, (0, 0, m, self.height - m - 4 * band))

    def forward(self, x: Tensor) -> Tensor:
        """[B, 12, T] mV -> [B, 3, H, W]: black traces on the (grid) paper."""
        ink = self.traces(x)
        return self.paper.to(ink.dtype) * (1 - ink.unsqueeze(1))
