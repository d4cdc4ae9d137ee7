"""A second client in another language: the official `openai` npm package on Node.js, against
the gateway, unchanged but for ``baseURL`` and the ``conversation`` field.

The package is installed once into a cache directory (``$GILAS_CONV_TEST_NPM_DIR``, else
``~/.cache/gilas-conv-tests/openai-node``) and reused; without Node.js, npm or the registry
the test is skipped, saying which.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from _gateway import UPSTREAM_KEY, GatewayServer

from gilas_conv import ConversationStore
from gilas_conv.store import APIKeys

API_KEY = UPSTREAM_KEY
# Major version 4 runs on the Node.js 18+ that distributions ship (5 and later need newer).
OPENAI_NPM = "openai@4"
# Read at import, before the tests' home directory is swapped for a temporary one.
NPM_DIR = Path(
    os.environ.get("GILAS_CONV_TEST_NPM_DIR") or Path.home() / ".cache" / "gilas-conv-tests" / "openai-node"
)
INSTALL_TIMEOUT_S = 180

SCRIPT = r"""
const OpenAI = require("openai");
const env = process.env;
const client = new OpenAI({ baseURL: env.GATEWAY_URL, apiKey: env.GATEWAY_KEY, maxRetries: 0 });
(async () => {
  const first = await client.chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "hello from node" }],
  });
  const conversation = first.conversation;
  const stream = await client.chat.completions.create({
    model: "gpt-4o-mini",
    messages: [{ role: "user", content: "and a stream" }],
    conversation,
    stream: true,
  });
  let streamed = "";
  const named = new Set();
  for await (const chunk of stream) {
    named.add(chunk.conversation);
    streamed += (chunk.choices[0] && chunk.choices[0].delta.content) || "";
  }
  const items = await client.get(`/conversations/${conversation}/items`, { query: { order: "asc" } });
  let refused = null;
  try {
    await client.chat.completions.create({
      model: "gpt-4o-mini",
      messages: [{ role: "user", content: "x" }],
      conversation: "no-such-conversation",
    });
  } catch (err) {
    refused = err.status;
  }
  console.log(JSON.stringify({
    conversation,
    first: first.choices[0].message.content,
    streamed,
    named: [...named],
    items: items.data.map((item) => item.role),
    refused,
  }));
})().catch((err) => {
  console.error(String(err));
  process.exit(1);
});
"""


@pytest.fixture(scope="session")
def openai_node() -> Path:
    """The directory whose node_modules holds the `openai` npm package (installed if missing)."""
    if shutil.which("node") is None or shutil.which("npm") is None:
        pytest.skip("Node.js or npm is not installed")
    if not (NPM_DIR / "node_modules" / "openai").is_dir():
        NPM_DIR.mkdir(parents=True, exist_ok=True)
        try:
            done = subprocess.run(
                [
                    "npm",
                    "install",
                    "--prefix",
                    str(NPM_DIR),
                    "--cache",
                    str(NPM_DIR / "npm-cache"),
                    "--no-audit",
                    "--no-fund",
                    "--silent",
                    OPENAI_NPM,
                ],
                capture_output=True,
                text=True,
                timeout=INSTALL_TIMEOUT_S,
            )
        except subprocess.TimeoutExpired:
            pytest.skip(f"npm install {OPENAI_NPM} took over {INSTALL_TIMEOUT_S} s (registry unreachable?)")
        if done.returncode != 0:
            pytest.skip(
                f"npm install {OPENAI_NPM} failed (registry unreachable?): {done.stderr.strip()[-300:]}"
            )
    return NPM_DIR


def test_the_openai_npm_package_keeps_a_conversation(
    openai_node: Path, gateway: GatewayServer, store: ConversationStore, tmp_path: Path
) -> None:
    key = APIKeys(store).create(owner="node")[0]
    script = tmp_path / "client.js"
    script.write_text(SCRIPT, encoding="utf-8")
    done = subprocess.run(
        ["node", str(script)],
        env={
            **os.environ,
            "NODE_PATH": str(openai_node / "node_modules"),
            "GATEWAY_URL": gateway.url,
            "GATEWAY_KEY": key,
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["first"] == "echo: hello from node"
    assert out["streamed"] == "echo: and a stream"
    assert out["named"] == [out["conversation"]]  # every chunk names the conversation
    assert out["items"] == ["user", "assistant", "user", "assistant"]
    assert out["refused"] == 404
    stored = [(m.role, m.content) for m in store.get(out["conversation"], owner="node").messages()]
    assert stored == [
        ("user", "hello from node"),
        ("assistant", "echo: hello from node"),
        ("user", "and a stream"),
        ("assistant", "echo: and a stream"),
    ]
