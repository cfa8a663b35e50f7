"""Downloading item pictures listed by URL (the Amazon Review metadata), before conversion.

    python -m unimp_jax.data.fetch --urls URLS.tsv --out DIR [--workers 16 --timeout 10 --retries 3]

URLS.tsv has one `item_id<TAB>url` line per item. Each picture lands in DIR/<item_id>.jpg holding
the bytes exactly as served (a PNG stays a PNG inside; `images.load` decodes by content), and only
once it has been downloaded whole, within the size cap, and decoded. Files are written under a
temporary name and renamed into place, so an interrupted run never leaves a partial picture, and a
rerun skips every item whose file exists: rerunning is how to resume or to retry the failures.
DIR/failures.tsv (`item_id<TAB>url<TAB>reason`, no header) is rewritten at the end of every run with
that run's failures, so `cut -f1,2 DIR/failures.tsv` is a URL file for retrying just those.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import http.client
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid

import tqdm

from unimp_jax.data import images

FAILURES_FILE = 'failures.tsv'
DECODE_CHECK_SIZE = 16       # decoding proves the bytes are a picture; the resize size is irrelevant
READ_CHUNK_BYTES = 1 << 16
USER_AGENT = 'unimp_jax-fetch/0.1'


@dataclasses.dataclass(frozen=True)
class Summary:
  downloaded: int
  skipped: int                 # already on disk from an earlier run
  failed: int


class _Failure(Exception):

  def __init__(self, reason: str, retryable: bool):
    super().__init__(reason)
    self.reason, self.retryable = reason, retryable


def read_urls(path: str) -> list[tuple[str, str]]:
  """URLS.tsv -> [(item_id, url)]; a malformed line raises ValueError naming the file and line."""
  rows, first_line = [], {}
  with open(path, encoding='utf-8') as f:
    for line_no, line in enumerate(f, start=1):
      line = line.rstrip('\r\n')
      if not line.strip():
        continue
      fields = line.split('\t')
      if len(fields) != 2 or not all(field.strip() for field in fields):
        raise ValueError(f'{path}:{line_no}: expected "item_id<TAB>url", got {line!r}')
      item_id, url = (field.strip() for field in fields)
      if item_id.startswith('.') or '/' in item_id or os.sep in item_id:  # it becomes a file name
        raise ValueError(f'{path}:{line_no}: item id {item_id!r} cannot be a file name')
      if item_id in first_line:
        raise ValueError(f'{path}:{line_no}: item id {item_id!r} repeats line {first_line[item_id]}; '
                         'list one URL per item')
      first_line[item_id] = line_no
      rows.append((item_id, url))
  return rows


def _download(url: str, timeout: float, max_bytes: int) -> bytes:
  # The socket timeout bounds each wait; the deadline bounds a server that trickles bytes forever.
  deadline = time.monotonic() + timeout
  too_large = _Failure(f'too large (over {max_bytes} bytes)', retryable=False)
  try:
    request = urllib.request.Request(url, headers={'User-Agent': USER_AGENT})
    with urllib.request.urlopen(request, timeout=timeout) as response:
      declared = response.headers.get('Content-Length', '')
      if declared.isdigit() and int(declared) > max_bytes:
        raise too_large
      chunks, size = [], 0
      while chunk := response.read1(READ_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
          raise too_large
        if time.monotonic() > deadline:
          raise _Failure(f'timeout (over {timeout}s)', retryable=True)
        chunks.append(chunk)
      return b''.join(chunks)
  except urllib.error.HTTPError as e:  # 5xx and 429 are worth another try; 404 and friends are not
    raise _Failure(f'http {e.code} {e.reason}', retryable=e.code >= 500 or e.code == 429) from None
  except (ValueError, http.client.InvalidURL) as e:  # e.g. a non-ASCII path, a non-numeric port
    raise _Failure(f'bad URL ({e})', retryable=False) from None
  except (OSError, http.client.HTTPException) as e:
    cause = e.reason if isinstance(e, urllib.error.URLError) else e
    reason = f'timeout (over {timeout}s)' if isinstance(cause, TimeoutError) else f'connection error ({cause})'
    raise _Failure(reason, retryable=True) from None


def _write_atomic(path: str, data: bytes) -> None:
  directory, name = os.path.split(path)
  temp_path = os.path.join(directory, f'.{name}.{uuid.uuid4().hex}.part')  # open() honours the umask
  try:
    with open(temp_path, 'xb') as f:
      f.write(data)
    os.replace(temp_path, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(temp_path)
    raise


def fetch_one(item_id: str, url: str, path: str, *, timeout: float, retries: int, max_bytes: int,
              backoff_s: float) -> str | None:
  """Downloads, checks and writes one picture; returns None, or the reason it failed."""
  scheme = urllib.parse.urlsplit(url).scheme.lower()
  if scheme not in ('http', 'https'):
    return f'unsupported URL scheme {scheme or "(none)"!r}: only http and https'
  for attempt in range(retries + 1):
    if attempt:
      time.sleep(backoff_s * 2 ** (attempt - 1))
    try:
      data = _download(url, timeout, max_bytes)
      break
    except _Failure as failure:
      if not failure.retryable or attempt == retries:
        return f'{failure.reason}, after {attempt + 1} attempt(s)'
  try:
    images.decode(data, DECODE_CHECK_SIZE, item_id)
  except images.BadImage as e:
    return f'not an image ({e})'
  _write_atomic(path, data)
  return None


def fetch(urls_path: str, out_dir: str, *, workers: int = 16, timeout: float = 10.0, retries: int = 3,
          max_bytes: int = 10_000_000, backoff_s: float = 0.5) -> Summary:
  """Fetches every listed picture not yet in out_dir, then rewrites out_dir/failures.tsv."""
  for name, value, least in (('workers', workers, 1), ('retries', retries, 0), ('timeout', timeout, 1e-3),
                             ('max_bytes', max_bytes, 1)):
    if value < least:
      raise ValueError(f'--{name} is {value}; it must be at least {least}')
  rows = read_urls(urls_path)
  os.makedirs(out_dir, exist_ok=True)
  paths = {item_id: os.path.join(out_dir, f'{item_id}.jpg') for item_id, _ in rows}
  todo = [(item_id, url) for item_id, url in rows if not os.path.exists(paths[item_id])]
  with concurrent.futures.ThreadPoolExecutor(max_workers=workers) as pool:
    reasons = list(tqdm.tqdm(pool.map(
        lambda row: fetch_one(*row, paths[row[0]], timeout=timeout, retries=retries,
                              max_bytes=max_bytes, backoff_s=backoff_s), todo),
        total=len(todo), desc='fetching', unit='picture', dynamic_ncols=True, mininterval=1))
  failures = [(item_id, url, reason) for (item_id, url), reason in zip(todo, reasons) if reason]
  lines = ['\t'.join(' '.join(field.split()) for field in failure) + '\n' for failure in failures]
  _write_atomic(os.path.join(out_dir, FAILURES_FILE), ''.join(lines).encode('utf-8'))
  return Summary(downloaded=len(todo) - len(failures), skipped=len(rows) - len(todo),
                 failed=len(failures))


def main(argv: list[str] | None = None) -> Summary:
  # argparse rather than absl flags: absl flags are process-global, and this module is also imported.
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--urls', required=True, help='TSV file of item_id<TAB>url lines')
  parser.add_argument('--out', required=True, help='directory for <item_id>.jpg and failures.tsv')
  parser.add_argument('--workers', type=int, default=16, help='parallel downloads')
  parser.add_argument('--timeout', type=float, default=10.0, help='seconds per download attempt')
  parser.add_argument('--retries', type=int, default=3, help='extra attempts after a transient failure')
  parser.add_argument('--max_bytes', type=int, default=10_000_000, help='larger pictures are failures')
  parser.add_argument('--backoff', type=float, default=0.5, help='seconds before the first retry; doubles')
  args = parser.parse_args(argv)
  summary = fetch(args.urls, args.out, workers=args.workers, timeout=args.timeout, retries=args.retries,
                  max_bytes=args.max_bytes, backoff_s=args.backoff)
  failures = os.path.join(args.out, FAILURES_FILE)
  print(json.dumps({**dataclasses.asdict(summary), 'failures': failures}))
  if summary.failed:
    print(f'error: {summary.failed} of {summary.failed + summary.downloaded} downloads failed; the reasons are in '
          f'{failures}, and a rerun retries only those', file=sys.stderr)
  return summary


if __name__ == '__main__':
  sys.exit(1 if main().failed else 0)  # scripts and schedulers see that pictures are missing
