"""Every script in examples/ runs to completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

import pytest

EXAMPLES = sorted((Path(__file__).resolve().parent.parent / "examples").glob("*.py"))
NEEDS_A_SERVICE = {"stripe_top_up.py"}
"""Examples that call a payment provider: run against a local fake of it, below."""
SELF_CONTAINED = [path for path in EXAMPLES if path.name not in NEEDS_A_SERVICE]


def _run(script: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """Run an example from a scratch working directory, with `env` added to the environment."""
    return subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1", **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.parametrize("script", SELF_CONTAINED, ids=[path.name for path in SELF_CONTAINED])
def test_example_runs(script: Path, tmp_path: Path) -> None:
    """The script exits with status 0, run from a scratch working directory."""
    completed = _run(script, tmp_path)

    assert 0 == completed.returncode, completed.stdout + completed.stderr


def test_gateway_example_runs_on_sqlite(tmp_path: Path) -> None:
    """The gateway example takes a store URL and runs on SQLite too."""
    pytest.importorskip("aiosqlite")
    script = next(path for path in EXAMPLES if path.name == "gateway.py")
    completed = subprocess.run(
        [sys.executable, str(script), f"sqlite:///{tmp_path / 'gateway.db'}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert 0 == completed.returncode, completed.stdout + completed.stderr
    assert "books: no hold left open" in completed.stdout


# -- the Stripe example, against a local fake of the PaymentIntents endpoint -------------------


class FakeStripe(ThreadingHTTPServer):
    """``POST /v1/payment_intents`` as Stripe answers it for a card that pays off-session:
    a succeeded PaymentIntent, the same one again for a repeated idempotency key."""

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _StripeHandler)
        self.requests: list[tuple[dict[str, str], dict[str, str]]] = []
        self.intents: dict[str, dict[str, Any]] = {}
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host!s}:{port}"


class _StripeHandler(BaseHTTPRequestHandler):
    server: FakeStripe

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        form = dict(parse_qsl(self.rfile.read(length).decode(), keep_blank_values=True))
        headers = {name.lower(): value for name, value in self.headers.items()}
        with self.server.lock:
            self.server.requests.append((headers, form))
            if self.path != "/v1/payment_intents":
                self._reply(404, {"error": {"type": "invalid_request_error", "message": "?"}})
                return
            if headers.get("authorization") != "Bearer sk_test_fake":
                self._reply(401, {"error": {"type": "invalid_request_error", "message": "key"}})
                return
            key = headers.get("idempotency-key", "")
            intent = self.server.intents.get(key)
            if intent is None:
                intent = {
                    "id": f"pi_fake_{len(self.server.intents) + 1}",
                    "object": "payment_intent",
                    "amount": int(form["amount"]),
                    "currency": form["currency"],
                    "customer": form.get("customer"),
                    "payment_method": form.get("payment_method"),
                    "status": "succeeded",
                    "livemode": False,
                    "metadata": {
                        name[len("metadata[") : -1]: value
                        for name, value in form.items()
                        if name.startswith("metadata[")
                    },
                }
                self.server.intents[key] = intent
        self._reply(200, intent)

    def _reply(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Request-Id", "req_fake")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def fake_stripe() -> Iterator[FakeStripe]:
    """A fake of Stripe's PaymentIntents endpoint on 127.0.0.1, in a thread."""
    server = FakeStripe()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_stripe_top_up_example_runs_against_a_fake_stripe(
    fake_stripe: FakeStripe, tmp_path: Path
) -> None:
    """The Stripe example tops up four times (the monthly limit), each an off-session
    PaymentIntent of 500 cents confirmed at once, keyed by its claim id; then the user runs
    out."""
    pytest.importorskip("stripe")
    script = next(path for path in EXAMPLES if path.name == "stripe_top_up.py")
    completed = _run(
        script,
        tmp_path,
        STRIPE_API_KEY="sk_test_fake",
        STRIPE_API_BASE=fake_stripe.url,
        STRIPE_CUSTOMER="cus_alice",
        STRIPE_PAYMENT_METHOD="pm_alice_card",
    )

    assert 0 == completed.returncode, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    assert [
        f"top-up: +5000 credits for alice (payment pi_fake_{n}, {5000 * n} this month)"
        for n in range(1, 5)
    ] == [line for line in lines if line.startswith("top-up")]
    assert "run 27 refused: alice is out of credits" in lines
    assert "alice: 0 credits left after 26 runs" == lines[-1]
    assert 4 == len(fake_stripe.requests)
    keys = [headers["idempotency-key"] for headers, _ in fake_stripe.requests]
    assert 4 == len(set(keys))
    for headers, form in fake_stripe.requests:
        assert headers["idempotency-key"] == form["metadata[claim_id]"]
        assert ("500", "usd", "true", "true") == (
            form["amount"],
            form["currency"],
            form["off_session"],
            form["confirm"],
        )
        assert ("cus_alice", "pm_alice_card") == (form["customer"], form["payment_method"])
        assert ("alice", "5000") == (form["metadata[user_id]"], form["metadata[credits]"])


def test_stripe_top_up_example_needs_a_key(tmp_path: Path) -> None:
    """Without STRIPE_API_KEY the Stripe example says what it needs and calls nobody."""
    pytest.importorskip("stripe")
    script = next(path for path in EXAMPLES if path.name == "stripe_top_up.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith("STRIPE_")}
    completed = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )

    assert 1 == completed.returncode
    assert "STRIPE_API_KEY" in completed.stderr
