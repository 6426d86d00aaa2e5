"""`onebox report`: one self-contained HTML page from the real doctor, plan, tune and
ledger of a box, with a load test's figures and chart."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

from daemons.ledger import CallRecord, Ledger
from tests.harness import write_config

PNG = base64.b64decode(  # a 1x1 PNG: the report embeds whatever chart it is given
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def record(ledger: Ledger, provider: str, principal: str) -> None:
    ledger.record(CallRecord(request_id=f"r-{provider}-{principal}", at=time.time(), principal=principal,
                             principal_class="interactive", model="m", provider=provider, served_by="m",
                             kind="chat", prompt_tokens=10, completion_tokens=5, cached_tokens=0, cost=0.001,
                             ttft_s=0.1, duration_s=0.5, status=200, error=None))


def test_report_has_every_section_and_says_what_left_the_box(tmp_path: Path) -> None:
    config = write_config(tmp_path, extra=(
        '[principals.alice]\nlocal_only = true\nbudget = 5.0\n'
        '[providers.openai]\nbase_url = "https://api.openai.com/v1"\n'
        '[remote_models.gpt]\nprovider = "openai"\n[collections.docs]\n'))
    ledger = Ledger(tmp_path / "state" / "ledger.db")
    ledger.open()
    record(ledger, "local", "alice")
    record(ledger, "openai", "bob")
    ledger.close()
    loadtest = tmp_path / "lt.json"
    loadtest.write_text(json.dumps({"mix": "chat", "model": "smollm2", "broke_at": {"users": 16, "reason": "p99 e2e"},
                                    "steps": [{"users": 1, "requests": 10, "errors": 0, "tokens_per_s": 58.2,
                                               "ttft_s": {"p50": 0.12, "p99": 0.15}, "itl_ms": {"p50": 14, "p99": 21},
                                               "e2e_s": {"p50": 0.87, "p99": 1.12}}]}))
    chart = tmp_path / "lt.png"
    chart.write_bytes(PNG)
    out = tmp_path / "report.html"
    r = subprocess.run([sys.executable, "-m", "daemons.ctl.main", "report", str(out), "--config", str(config),
                        "--loadtest", str(loadtest), "--chart", str(chart)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    html = out.read_text()
    for heading in ("Host checks (onebox doctor)", "Memory plan (onebox plan)", "CPU placement (onebox tune)",
                    "Load test (onebox loadtest)", "Data protection (GDPR Article 28)"):
        assert heading in html, heading
    assert "transparent huge pages" in html  # a doctor check
    assert "KV per" in html  # the plan of the configured model
    assert "it broke at 16 users" in html and "58.2" in html
    assert "data:image/png;base64," + base64.b64encode(PNG).decode() in html
    # Egress from the ledger: the provider, not the local call.
    egress = html[html.index("Did any request leave the box?"):]
    assert "openai" in egress and "Yes" in egress
    # alice is local_only: she may not use the remote model; bob (default) may.
    row = html[html.index("<td>alice</td>"):].split("</tr>")[0]
    assert "smollm2" in row and "gpt" not in row
    assert str(tmp_path / "state" / "ledger.db") in html
    assert "<script" not in html  # self-contained and inert


def test_report_help() -> None:
    r = subprocess.run([sys.executable, "-m", "daemons.ctl.main", "report", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "GDPR" in r.stdout
