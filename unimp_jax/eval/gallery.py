"""A picture of what the recommender did: one row per user, history on the left, recommendations on the right.

    write_gallery('out/gallery.png', rows, dataset)   # also writes out/gallery.html

Each row is {'title': str, 'history': [item id], 'recommended': [(item id, score)], 'target': item id | None}.
History pictures come first, oldest on the left; after a separator come the recommended items in rank
order, each captioned with its rank and score; the true target, when it was recommended, is outlined in
green. Items without a picture (MovieLens) are a grey box holding their title. The HTML file next to the
PNG shows it and lists every item's title, so the gallery reads without the pictures.

The figure is laid out in inches by `figure_inches`, not by matplotlib's tight layout, so its size is a
known function of the row and column counts. Both files are written to a temporary name and renamed into
place, so a reader never sees half a gallery.
"""

from __future__ import annotations

import html
import os
import tempfile
import textwrap
from collections.abc import Sequence

import numpy as np
from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

DPI = 100
CELL = 1.2               # inches: one picture (square)
GAP = 0.1                # inches between pictures
SEPARATOR = 0.4          # inches between history and recommendations
MARGIN = 0.2             # inches around the figure
ROW_TITLE = 0.3          # inches above each row's pictures
CAPTION = 0.35           # inches below each picture
HEADER = 0.35            # inches for the column headings
TARGET_COLOUR = '#00b000'
NO_PICTURE_GREY = '#bdbdbd'
TITLE_CHARS = 14         # wrap width of a title drawn inside a grey box
TITLE_LINES = 5


def figure_inches(num_rows: int, num_history: int, num_recommended: int) -> tuple[float, float]:
  """(width, height) of the figure in inches, for the widest history and recommendation lists."""
  width = 2 * MARGIN + (num_history + num_recommended) * (CELL + GAP) + SEPARATOR
  height = 2 * MARGIN + HEADER + num_rows * (ROW_TITLE + CELL + CAPTION)
  return width, height


def _check_rows(rows: Sequence[dict], num_items: int) -> None:
  if not rows:
    raise ValueError('no rows: a gallery needs at least one user')
  for r, row in enumerate(rows):
    missing = {'title', 'history', 'recommended', 'target'} - set(row)
    if missing:
      raise ValueError(f'row {r}: missing key(s) {", ".join(sorted(missing))}')
    ids = [*row['history'], *(i for i, _ in row['recommended'])] + ([] if row['target'] is None else [row['target']])
    bad = [i for i in ids if not 0 <= int(i) < num_items]
    if bad:
      raise ValueError(f'row {r} ({row["title"]!r}): item id(s) {bad} are not in the {num_items} items')


def _draw_item(ax, picture: np.ndarray, item, caption: str, outline: str | None) -> None:
  if item.has_image:
    ax.imshow(picture, interpolation='nearest', extent=(0, 1, 0, 1))
  else:
    ax.add_patch(patches.Rectangle((0, 0), 1, 1, color=NO_PICTURE_GREY))
    lines = textwrap.wrap(item.title or item.source_id, TITLE_CHARS)
    ax.text(0.5, 0.5, '\n'.join(lines[:TITLE_LINES]) + ('...' if len(lines) > TITLE_LINES else ''),
            ha='center', va='center', fontsize=7)
  ax.set_xlim(0, 1)
  ax.set_ylim(0, 1)
  ax.set_xticks([])
  ax.set_yticks([])
  for spine in ax.spines.values():
    spine.set_color(outline or '#808080')
    spine.set_linewidth(5 if outline else 0.5)
  ax.set_xlabel(caption, fontsize=7, labelpad=2)


def _render(rows: Sequence[dict], dataset) -> Figure:
  num_history = max(len(row['history']) for row in rows)
  num_recommended = max(len(row['recommended']) for row in rows)
  width, height = figure_inches(len(rows), num_history, num_recommended)
  fig = Figure(figsize=(width, height), dpi=DPI, facecolor='white')
  FigureCanvasAgg(fig)  # renders with Agg whatever pyplot's backend is, without touching global state

  def axes(left: float, top: float, w: float, h: float):  # inches from the top-left corner -> figure fractions
    return fig.add_axes((left / width, 1 - (top + h) / height, w / width, h / height))

  split = MARGIN + num_history * (CELL + GAP) + SEPARATOR / 2
  fig.text(MARGIN / width, 1 - (MARGIN + HEADER / 2) / height, 'history (oldest first)', va='center', fontsize=10)
  fig.text((split + SEPARATOR / 2) / width, 1 - (MARGIN + HEADER / 2) / height, 'recommended (rank, score)',
           va='center', fontsize=10)
  fig.add_artist(Line2D([split / width] * 2, [MARGIN / height, 1 - MARGIN / height], color='black',
                        linewidth=1.5, transform=fig.transFigure))

  for r, row in enumerate(rows):
    top = MARGIN + HEADER + r * (ROW_TITLE + CELL + CAPTION)
    fig.text(MARGIN / width, 1 - (top + ROW_TITLE / 2) / height, row['title'], va='center', fontsize=9,
             fontweight='bold')
    history = [int(i) for i in row['history']]
    recommended = [(int(i), float(s)) for i, s in row['recommended']]
    ids = history + [i for i, _ in recommended]
    pictures = dataset.images(np.asarray(ids, np.int64)) if ids else np.zeros((0, 1, 1, 3), np.uint8)
    for c, item_id in enumerate(history):
      ax = axes(MARGIN + c * (CELL + GAP), top + ROW_TITLE, CELL, CELL)
      _draw_item(ax, pictures[c], dataset.items[item_id], f'item {item_id}', None)
    for c, (item_id, score) in enumerate(recommended):
      ax = axes(split + SEPARATOR / 2 + c * (CELL + GAP), top + ROW_TITLE, CELL, CELL)
      hit = row['target'] is not None and item_id == int(row['target'])
      _draw_item(ax, pictures[len(history) + c], dataset.items[item_id],
                 f'#{c + 1} item {item_id}  {score:.3g}', TARGET_COLOUR if hit else None)
  return fig


def _item_html(dataset, item_id: int) -> str:
  item = dataset.items[item_id]
  extra = '' if item.has_image else ' <small>(no picture)</small>'
  return f'<code>{item_id}</code> {html.escape(item.title or item.source_id)}{extra}'


def _html(png_name: str, rows: Sequence[dict], dataset) -> str:
  parts = ['<!doctype html>', '<html><head><meta charset="utf-8"><title>Recommendation gallery</title>',
           '<style>body{font-family:sans-serif} .hit{color:#00a000;font-weight:bold}</style></head><body>',
           '<h1>Recommendation gallery</h1>',
           f'<p><img src="{html.escape(png_name)}" alt="gallery" style="max-width:100%"></p>']
  for row in rows:
    target = None if row['target'] is None else int(row['target'])
    parts.append(f'<h2>{html.escape(str(row["title"]))}</h2>')
    parts.append('<p>History (oldest first):</p><ol>')
    parts += [f'<li>{_item_html(dataset, int(i))}</li>' for i in row['history']]
    parts.append('</ol><p>Recommended:</p><ol>')
    for item_id, score in row['recommended']:
      hit = int(item_id) == target
      parts.append(f'<li{" class=hit" if hit else ""}>{_item_html(dataset, int(item_id))} '
                   f'score {float(score):.4g}{" &larr; target" if hit else ""}</li>')
    parts.append('</ol>')
    if target is not None:
      found = any(int(i) == target for i, _ in row['recommended'])
      parts.append(f'<p>Target: {_item_html(dataset, target)} ({"recommended" if found else "not recommended"})</p>')
  parts.append('</body></html>')
  return '\n'.join(parts) + '\n'


def _replace_atomically(path: str, write) -> None:
  directory = os.path.dirname(path) or '.'
  fd, tmp = tempfile.mkstemp(prefix=f'.{os.path.basename(path)}.', suffix='.partial', dir=directory)
  try:
    with os.fdopen(fd, 'wb') as f:
      write(f)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's file is owner-only; a gallery is read like any other file
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_gallery(path: str, rows: list[dict], dataset) -> str:
  """Renders `rows` to the PNG at `path` and writes the HTML page next to it (same stem, .html); returns the HTML
  path. `dataset` is a formats.UnifiedDataset (anything with `.items` and `.images(ids)`)."""
  _check_rows(rows, len(dataset.items))
  path = os.path.abspath(path)
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fig = _render(rows, dataset)
  _replace_atomically(path, lambda f: fig.savefig(f, format='png', dpi=DPI, facecolor='white'))
  html_path = os.path.splitext(path)[0] + '.html'
  page = _html(os.path.basename(path), rows, dataset).encode('utf-8')
  _replace_atomically(html_path, lambda f: f.write(page))
  return html_path
