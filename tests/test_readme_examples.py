"""The README's examples work as written: every fenced block marked ``<!-- tested: tests/test_readme_examples.py -->``
runs here against the real stack — Redis, a moto S3 server over HTTP, a real ``genq worker``, a real webhook
receiver — and the curl flow in real bash with real ``curl``, ``genq keys create`` and ``genq api`` (uvicorn).

What a reader would change is all that changes: the API's port (8000 may be taken; a free one instead) and the
callback host the README asks to replace (``YOUR-RECEIVER``). The environment is what the README's Queue mode
exports, pointed at the test stack. One addition: after ``genq api … &`` the script waits for the server to answer,
as a reader typing the next command would have.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from stack import AWS_ENV, LOOPBACK_ALLOWED, Stack, wait_until
from stack_fixtures import model_root, module_worker, stack
from webhook_receiver import WebhookReceiver
from worker_process import WorkerProcess

__all__ = ["model_root", "module_worker", "stack"]

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
MARKER = "<!-- tested: tests/test_readme_examples.py -->"
API_PORT = 8000  # the port the README's HTTP API examples use
RECEIVER_PLACEHOLDER = "https://YOUR-RECEIVER/hooks/genq"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@dataclass(frozen=True)
class Block:
    """A tested fenced block of the README, and the output it shows (the plain fenced block right after it)."""

    lang: str
    code: str
    line: int  # 1-based, of the opening fence
    output: str | None


def marked_blocks(text: str) -> list[Block]:
    """The fenced blocks of ``text`` that follow :data:`MARKER`, in order."""
    lines = text.splitlines()
    blocks = []
    for i, line in enumerate(lines):
        if line.strip() != MARKER:
            continue
        fence = i + 1
        assert lines[fence].startswith("```") and lines[fence] != "```", f"README.md:{fence + 1}: no fenced block"
        end = lines.index("```", fence + 1)
        after = end + 1
        while after < len(lines) and not lines[after].strip():
            after += 1
        output = None
        if after < len(lines) and lines[after] == "```":  # a plain block: what the example prints
            output = "\n".join(lines[after + 1 : lines.index("```", after + 1)])
        blocks.append(Block(lines[fence][3:].strip(), "\n".join(lines[fence + 1 : end]), fence + 1, output))
    return blocks


BLOCKS = marked_blocks(README.read_text(encoding="utf-8"))
PYTHON = [block for block in BLOCKS if block.lang == "python"]
BASH = [block for block in BLOCKS if block.lang == "bash"]


# --- without the stack ----------------------------------------------------------------------------------------


def test_marked_blocks_finds_marked_blocks_and_the_output_they_show() -> None:
    text = f"intro\n\n{MARKER}\n```bash\necho hi\n```\n\n```\nhi\n```\n\n```python\nnot marked\n```\n"
    assert marked_blocks(text) == [Block("bash", "echo hi", 4, "hi")]


def test_the_readme_marks_its_python_example_and_curl_flow_for_this_test() -> None:
    assert len(PYTHON) == 2 and len(BASH) == 2, [(b.lang, b.line) for b in BLOCKS]
    # Every Python example of the README runs here.
    assert README.read_text(encoding="utf-8").count("```python") == len(PYTHON)
    for block in PYTHON:
        compile(block.code, f"README.md:{block.line}", "exec")
    assert RECEIVER_PLACEHOLDER in PYTHON[1].code
    for block in BLOCKS:  # a made-up host the reader is not told to replace is refused at submit (it never resolves)
        assert not re.search(r"://[^/\s'\"]+\.example\b", block.code), f"README.md:{block.line}"
    assert "KEY=$(genq keys create" in BASH[0].code, "the flow must set $KEY before it uses it"
    assert "curl -si" in BASH[0].code and BASH[0].output, "headers are shown: curl -i prints them"
    for block in BASH:
        bash = subprocess.run(["bash", "-n"], input=block.code, capture_output=True, text=True)
        assert bash.returncode == 0, f"README.md:{block.line}: {bash.stderr}"


# --- against the real stack -----------------------------------------------------------------------------------


@pytest.fixture
def reader_env(stack: Stack) -> dict[str, str]:
    """What a reader has set after the README's Queue mode (and allow-listing their loopback receiver)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GENQ_", "AWS_"))}
    env.update(AWS_ENV)
    env.update(
        {
            "AWS_ENDPOINT_URL": stack.s3_endpoint,
            "GENQ_REDIS__URL": stack.redis_url,
            "GENQ_S3__BUCKET": stack.bucket,
            "GENQ_WEBHOOK__ALLOW_HOSTS": json.dumps(LOOPBACK_ALLOWED),
            # `genq`, `python` and `curl` as the reader's shell finds them: this virtualenv first.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
    )
    return env


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.integration
def test_the_python_example_and_its_callback_run_as_written(
    stack: Stack,
    module_worker: WorkerProcess,
    reader_env: dict[str, str],
    webhook_receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [n for n in os.environ if n.startswith(("GENQ_", "AWS_"))]:
        monkeypatch.delenv(name)
    for name, value in reader_env.items():
        monkeypatch.setenv(name, value)
    namespace: dict[str, Any] = {"__name__": "readme"}
    exec(compile(PYTHON[0].code, f"README.md:{PYTHON[0].line}", "exec"), namespace)

    view, urls = namespace["view"], namespace["urls"]
    assert view.status == "succeeded", view.error
    assert len(urls) == len(view.outputs) == 8
    for output, url in zip(view.outputs, urls, strict=True):
        fetched = httpx.get(url, timeout=10)  # a presigned URL: no credentials needed
        assert fetched.status_code == 200 and fetched.content.startswith(PNG_MAGIC)
        assert _sha256(fetched.content) == output.sha256

    # The callback example, with the receiver the README asks for in place of its placeholder.
    code = PYTHON[1].code.replace(RECEIVER_PLACEHOLDER, webhook_receiver.url)
    exec(compile(code, f"README.md:{PYTHON[1].line}", "exec"), namespace)
    job_id = namespace["job"].id
    assert namespace["client"].wait(job_id, timeout=60).status == "succeeded"

    def delivered_succeeded() -> bool:
        return any(r.json()["data"]["status"] == "succeeded" for r in webhook_receiver.received)

    wait_until(delivered_succeeded, 30, "the succeeded callback")
    events = [r.json() for r in webhook_receiver.received]
    assert all(r.verified for r in webhook_receiver.received), [r.verify_error for r in webhook_receiver.received]
    assert {event["data"]["id"] for event in events} == {job_id}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _script(blocks: list[Block], port: int) -> str:
    """The README's bash blocks as one shell session, on ``port``, waiting for the API it starts in the background."""
    lines = ["set -euo pipefail", "trap 'kill $(jobs -p) 2>/dev/null; wait' EXIT"]  # stop `genq api … &` at the end
    started = False
    for block in blocks:
        code = block.code.replace(f"localhost:{API_PORT}", f"localhost:{port}")
        code = code.replace(f"--port {API_PORT}", f"--port {port}")
        for line in code.splitlines():
            lines.append(line)
            if re.match(r"genq api .*&\s*(#.*)?$", line):
                # Until it answers; give up if it exited (its error is on stderr).
                lines.append(
                    f"until curl -s -o /dev/null localhost:{port}/healthz; do kill -0 $! || exit 1; sleep 0.1; done"
                )
                started = True
    assert started, "the flow should start the API with `genq api --port 8000 &`"
    assert str(API_PORT) not in "\n".join(lines), "every use of port 8000 should have been substituted"
    return "\n".join(lines) + "\n"


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Any]:
    """Run a bash script in ``tmp_path`` in a process group of its own, stopped (with what it left in the background)
    after the test; returns (exit code, stdout, stderr)."""
    procs: list[subprocess.Popen[bytes]] = []

    def run(script: str, env: dict[str, str], timeout: float = 60) -> tuple[int, bytes, str]:
        proc = subprocess.Popen(
            ["bash", "-c", script],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        procs.append(proc)
        out, err = proc.communicate(timeout=timeout)
        return proc.returncode, out, err.decode(errors="replace")

    yield run
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # only what this test started: the script's own process group
        except ProcessLookupError:
            pass


def _response(out: str) -> tuple[str, list[tuple[str, str]], dict[str, Any], int]:
    """(status line, headers, JSON body, where the body ends) of the first response ``curl -si`` printed."""
    start = out.index("HTTP/1.1 ")
    head, _, _ = out[start:].partition("\r\n\r\n")
    status, *header_lines = head.split("\r\n")
    headers = [(name.lower(), value) for name, _, value in (h.partition(": ") for h in header_lines)]
    body_start = start + len(head) + 4
    body, end = json.JSONDecoder().raw_decode(out, body_start)
    return status, headers, body, end


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("curl") is None, reason="the README's flow uses curl")
def test_the_curl_flow_runs_as_written_and_prints_what_the_readme_shows(
    stack: Stack, module_worker: WorkerProcess, reader_env: dict[str, str], shell: Any, tmp_path: Path
) -> None:
    port = _free_port()
    code, out_bytes, err = shell(_script(BASH, port), reader_env)
    out = out_bytes.decode(errors="replace")
    assert code == 0, f"exit {code}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"

    # `genq keys create` told the reader about the key and the tenant's webhook secret on stderr, not in $KEY.
    assert "API key for tenant" in err and "webhook signing secret" in err

    status, headers, body, end = _response(out)
    shown = BASH[0].output or ""
    shown_status, *shown_rest = shown.splitlines()
    assert status == shown_status == "HTTP/1.1 202 Accepted"
    shown_headers = [line.split(": ", 1) for line in shown_rest if re.match(r"^[a-z-]+: ", line)]
    assert [name for name, _ in shown_headers] == [name for name, _ in headers], out[:end]
    assert dict(headers)["location"] == f"/v1/jobs/{body['id']}"
    # Every field the README shows, with the same value (the id and times differ per run).
    for key, value in re.findall(r'"(\w+)":("[^"]*"|-?\d+|null|true|false|\[\]|\{[^{}]*\})', shown):
        if key not in ("id", "created_at"):
            assert body[key] == json.loads(value), f"README shows {key}={value}, the API answered {body[key]!r}"

    # Then the job's events until it ended, and its first image in ./0.png.
    events = [json.loads(line[len("data: ") :]) for line in out[end:].splitlines() if line.startswith("data: ")]
    assert events and events[-1]["status"] == "succeeded", events[-1:]
    final = events[-1]
    assert final["id"] != body["id"] and final["progress"] == {"done": 2, "total": 2}
    image = (tmp_path / "0.png").read_bytes()
    assert image.startswith(PNG_MAGIC) and _sha256(image) == final["outputs"][0]["sha256"]
