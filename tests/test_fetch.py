"""unimp_jax.data.fetch against a local HTTP server (127.0.0.1 only) that misbehaves on purpose."""

import collections
import http.server
import io
import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from unimp_jax.data import fetch

MAX_BYTES = 4000
TIMEOUT_S = 0.3
FAST = dict(workers=8, timeout=TIMEOUT_S, retries=2, max_bytes=MAX_BYTES, backoff_s=0.01)


def _encode(fmt: str, seed: int) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (6, 8, 3), np.uint8)
  buffer = io.BytesIO()
  Image.fromarray(pixels).save(buffer, format=fmt)
  return buffer.getvalue()


JPEG, PNG = _encode('JPEG', 0), _encode('PNG', 1)
HUGE = JPEG + b'\0' * (MAX_BYTES + 1)  # still a decodable JPEG: only the size cap can reject it


class Server:
  """Routes by path; counts requests per path; `flaky_failures` 503s precede a flaky success."""

  def __init__(self):
    self.counts = collections.Counter()
    self.lock = threading.Lock()
    self.flaky_failures = 2
    self.missing_found = False
    server = self

    class Handler(http.server.BaseHTTPRequestHandler):

      def do_GET(self):
        with server.lock:
          server.counts[self.path] += 1
          count = server.counts[self.path]
        server.route(self, count)

      def log_message(self, *args):
        pass

    self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
    self.httpd.daemon_threads = True
    self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
    self.thread.start()

  def url(self, path: str) -> str:
    return f'http://127.0.0.1:{self.httpd.server_port}{path}'

  def route(self, handler, count: int) -> None:
    def send(body: bytes, status: int = 200, length: bool = True) -> None:
      handler.send_response(status)
      if length:
        handler.send_header('Content-Length', str(len(body)))
      handler.end_headers()
      try:
        handler.wfile.write(body)
      except OSError:
        pass  # the client gave up (a timeout or the size cap), as it should

    path = handler.path
    if path == '/cat.jpg':
      send(JPEG)
    elif path == '/dog.png':
      send(PNG)
    elif path == '/garbage.jpg':
      send(b'this is not a picture' * 10)
    elif path == '/huge.jpg':
      send(HUGE)
    elif path == '/huge-unannounced.jpg':  # no Content-Length: the cap must stop the stream itself
      send(HUGE, length=False)
    elif path == '/missing.jpg' and self.missing_found:
      send(JPEG)
    elif path == '/flaky.jpg':
      send(JPEG) if count > self.flaky_failures else send(b'busy', status=503)
    elif path == '/slow.jpg':
      time.sleep(3 * TIMEOUT_S)
      send(JPEG)
    elif path == '/trickle.jpg':  # each byte arrives within the socket timeout; the whole does not
      handler.send_response(200)
      handler.end_headers()
      try:
        for byte in JPEG[:30]:
          handler.wfile.write(bytes([byte]))
          handler.wfile.flush()
          time.sleep(TIMEOUT_S / 5)
      except OSError:
        pass
    else:
      send(b'not found', status=404)

  def close(self) -> None:
    self.httpd.shutdown()
    self.httpd.server_close()


@pytest.fixture
def server(monkeypatch):
  monkeypatch.setenv('no_proxy', '127.0.0.1')  # a proxy from the environment must not intercept
  server = Server()
  yield server
  server.close()


def _write_urls(path, rows) -> str:
  with open(path, 'w') as f:
    f.writelines(f'{item_id}\t{url}\n' for item_id, url in rows)
  return str(path)


def _failures(out_dir) -> dict[str, tuple[str, str]]:
  with open(os.path.join(out_dir, 'failures.tsv')) as f:
    rows = [line.rstrip('\n').split('\t') for line in f]
  assert all(len(row) == 3 for row in rows), rows
  return {item_id: (url, reason) for item_id, url, reason in rows}


GOOD = {'cat': ('/cat.jpg', JPEG), 'dog': ('/dog.png', PNG), 'flaky': ('/flaky.jpg', JPEG)}
BAD = {  # item -> (path, a word the failure reason must contain)
    'garbage': ('/garbage.jpg', 'not an image'),
    'huge': ('/huge.jpg', 'too large'),
    'huge_unannounced': ('/huge-unannounced.jpg', 'too large'),
    'missing': ('/missing.jpg', 'http 404'),
    'slow': ('/slow.jpg', 'timeout'),
    'trickle': ('/trickle.jpg', 'timeout'),
}


def _all_rows(server, tmp_path):
  rows = [(item, server.url(path)) for item, (path, _) in {**GOOD, **BAD}.items()]
  rows.append(('local', f'file://{tmp_path}/cat.jpg'))
  rows.append(('ftp', 'ftp://127.0.0.1/cat.jpg'))
  return _write_urls(tmp_path / 'urls.tsv', rows)


def test_fetch_writes_original_bytes_and_lists_failures(server, tmp_path, monkeypatch):
  # Attempts are counted where they are made: under load, a timed-out attempt may never reach the server.
  attempts, lock, download = collections.Counter(), threading.Lock(), fetch._download

  def counted(url, *args):
    with lock:
      attempts[url.removeprefix(server.url(''))] += 1
    return download(url, *args)

  monkeypatch.setattr(fetch, '_download', counted)
  out = tmp_path / 'images'
  summary = fetch.fetch(_all_rows(server, tmp_path), str(out), **FAST)

  assert summary == fetch.Summary(downloaded=len(GOOD), skipped=0, failed=len(BAD) + 2)
  for item, (_, data) in GOOD.items():
    assert (out / f'{item}.jpg').read_bytes() == data
  assert sorted(os.listdir(out)) == sorted([f'{item}.jpg' for item in GOOD] + ['failures.tsv'])
  failures = _failures(out)
  assert set(failures) == set(BAD) | {'local', 'ftp'}
  for item, (path, word) in BAD.items():
    assert failures[item][0] == server.url(path)
    assert word in failures[item][1], failures[item]
  assert 'unsupported URL scheme' in failures['local'][1]
  assert 'unsupported URL scheme' in failures['ftp'][1]
  assert attempts['/missing.jpg'] == 1      # a 404 is final: no retries
  assert attempts['/garbage.jpg'] == 1      # so is an undecodable picture
  assert attempts['/huge.jpg'] == 1         # and an oversized one
  assert attempts['/slow.jpg'] == 3         # a timeout is transient: 1 + 2 retries


def test_second_run_skips_existing_and_rewrites_failures(server, tmp_path):
  urls, out = _all_rows(server, tmp_path), str(tmp_path / 'images')
  fetch.fetch(urls, out, **FAST)
  counts_after_first = dict(server.counts)
  server.missing_found = True

  summary = fetch.fetch(urls, out, **FAST)

  assert summary.downloaded == 1 and summary.skipped == len(GOOD) and summary.failed == len(BAD) + 1
  for path, _ in GOOD.values():
    assert server.counts[path] == counts_after_first[path], f'{path} was downloaded again'
  assert (tmp_path / 'images' / 'missing.jpg').read_bytes() == JPEG
  assert 'missing' not in _failures(out)
  assert 'garbage' in _failures(out)


def test_retries_then_succeeds_and_gives_up(server, tmp_path):
  urls = _write_urls(tmp_path / 'urls.tsv', [('flaky', server.url('/flaky.jpg'))])
  summary = fetch.fetch(urls, str(tmp_path / 'a'), **{**FAST, 'retries': 2})
  assert summary == fetch.Summary(downloaded=1, skipped=0, failed=0)
  assert server.counts['/flaky.jpg'] == 3
  assert (tmp_path / 'a' / 'flaky.jpg').read_bytes() == JPEG

  server.counts.clear()
  summary = fetch.fetch(urls, str(tmp_path / 'b'), **{**FAST, 'retries': 1})
  assert summary == fetch.Summary(downloaded=0, skipped=0, failed=1)
  assert server.counts['/flaky.jpg'] == 2
  assert 'http 503' in _failures(tmp_path / 'b')['flaky'][1]


def test_timeout_is_a_failure(server, tmp_path):
  urls = _write_urls(tmp_path / 'urls.tsv', [('slow', server.url('/slow.jpg'))])
  start = time.monotonic()
  summary = fetch.fetch(urls, str(tmp_path / 'out'), **{**FAST, 'retries': 0})
  assert time.monotonic() - start < 3 * TIMEOUT_S
  assert summary == fetch.Summary(downloaded=0, skipped=0, failed=1)
  assert 'timeout' in _failures(tmp_path / 'out')['slow'][1]
  assert not (tmp_path / 'out' / 'slow.jpg').exists()


@pytest.mark.parametrize('lines, line_no, message', [
    (['a\thttp://x/a.jpg', 'b\thttp://x/b.jpg', 'no tab here'], 3, 'expected "item_id<TAB>url"'),
    (['a\thttp://x/a.jpg', '', 'b\thttp://x/b.jpg\textra'], 3, 'expected "item_id<TAB>url"'),
    (['\thttp://x/a.jpg'], 1, 'expected "item_id<TAB>url"'),
    (['a\thttp://x/a.jpg', '../etc\thttp://x/b.jpg'], 2, 'cannot be a file name'),
    (['a\thttp://x/a.jpg', 'a\thttp://x/b.jpg'], 2, 'repeats line 1'),
])
def test_malformed_tsv_names_file_and_line(tmp_path, lines, line_no, message):
  path = tmp_path / 'urls.tsv'
  path.write_text('\n'.join(lines) + '\n')
  with pytest.raises(ValueError, match=rf'urls\.tsv:{line_no}: .*') as error:
    fetch.fetch(str(path), str(tmp_path / 'out'), **FAST)
  assert message in str(error.value)
  assert not (tmp_path / 'out').exists()


def test_cli(server, tmp_path, capsys):
  urls = _write_urls(tmp_path / 'urls.tsv', [('cat', server.url('/cat.jpg')),
                                             ('missing', server.url('/missing.jpg'))])
  out = str(tmp_path / 'out')
  summary = fetch.main(['--urls', urls, '--out', out, '--workers', '2', '--timeout', '2',
                        '--retries', '1', '--max_bytes', '100000', '--backoff', '0.01'])
  assert summary == fetch.Summary(downloaded=1, skipped=0, failed=1)
  captured = capsys.readouterr()
  assert json.loads(captured.out) == {'downloaded': 1, 'skipped': 0, 'failed': 1,
                                      'failures': os.path.join(out, 'failures.tsv')}
  assert f'1 of 2 downloads failed; the reasons are in {out}/failures.tsv' in captured.err
  assert 'fetching: 100%' in captured.err and '2/2' in captured.err  # the progress bar


def test_the_command_exits_non_zero_when_a_download_failed(server, tmp_path):
  root = os.path.dirname(os.path.dirname(__file__))
  for name, path, code in (('cat', '/cat.jpg', 0), ('missing', '/missing.jpg', 1)):
    urls = _write_urls(tmp_path / f'{name}.tsv', [(name, server.url(path))])
    proc = subprocess.run([sys.executable, '-m', 'unimp_jax.data.fetch', '--urls', urls, '--out',
                           str(tmp_path / name), '--retries', '0'], cwd=root, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == code, proc.stderr[-2000:]
