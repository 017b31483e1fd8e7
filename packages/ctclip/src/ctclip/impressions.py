"""ctclip-impressions: fill missing impression sections by few-shot prompting an LLM.

The server is any OpenAI-compatible chat-completions endpoint (vLLM's ``vllm serve`` speaks it);
the client is the standard library's urllib, so nothing else is installed. Each generated
impression is saved at once (atomic JSON), and a rerun skips the volumes already in the output.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from ctclip.text import clean_text
from medcore.errors import DataError, UserError
from medcore.io import RunLock, atomic_write_csv, atomic_write_json, read_csv

SYSTEM_PROMPT = (
    "You are a radiologist. Given the findings section of a chest CT report, write its impression "
    "section: a short summary of the clinically relevant findings. Answer with the impression only."
)


class TransientError(Exception):
    """A failure worth retrying (timeout, server error)."""


def build_messages(findings: str, examples: list[tuple[str, str]]) -> list[dict[str, str]]:
    """System prompt, then each example as a (findings -> impression) exchange, then the query."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for ex_findings, ex_impression in examples:
        messages.append({"role": "user", "content": f"Findings: {ex_findings}"})
        messages.append({"role": "assistant", "content": ex_impression})
    messages.append({"role": "user", "content": f"Findings: {findings}"})
    return messages


def chat_completion(
    base_url: str, payload: dict[str, Any], api_key: str | None, timeout: float
) -> str:
    """POST ``/chat/completions`` and return the first choice's message text."""
    url = base_url.rstrip("/") + "/chat/completions"
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = json.loads(response.read().decode("utf-8"))
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:200].strip()
        if exc.code >= 500 or exc.code == 429:
            raise TransientError(f"HTTP {exc.code} {detail}") from None
        raise UserError(url, f"the server refused the request: HTTP {exc.code} {detail}") from None
    except urllib.error.URLError as exc:
        if isinstance(exc.reason, TimeoutError):
            raise TransientError(f"timed out after {timeout:g} s") from None
        raise UserError(
            url,
            f"cannot reach the server ({exc.reason}); start it (e.g. vllm serve MODEL) "
            "or pass --base-url",
        ) from None
    except TimeoutError:
        raise TransientError(f"timed out after {timeout:g} s") from None
    except json.JSONDecodeError:
        raise TransientError("the reply is not JSON") from None
    try:
        text = body["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise TransientError(f"unexpected reply: {str(body)[:120]}") from None
    return str(text).strip()


def read_completed(path: Path) -> dict[str, str]:
    """VolumeName -> generated impression, from the JSON that ctclip-impressions writes."""
    if not Path(path).is_file():
        raise DataError(
            path, "completed-impressions JSON not found (write it with ctclip-impressions)"
        )
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        impressions = doc["impressions"]
        if not isinstance(impressions, dict):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise DataError(
            path, "not an impressions JSON file (no 'impressions' mapping; see ctclip-impressions)"
        ) from None
    return {str(k): clean_text(v) for k, v in impressions.items() if clean_text(v)}


def fill_impressions(reports_csv: Path, completed: Path, out_csv: Path) -> dict[str, int]:
    """Write ``reports_csv`` to ``out_csv`` with its missing Impressions_EN taken from the
    ``completed`` JSON; print one line with the counts and return them.

    Only missing impressions are filled: a report's own impression always wins.
    """
    frame = read_csv(reports_csv, required=["VolumeName", "Impressions_EN"], unique="VolumeName")
    generated = read_completed(completed)
    names = frame["VolumeName"].astype(str)
    missing = frame["Impressions_EN"].map(clean_text) == ""
    fill = missing & names.isin(list(generated))
    frame["Impressions_EN"] = frame["Impressions_EN"].astype(object)
    frame.loc[fill, "Impressions_EN"] = names[fill].map(generated)
    counts = {
        "missing": int(missing.sum()),
        "filled": int(fill.sum()),
        "still_missing": int((missing & ~fill).sum()),
        "not_in_table": len(set(generated) - set(names)),
    }
    atomic_write_csv(out_csv, frame)
    print(
        f"impressions: {counts['filled']} of {counts['missing']} missing impressions in "
        f"{reports_csv} filled from {completed}; {counts['still_missing']} still missing; "
        f"{counts['not_in_table']} generated for volumes not in the table (unused)",
        file=sys.stderr,
    )
    return counts


def run_impressions(
    target_file: Path,
    output_file: Path,
    base_url: str,
    model: str = "default",
    num_examples: int = 8,
    api_key: str | None = None,
    temperature: float = 0.0,
    max_tokens: int = 256,
    timeout: float = 120.0,
    seed: int = 42,
    retries: int = 3,
    show_progress: bool = True,
) -> dict[str, int]:
    """Generate the missing impressions of ``target_file`` into ``output_file``."""
    frame = read_csv(
        target_file, required=["VolumeName", "Findings_EN", "Impressions_EN"], unique="VolumeName"
    )
    rows = [
        (str(r["VolumeName"]), clean_text(r["Findings_EN"]), clean_text(r["Impressions_EN"]))
        for r in frame.to_dict("records")
    ]
    complete = [(f, i) for _, f, i in rows if f and i]
    targets = [(n, f) for n, f, i in rows if f and not i]
    if len(complete) < num_examples:
        raise DataError(
            target_file,
            f"has {len(complete)} complete reports; --num-examples {num_examples} needs that many",
        )
    picks = np.random.default_rng(seed).choice(len(complete), size=num_examples, replace=False)
    examples = [complete[i] for i in sorted(picks)]
    api_key = api_key or os.environ.get("OPENAI_API_KEY")

    with RunLock(output_file):
        done: dict[str, str] = {}
        if output_file.is_file():
            try:
                done = dict(
                    json.loads(output_file.read_text(encoding="utf-8")).get("impressions", {})
                )
            except (json.JSONDecodeError, AttributeError):
                raise DataError(
                    output_file, "exists but is not an impressions JSON file; move it away"
                ) from None
        doc = {
            "target_file": str(target_file),
            "base_url": base_url,
            "model": model,
            "num_examples": num_examples,
            "examples": [f for f, _ in examples],
            "impressions": done,
        }
        todo = [(n, f) for n, f in targets if n not in done]
        failed = 0
        for name, findings in tqdm(
            todo, desc="impressions", disable=not show_progress, dynamic_ncols=True
        ):
            payload = {
                "model": model,
                "messages": build_messages(findings, examples),
                "temperature": temperature,
                "max_tokens": max_tokens,
                "seed": seed,
            }
            for attempt in range(retries):
                try:
                    done[name] = chat_completion(base_url, payload, api_key, timeout)
                    atomic_write_json(output_file, doc)
                    break
                except TransientError as exc:
                    if attempt + 1 == retries:
                        failed += 1
                        tqdm.write(f"skipped {name}: {exc}", file=sys.stderr)
                    else:
                        time.sleep(min(2.0**attempt, 10.0))
        atomic_write_json(output_file, doc)
    return {
        "generated": len(todo) - failed,
        "already_done": len(targets) - len(todo),
        "failed": failed,
    }


def main(args: argparse.Namespace) -> int:
    """ctclip-impressions: generate, then one line of counts; exit 1 if any request failed."""
    # The flags are run_impressions' own parameters, spelled the same.
    options = ("model", "num_examples", "api_key", "temperature", "max_tokens", "timeout", "seed")
    res = run_impressions(
        args.target_file, args.output_file, args.base_url, **{k: getattr(args, k) for k in options}
    )
    print(
        f"{args.output_file}: {res['generated']} generated, {res['already_done']} already done, "
        f"{res['failed']} failed"
    )
    return 0 if not res["failed"] else 1
