"""Text labels for the points of a figure, placed so that no two overlap.

`place_labels` tries spots around each point, nearest first and on the side the caller prefers (e.g. away
from a diagonal), and keeps the first whose text box, as the renderer measures it
(`Text.get_window_extent`), stays inside the axes and overlaps no label placed before it and no box to
avoid (captions); when it can, it also keeps off the other points, and its leader line (drawn when the
label sits away from its point) off the other labels. A label that finds no free spot is left out, so
that the others stay readable.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backend_bases import RendererBase
from matplotlib.text import Annotation, Text
from matplotlib.transforms import Bbox

log = logging.getLogger(__name__)

LABEL_GID = "point-label"  # the gid of every placed label: tests and callers find them by it
RADII = (6, 16, 28, 42, 58, 76, 96, 120)  # distances tried from a point to its label's anchor, in points
ANGLES = range(0, 360, 15)  # directions tried, in degrees
PAD = 2.0  # pixels kept free around each label


@dataclass(frozen=True)
class Label:
    """One label to place: the point it names (data coordinates), its text and colour, and the direction
    (dx, dy, any length) in which it should preferably sit."""

    x: float
    y: float
    text: str
    colour: str
    away: tuple[float, float] = (1.0, 1.0)


def text_box(text: Text, renderer: RendererBase) -> Bbox:
    """The box of the text alone (an annotation's leader line left out), in display pixels."""
    if isinstance(text, Annotation):
        text.update_positions(renderer)
    return Text.get_window_extent(text, renderer)


HAlign = Literal["left", "center", "right"]
VAlign = Literal["bottom", "center", "top"]


def _alignment(dx: float, dy: float) -> tuple[HAlign, VAlign]:
    """The text's corner or edge nearest to its point, so that it grows away from the point."""
    ha: HAlign = "left" if dx > 0.3 else "right" if dx < -0.3 else "center"
    va: VAlign = "bottom" if dy > 0.3 else "top" if dy < -0.3 else "center"
    return ha, va


def offsets(away: tuple[float, float]) -> list[tuple[float, float, HAlign, VAlign]]:
    """Every (dx, dy in points, ha, va) to try, nearest first, then closest in angle to `away`."""
    preferred = math.atan2(away[1], away[0])
    angles = sorted(ANGLES, key=lambda a: abs(math.remainder(math.radians(a) - preferred, math.tau)))
    out = []
    for r in RADII:
        for a in angles:
            dx, dy = math.cos(math.radians(a)), math.sin(math.radians(a))
            out.append((r * dx, r * dy, *_alignment(dx, dy)))
    return out


def _inside(box: Bbox, area: Bbox) -> bool:
    return box.x0 >= area.x0 and box.y0 >= area.y0 and box.x1 <= area.x1 and box.y1 <= area.y1


def covers(box: Bbox, dots: np.ndarray) -> bool:
    """Whether `box` holds any of `dots` ((N, 2) display pixels)."""
    if dots.size == 0:
        return False
    x, y = dots[:, 0], dots[:, 1]
    return bool(np.any((x >= box.x0) & (x <= box.x1) & (y >= box.y0) & (y <= box.y1)))


def _crosses(start: np.ndarray, end: np.ndarray, boxes: list[Bbox], samples: int = 12) -> bool:
    """Whether the segment from `start` to `end` (display pixels) runs through any of `boxes`."""
    points = start + np.linspace(0.0, 1.0, samples)[:, None] * (end - start)
    return any(covers(box, points) for box in boxes)


@dataclass
class _Room:
    """What a new label must keep clear of: the axes' edges, the boxes taken so far, the data points."""

    renderer: RendererBase
    area: Bbox
    taken: list[Bbox]
    dots: np.ndarray

    def spot(self, ann: Annotation, point: np.ndarray, away: tuple[float, float]) -> Bbox | None:
        """Move `ann` (its point at `point`, display pixels) to the first free spot and return its padded box;
        None when every spot is taken. The first pass also keeps the label off the other points and its
        leader line off the other labels, the second only its leader line."""
        px = self.renderer.points_to_pixels(1.0)
        for strictness in (2, 1, 0):
            for dx, dy, ha, va in offsets(away):
                ann.xyann = (dx, dy)
                ann.set_horizontalalignment(ha)
                ann.set_verticalalignment(va)
                box = text_box(ann, self.renderer).padded(PAD)
                if not _inside(box, self.area) or any(box.overlaps(t) for t in self.taken):
                    continue
                if strictness >= 1 and _crosses(point, point + px * np.array([dx, dy]), self.taken):
                    continue
                if strictness == 2 and covers(box, self.dots):
                    continue
                return box
        return None


def place_labels(
    ax: Axes,
    renderer: RendererBase,
    labels: Sequence[Label],
    avoid: Sequence[Bbox] = (),
    dots: np.ndarray | None = None,
    fontsize: float = 8,
) -> list[Annotation]:
    """Annotate `ax` with `labels`, in their order (the most important first), none overlapping another or
    `avoid` (display pixels); `dots` ((N, 2) display pixels) are the points to keep uncovered if possible.
    The figure's layout must be final (drawn once) before this is called."""
    points = np.empty((0, 2)) if dots is None else np.asarray(dots, dtype=float).reshape(-1, 2)
    room = _Room(renderer, ax.get_window_extent(renderer), list(avoid), points)
    placed = []
    for lab in labels:
        ann = ax.annotate(
            lab.text,
            (lab.x, lab.y),
            xytext=(0, 0),
            textcoords="offset points",
            fontsize=fontsize,
            color=lab.colour,
            gid=LABEL_GID,
            annotation_clip=False,
            arrowprops={"arrowstyle": "-", "color": lab.colour, "lw": 0.6, "alpha": 0.7, "shrinkA": 1, "shrinkB": 2},
        )
        box = room.spot(ann, ax.transData.transform((lab.x, lab.y)), lab.away)
        if box is None:
            ann.remove()
            log.debug("no free spot for the label %r at (%.3f, %.3f): left out", lab.text, lab.x, lab.y)
            continue
        if math.hypot(*ann.xyann) <= RADII[0] and ann.arrow_patch is not None:
            ann.arrow_patch.set_visible(False)  # next to its point: no leader line needed
        room.taken.append(box)
        placed.append(ann)
    return placed
