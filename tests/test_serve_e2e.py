"""`python -m moetune.serve --model tiny` end to end on a CPU: load, default-vs-tuned comparison,
results files, then one real request (plain and streamed) against the real tiny engine."""

from __future__ import annotations

import http.client
import importlib.util
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from moetune.serve.__main__ import main

needs_runtime = pytest.mark.skipif(
    importlib.util.find_spec("moetune.runtime.engine") is None, reason="moetune.runtime.engine not built yet"
)


def _lines(proc: subprocess.Popen) -> queue.Queue:
    """stdout lines on a queue, so the test can wait with a deadline instead of blocking on readline."""
    q: queue.Queue = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            q.put(line)
        q.put(None)

    threading.Thread(target=pump, daemon=True).start()
    return q


def _post(port: int, path: str, body: dict) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("POST", path, body=json.dumps(body))
    r = conn.getresponse()
    out = r.status, r.read()
    conn.close()
    return out


@needs_runtime
def test_tiny_compares_writes_results_and_serves_a_real_request(tmp_path):
    cmd = [sys.executable, "-m", "moetune.serve", "--model", "tiny", "--port", "0", "--results-dir", str(tmp_path),
           "--batch-sizes", "1,2"]  # two sizes prove the loop; each costs seconds in the interpreter
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the CLI must set it itself
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen, port = [], None
    try:
        lines, deadline = _lines(proc), time.monotonic() + 120
        while port is None and time.monotonic() < deadline:
            try:
                line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            if line is None:
                break
            seen.append(line)
            if line.startswith("serving "):
                port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        out = "".join(seen)
        assert port, f"server did not start:\n{out}"
        assert "MEANINGLESS" in out and "TTFT" in out and "parity prompt 0: MATCH" in out
        assert "NO TUNED TABLE" in out or "tuned table:" in out  # someone may have committed a CPU table

        result = json.loads(next(tmp_path.glob("serve_tiny_*.json")).read_text())
        assert [r["batch"] for r in result["decode"]] == [1, 2] and not result["timings_meaningful"]
        assert next(tmp_path.glob("serve_tiny_*.csv")).read_text().startswith("kind,batch")

        status, body = _post(port, "/v1/completions", {"prompt": "Hello", "max_tokens": 3, "temperature": 0})
        reply = json.loads(body)
        assert status == 200 and reply["usage"]["completion_tokens"] <= 3, reply
        status, body = _post(port, "/v1/chat/completions",
                             {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "stream": True})
        assert status == 200 and body.decode().rstrip().endswith("data: [DONE]")
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_real_model_without_gpu_says_so_in_one_line_and_exits_2(capsys):
    assert main([]) == 2
    err = capsys.readouterr().err
    assert err.strip() == "moetune serve: no GPU found; use --model tiny for a CPU run"


def test_no_compare_without_port_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", "--no-compare"])
    assert e.value.code == 2


@pytest.mark.parametrize(
    "args,message",
    [
        (["--port", "99999"], "argument --port: a port is 0..65535"),
        (["--context-len", "0"], "argument --context-len: expected a positive integer, got 0"),
        (["--max-model-len", "x"], "argument --max-model-len: expected a positive integer, got 'x'"),
        (["--batch-sizes", "1,y"], "argument --batch-sizes: expected comma-separated integers"),
    ],
)
def test_bad_arguments_are_usage_errors_that_name_the_argument(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--model", "tiny", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_tuned_configs_folder_is_one_clear_line(capsys):
    assert main(["--model", "tiny", "--tuned-configs", "/no/such/folder", "--port", "0", "--no-compare"]) == 2
    err = capsys.readouterr().err
    assert "tuned_configs folder /no/such/folder does not exist" in err and "Traceback" not in err
