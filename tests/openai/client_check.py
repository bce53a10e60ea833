"""The official `openai` Python client, unmodified, against a running
`tessera serve`: chat, streaming (a member and a system), completions,
models, embeddings and errors.

Run by `tests/all/serve.rs` (`make test`), which starts the server and
passes its address and an API key in TESSERA_BASE_URL / TESSERA_API_KEY.
Exits non-zero with the failing check's message on the first failure.
"""

import math
import os
import sys

import openai
from openai import OpenAI

BASE = os.environ["TESSERA_BASE_URL"]
KEY = os.environ["TESSERA_API_KEY"]
SMOL = "smollm2-135m-instruct"
QWEN = "qwen2.5-coder-0.5b-instruct"
MINILM = "all-minilm-l6-v2"

client = OpenAI(base_url=BASE, api_key=KEY, max_retries=0, timeout=600)


def check(cond, what):
    if not cond:
        print(f"FAILED: {what}", file=sys.stderr)
        sys.exit(1)
    print(f"ok: {what}")


# Models: members and systems, with Tessera's kind in the extension.
models = {m.id: m for m in client.models.list()}
check(SMOL in models and QWEN in models and MINILM in models, f"members listed: {sorted(models)}")
check("majority-vote" in models, "the standard system majority-vote is listed")
extra = models["majority-vote"].model_extra or {}
check(extra.get("tessera", {}).get("kind") == "system", f"majority-vote is a system: {extra}")

# Chat with one member.
r = client.chat.completions.create(
    model=QWEN,
    messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}],
    max_tokens=8,
    temperature=0,
)
text = r.choices[0].message.content
check("paris" in text.lower(), f"member chat answers: {text!r}")
check(r.usage.completion_tokens > 0 and r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens,
      f"usage adds up: {r.usage}")
prov = (r.model_extra or {}).get("provenance", {})
check(prov.get("members") == [QWEN], f"provenance names the member: {prov}")

# Chat with a system; its hyperparameters ride in extra_body.
r = client.chat.completions.create(
    model="majority-vote",
    messages=[{"role": "user", "content": "What is 2 + 2? Answer with a number."}],
    max_tokens=6,
    seed=1,
    extra_body={"tessera": {"k": 2}},
)
prov = (r.model_extra or {}).get("provenance", {})
check(len(prov.get("members", [])) >= 1 and len(prov.get("events", [])) >= 2,
      f"system provenance lists members and events: {prov.get('members')}")
check(r.choices[0].message.content is not None, "system chat answers")

# Streaming a member: several content chunks, then a finish reason, then usage.
chunks = list(client.chat.completions.create(
    model=SMOL,
    messages=[{"role": "user", "content": "Count from one to five."}],
    max_tokens=12,
    stream=True,
    stream_options={"include_usage": True},
))
pieces = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
check(len(pieces) >= 3, f"member streams token by token: {pieces}")
finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
check(finishes in (["length"], ["stop"]), f"one finish reason: {finishes}")
check(chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0, "usage chunk last")

# Streaming a system: the first event says it will not stream.
stream = client.chat.completions.create(
    model="majority-vote",
    messages=[{"role": "user", "content": "Name a colour."}],
    max_tokens=4,
    stream=True,
    extra_body={"tessera": {"k": 2}},
)
first = next(iter(stream))
note = (first.model_extra or {}).get("tessera", {})
check(note.get("streaming") == "final-answer", f"first event says the system does not stream: {note}")
rest = list(stream)
check(any(c.choices and c.choices[0].delta.content for c in rest), "the system's answer follows")

# Streaming a system whose strategy streams (mixture-of-agents writes its
# final answer through `output.generate-streamed`): the first event says
# tokens will come, the answer arrives in several pieces, and the pieces
# joined are the answer the same request gets unstreamed.
moa_ask = dict(
    model="mixture-of-agents",
    messages=[{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
    max_tokens=12,
    temperature=0,
    extra_body={"tessera": {"layers": 1}},
)
stream = client.chat.completions.create(stream=True, **moa_ask)
first = next(iter(stream))
note = (first.model_extra or {}).get("tessera", {})
check(note.get("streaming") == "tokens", f"first event says the system streams: {note}")
pieces = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
check(len(pieces) >= 3, f"the system streams its answer token by token: {pieces}")
whole = client.chat.completions.create(**moa_ask).choices[0].message.content
check("".join(pieces) == whole, f"streamed pieces {pieces!r} join to the unstreamed answer {whole!r}")

# Completions.
r = client.completions.create(model=SMOL, prompt="The capital of France is", max_tokens=4, temperature=0)
check(len(r.choices[0].text) > 0, f"completion: {r.choices[0].text!r}")

# Embeddings (the client asks for base64 unless told otherwise) and floats.
e = client.embeddings.create(model=MINILM, input=["a cat sat on the mat", "stock markets fell"])
v = e.data[0].embedding
check(len(e.data) == 2 and len(v) == 384, f"two 384-d embeddings: {len(e.data)} x {len(v)}")
check(abs(math.sqrt(sum(x * x for x in v)) - 1.0) < 1e-3, "embeddings are unit length")
f = client.embeddings.create(model=MINILM, input="a cat sat on the mat", encoding_format="float")
check(max(abs(a - b) for a, b in zip(f.data[0].embedding, v)) < 1e-6, "float and base64 agree")

# Errors map to the client's exception classes.
try:
    client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "x"}])
    check(False, "unknown model must fail")
except openai.NotFoundError as err:
    check(err.body.get("code") == "model_not_found", f"unknown model: 404 {err.body}")
try:
    client.chat.completions.create(model=SMOL, messages=[{"role": "user", "content": "x"}], temperature=99)
    check(False, "bad temperature must fail")
except openai.BadRequestError as err:
    check("temperature" in err.body.get("message", ""), f"bad temperature: 400 {err.body}")
try:
    client.embeddings.create(model=SMOL, input="x")
    check(False, "embedding with a generative member must fail")
except openai.BadRequestError as err:
    check("embed" in err.body.get("message", ""), f"wrong capability: 400 {err.body}")
try:
    OpenAI(base_url=BASE, api_key="tsk-wrong", max_retries=0).models.list()
    check(False, "a wrong key must fail")
except openai.AuthenticationError as err:
    check(err.status_code == 401, "wrong key: 401")
print("all openai client checks passed")
