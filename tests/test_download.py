"""pid.download: processes that want the same URL at once (torchrun ranks) download it once."""

import io
import multiprocessing as mp
import os
import time

from pid import download


class _Response(io.BytesIO):
    headers = {"Content-Length": "5"}


def _fetch(url, log, queue):
    def urlopen(u, timeout):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)   # long enough for the other processes to arrive while the first downloads
        return _Response(b"bytes")
    download.urllib.request.urlopen = urlopen   # this forked process only
    path = download.cached_path(url, progress=False)
    queue.put((path, open(path, "rb").read()))


def test_concurrent_processes_download_once(tmp_path, monkeypatch):
    monkeypatch.setenv("PID_CACHE_DIR", str(tmp_path / "cache"))
    url, log = "https://example.invalid/edm-tiny.pkl", str(tmp_path / "fetches.txt")
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fetch, args=(url, log, queue)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert len(open(log).read().split()) == 1, "one process downloads, the others read its file"
    assert results == [(download.cache_path_for(url), b"bytes")] * 3
