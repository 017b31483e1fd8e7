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


def test_completed_impressions_fill_only_the_missing_ones(tmp_path, capsys):
    from ctclip.impressions import fill_impressions

    pd.DataFrame(
        {
            "VolumeName": ["a", "b", "c"],
            "Findings_EN": ["fa", "fb", "fc"],
            "Impressions_EN": ["own a", None, None],
        }
    ).to_csv(tmp_path / "reports.csv", index=False)
    doc = {"impressions": {"a": "generated a", "b": "generated b", "zz": "other"}}
    (tmp_path / "done.json").write_text(json.dumps(doc))
    counts = fill_impressions(tmp_path / "reports.csv", tmp_path / "done.json", tmp_path / "o.csv")
    out = pd.read_csv(tmp_path / "o.csv")
    assert out["Impressions_EN"].fillna("").tolist() == ["own a", "generated b", ""]
    assert counts == {"missing": 2, "filled": 1, "still_missing": 1, "not_in_table": 1}
    assert "1 of 2 missing impressions" in capsys.readouterr().err


def test_generated_impressions_reach_training(tiny_demo, tiny_sets, tmp_path, capsys):
    """The impressions JSON fills the reports table the run trains on (before: ignored)."""
    reports = pd.read_csv(tiny_demo / "ct_rate/train_reports.csv")
    names = reports["VolumeName"].tolist()
    reports.loc[:2, "Impressions_EN"] = None
    reports.to_csv(tmp_path / "reports.csv", index=False)
    doc = {"impressions": {n: f"generated impression {i}." for i, n in enumerate(names[:2])}}
    (tmp_path / "done.json").write_text(json.dumps(doc))
    run = tmp_path / "run"
    argv = [
        "--data-dir", str(tiny_demo), "--output-dir", str(run), "--smoke", "--no-do-validate",
        "--txt-filepath", str(tmp_path / "reports.csv"), "--text-column", "impressions",
        "--completed-impressions", str(tmp_path / "done.json"), *tiny_sets,
    ]  # fmt: skip
    assert cli.train(argv) == 0
    assert "2 of 3 missing impressions" in capsys.readouterr().err
    used = pd.read_csv(run / "train_reports_completed.csv").set_index("VolumeName")
    assert used.loc[names[1], "Impressions_EN"] == "generated impression 1."
    splits = json.loads((run / "splits.json").read_text())
    # the third report has no text at all now, so it is left out, the two filled ones are not
    assert names[0] in splits["ids"]["train"] and names[2] not in splits["ids"]["train"]


def test_completed_impressions_with_findings_only_text_is_refused(tiny_demo, tmp_path, capsys):
    argv = ["--data-dir", str(tiny_demo), "--output-dir", str(tmp_path / "r"),
            "--completed-impressions", "x.json", "--from-scratch"]  # fmt: skip
    assert cli.train(argv) == 2
    assert "text_column=findings" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
