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
from pathlib import Path

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
@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU run's report (MEANINGLESS timings)")
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


# ---------------------------------------------------------------------------------------- start-up, shutdown, isolation


def _broken_table(folder, sidecar: bool) -> str:
    """A table for the tiny model on this machine's device that passes the schema but not the kernel at M=8."""
    from moetune.tables import device_name, table_filename

    name = table_filename(4, 96, device_name(), "bf16")
    ok = dict(BLOCK_SIZE_M=16, BLOCK_SIZE_N=32, BLOCK_SIZE_K=32, GROUP_SIZE_M=1, num_warps=4, num_stages=2)
    table = {"1": ok, "8": {**ok, "BLOCK_SIZE_M": 16 if sidecar else 16.0}}  # 16.0 == 16 for the JSON schema
    (folder / name).write_text(json.dumps(table))
    if not sidecar:
        return name
    side = {"table": name, "device": device_name(), "dtype": "bf16", "shape": {"E": 4, "N": 96, "K": 64, "top_k": 2},
            "versions": {"torch": "x", "triton": "x", "moetune": "x"},
            "entries": {"8": {"config": {"kernel": "gemv", "BLOCK_SIZE_N": 32, "num_warps": 4, "num_stages": 2}}}}
    side_name = name.removesuffix(".json") + ".moetune.json"
    (folder / side_name).write_text(json.dumps(side))  # the gemv config lacks BLOCK_SIZE_K
    return side_name


@needs_runtime
@pytest.mark.parametrize("sidecar", [False, True])
def test_broken_table_fails_start_up_in_one_line_naming_file_and_m(tmp_path, capsys, sidecar):
    bad_file = _broken_table(tmp_path, sidecar)
    assert main(["--model", "tiny", "--tuned-configs", str(tmp_path), "--port", "0", "--no-compare"]) == 2
    out = capsys.readouterr()
    err = out.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("moetune serve: error: ") and "Traceback" not in err
    assert f"{tmp_path / bad_file}: M=8:" in err
    assert "serving" not in out.out  # it never got as far as listening


@needs_runtime
def test_sigterm_stops_the_server_within_5_s_without_traceback():
    cmd = [sys.executable, "-m", "moetune.serve", "--model", "tiny", "--port", "0", "--no-compare"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen, port = [], None
    try:
        lines, deadline = _lines(proc), time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line is None:
                break
            seen.append(line)
            if line.startswith("serving "):
                port = int(line.split("http://127.0.0.1:")[1].split("/")[0])
        assert port, "".join(seen)
        # a long streamed request in flight: shutdown must not wait for it to finish
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": [1, 5], "max_tokens": 100,
                                                                  "ignore_eos": True, "stream": True}))
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        proc.wait(5)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    out = "".join(seen) + "".join(iter(lambda: lines.get(timeout=5) or "", ""))
    assert proc.returncode == 0 and took < 5, out
    assert "Traceback" not in out and "server stopped" in out, out


@needs_runtime
def test_a_sequence_that_fails_inside_a_step_errors_only_its_own_request(tiny_checkpoint):
    """The real engine: a request whose sequence breaks the decode step gets a 500; the requests batched with
    it get a 200 with the very tokens they get when run alone."""
    from conftest import tiny_engine_config

    from moetune.runtime.engine import LLMEngine
    from moetune.serve.server import start_server

    engine = LLMEngine(tiny_engine_config(tiny_checkpoint))
    poison = 31_999  # a prompt holding this token fails every decode step it is part of
    real_run = engine.runner.run

    def run(seqs, is_prefill):
        if not is_prefill and any(poison in s.token_ids for s in seqs):
            raise RuntimeError("probability tensor contains either inf, nan or element < 0")
        return real_run(seqs, is_prefill)

    engine.runner.run = run
    good = [{"prompt": [1, 100 + i, 200], "max_tokens": 6, "temperature": 0, "ignore_eos": True} for i in range(2)]
    good.append({"prompt": [1, 300], "max_tokens": 6, "temperature": 0.8, "seed": 5, "ignore_eos": True})
    s = start_server(engine, "127.0.0.1", 0)
    t = threading.Thread(target=s.serve_forever, daemon=True)
    t.start()
    try:
        assert s.wait_started(60), "the HTTP process did not start"
        port = s.server_address[1]
        alone = [json.loads(_post(port, "/v1/completions", b)[1])["choices"][0]["text"] for b in good]
        results: dict = {}
        bodies = [*good, {"prompt": [1, poison], "max_tokens": 6, "ignore_eos": True}]
        ths = [threading.Thread(target=lambda i=i, b=b: results.__setitem__(i, _post(port, "/v1/completions", b)))
               for i, b in enumerate(bodies)]
        for th in ths:
            th.start()
        for th in ths:
            th.join(60)
        assert results[3][0] == 500 and b"probability tensor" in results[3][1]
        together = [json.loads(results[i][1])["choices"][0]["text"] for i in range(3)]
        assert [results[i][0] for i in range(3)] == [200] * 3 and together == alone
        assert _post(port, "/v1/completions", good[0])[0] == 200  # and the server goes on
    finally:
        s.shutdown()
        t.join(5)
        s.close()


@needs_runtime
def test_load_script_runs_end_to_end_on_the_tiny_model():
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "load_openai.py"
    r = subprocess.run([sys.executable, str(script), "--spawn-tiny", "--concurrency", "2", "--max-tokens", "3"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    head, row = r.stdout.splitlines()[-2:]
    assert head.split()[:3] == ["concurrency", "requests", "tok/s"] and head.split()[-3:] == ["dropped", "step", "ms"]
    cells = row.split()
    assert cells[:2] == ["2", "2"] and cells[-2] == "0" and float(cells[-1]) > 0  # none dropped; the server's step
