#!/usr/bin/env python3
"""Drives a running `ottkv serve` with the official `openai` client: model list, chat,
streamed chat, completions and streamed completions, greedy, each streamed answer equal to
the plain one. Usage: serve_openai_check.py http://127.0.0.1:PORT"""

import sys

import openai


def main() -> int:
    base = sys.argv[1].rstrip("/")
    client = openai.OpenAI(base_url=base + "/v1", api_key="sk-no-key-required")
    models = client.models.list()
    assert len(models.data) == 1, models
    model = models.data[0].id

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    chat = client.chat.completions.create(
        model=model, messages=messages, max_tokens=12, temperature=0
    )
    text = chat.choices[0].message.content
    assert isinstance(text, str) and text, chat
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in ("stop", "length"), chat
    assert chat.usage.completion_tokens > 0 and chat.usage.prompt_tokens > 0, chat.usage
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens

    parts, finish = [], None
    stream = client.chat.completions.create(
        model=model,
        messages=messages,
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            parts.append(c.delta.content or "")
            finish = c.finish_reason or finish
    assert "".join(parts) == text, (parts, text)
    assert finish == chat.choices[0].finish_reason, finish
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage

    prompt = "The capital of France is"
    comp = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0)
    ctext = comp.choices[0].text
    assert isinstance(ctext, str) and ctext, comp
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model=model, prompt=prompt, max_tokens=8, temperature=0, stream=True
        )
        if c.choices
    )
    assert streamed == ctext, (streamed, ctext)

    try:
        client.chat.completions.create(model=model, messages="not a list", max_tokens=1)
    except openai.BadRequestError as e:
        assert e.status_code == 400, e
    else:
        raise AssertionError("a bad request was accepted")
    print(f"openai client ok: chat {text!r}, completion {ctext!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
