"""ctclip-impressions against a local OpenAI-compatible server (http.server on 127.0.0.1)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pandas as pd
import pytest

from ctclip import cli


@pytest.fixture
def server():
    requests: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append(
                {"path": self.path, "body": body, "auth": self.headers.get("Authorization")}
            )
            query = body["messages"][-1]["content"]
            if "FAIL" in query:
                self.send_response(500)
                self.end_headers()
                return
            reply = {
                "choices": [
                    {"message": {"role": "assistant", "content": f"Impression of: {query[10:30]}"}}
                ]
            }
            data = json.dumps(reply).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1", requests
    httpd.shutdown()


def _reports(path, n_complete=10, missing=("m1", "m2", "m3")):
    rows = [
        {
            "VolumeName": f"c{i}",
            "Findings_EN": f"findings number {i}",
            "Impressions_EN": f"impression {i}",
        }
        for i in range(n_complete)
    ]
    rows += [
        {"VolumeName": name, "Findings_EN": f"findings of {name}", "Impressions_EN": np.nan}
        for name in missing
    ]
    pd.DataFrame(rows).to_csv(path, index=False)


def test_fills_missing_impressions_few_shot_and_resumes(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    url, requests = server
    _reports(tmp_path / "r.csv")
    out = tmp_path / "out.json"
    argv = [
        "--target-file",
        str(tmp_path / "r.csv"),
        "--output-file",
        str(out),
        "--base-url",
        url,
        "--num-examples",
        "8",
        "--api-key",
        "k",
    ]
    assert cli.impressions(argv) == 0
    assert (
        len(requests) == 3
        and requests[0]["path"] == "/v1/chat/completions"
        and requests[0]["auth"] == "Bearer k"
    )
    messages = requests[0]["body"]["messages"]
    assert messages[0]["role"] == "system" and len(messages) == 1 + 2 * 8 + 1
    assert [m["role"] for m in messages[1:3]] == ["user", "assistant"]
    assert messages[2]["content"].startswith("impression ")  # examples are complete reports
    done = json.loads(out.read_text())["impressions"]
    assert done == {n: f"Impression of: findings of {n}" for n in ("m1", "m2", "m3")}
    # A rerun with one more missing report only asks for that one.
    _reports(tmp_path / "r.csv", missing=("m1", "m2", "m3", "m4"))
    requests.clear()
    assert cli.impressions(argv) == 0
    assert len(requests) == 1 and "m4" in requests[0]["body"]["messages"][-1]["content"]
    assert len(json.loads(out.read_text())["impressions"]) == 4


def test_server_errors_are_retried_then_counted(tmp_path, server, capsys, monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    url, requests = server
    _reports(tmp_path / "r.csv", missing=("ok", "FAIL"))
    out = tmp_path / "out.json"
    code = cli.impressions(
        ["--target-file", str(tmp_path / "r.csv"), "--output-file", str(out), "--base-url", url]
    )
    assert code == 1 and len(requests) == 1 + 3
    assert "skipped FAIL: HTTP 500" in capsys.readouterr().err
    assert list(json.loads(out.read_text())["impressions"]) == ["ok"]


def test_unreachable_server_and_too_few_examples_are_one_line_errors(tmp_path, capsys):
    _reports(tmp_path / "r.csv")
    argv = [
        "--target-file",
        str(tmp_path / "r.csv"),
        "--output-file",
        str(tmp_path / "o.json"),
        "--base-url",
        "http://127.0.0.1:9/v1",
        "--timeout",
        "5",
    ]
    assert cli.impressions(argv) == 2
    err = [
        line
        for line in capsys.readouterr().err.splitlines()
        if line.strip() and "impressions:" not in line
    ]
    assert len(err) == 1 and err[0].startswith("error: ") and "cannot reach the server" in err[0]
    _reports(tmp_path / "r.csv", n_complete=3)
    assert cli.impressions(argv) == 2
    assert "needs that many" in capsys.readouterr().err
