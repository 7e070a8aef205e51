"""The http tool against a real hypercorn server on a loopback port chosen by the OS."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any
from urllib.parse import parse_qsl

import pytest
import trio
from hypercorn.config import Config
from hypercorn.trio import serve

from noetl_worker.errors import ToolConfigError
from noetl_worker.tools import http
from noetl_worker.tools.base import ToolResources

from .tool_support import make_ctx

PNG = b"\x89PNG\r\n\x1a\n\x00\xff\xfe"


async def _send(send: Any, status: int, body: bytes, content_type: str, **extra: str) -> None:
    headers = [(b"content-type", content_type.encode())]
    headers += [(k.replace("_", "-").encode(), v.encode()) for k, v in extra.items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    path = scope["path"]
    if path == "/echo":
        echo = {
            "method": scope["method"],
            "query": parse_qsl(scope["query_string"].decode(), keep_blank_values=True),
            "headers": {k.decode(): v.decode() for k, v in scope["headers"]},
            "body": body.decode("utf-8", "replace"),
        }
        await _send(send, 200, json.dumps(echo).encode(), "application/json")
    elif path == "/text":
        await _send(send, 200, "héllo".encode(), "text/plain; charset=utf-8")
    elif path == "/binary":
        await _send(send, 200, PNG, "image/png")
    elif path.startswith("/status/"):
        await _send(send, int(path.rsplit("/", 1)[1]), b'{"detail": "nope"}', "application/json")
    elif path == "/redirect":
        await _send(send, 302, b"", "text/plain", location="/echo")
    elif path == "/slow":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for _ in range(50):  # 10 s in total, one byte every 0.2 s
            await send({"type": "http.response.body", "body": b"x", "more_body": True})
            await trio.sleep(0.2)
        await send({"type": "http.response.body", "body": b""})


@pytest.fixture
async def base_url(nursery: trio.Nursery) -> str:
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    binds = await nursery.start(partial(serve, app, config, shutdown_trigger=trio.sleep_forever))
    return str(binds[0])


@pytest.fixture
async def resources() -> AsyncIterator[ToolResources]:
    shared = ToolResources()
    yield shared
    await shared.aclose()


async def _run(resources: ToolResources, **config: Any) -> Any:
    with trio.fail_after(10):
        return await http.run(config, make_ctx(resources))


async def test_post_json_echo(base_url: str, resources: ToolResources) -> None:
    result = await _run(resources, method="post", url=f"{base_url}/echo", json={"a": [1, 2]})
    assert result.status == "success"
    body = result.data["data"]
    assert body["method"] == "POST"
    assert json.loads(body["body"]) == {"a": [1, 2]}
    assert body["headers"]["content-type"] == "application/json"
    assert result.data["data"] == body
    assert result.data["status_code"] == 200
    assert result.data["url"] == f"{base_url}/echo"
    assert result.data["headers"]["content-type"] == "application/json"


async def test_params_stringified_nulls_dropped_lists_repeated(
    base_url: str, resources: ToolResources
) -> None:
    params = {"n": 3, "f": 1.5, "b": True, "none": None, "tags": ["x", "y"], "s": "a b"}
    result = await _run(resources, endpoint=f"{base_url}/echo", params=params)
    query = result.data["data"]["query"]
    assert query == [
        ["n", "3"],
        ["f", "1.5"],
        ["b", "true"],
        ["tags", "x"],
        ["tags", "y"],
        ["s", "a b"],
    ]


async def test_string_body_sent_raw(base_url: str, resources: ToolResources) -> None:
    result = await _run(
        resources,
        method="PUT",
        url=f"{base_url}/echo",
        body="<x/>",
        headers={"Content-Type": "application/xml"},
    )
    assert result.data["data"]["body"] == "<x/>"
    assert result.data["data"]["headers"]["content-type"] == "application/xml"


async def test_python_worker_data_rules(base_url: str, resources: ToolResources) -> None:
    got = await _run(resources, method="GET", url=f"{base_url}/echo", data={"q": "v"})
    assert got.data["data"]["query"] == [["q", "v"]]
    posted = await _run(resources, method="POST", url=f"{base_url}/echo", data={"q": "v"})
    assert json.loads(posted.data["data"]["body"]) == {"q": "v"}
    form = await _run(
        resources,
        method="POST",
        url=f"{base_url}/echo",
        data={"q": "v w"},
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert form.data["data"]["body"] == "q=v+w"
    multipart = await _run(
        resources,
        method="POST",
        url=f"{base_url}/echo",
        data={"q": "v"},
        headers={"Content-Type": "multipart/form-data"},
    )
    echoed = multipart.data["data"]
    assert echoed["headers"]["content-type"].startswith("multipart/form-data; boundary=")
    assert 'name="q"' in echoed["body"]
    split = await _run(
        resources,
        method="POST",
        url=f"{base_url}/echo",
        data={"query": {"page": 2}, "body": {"k": 1}},
    )
    assert split.data["data"]["query"] == [["page", "2"]]
    assert json.loads(split.data["data"]["body"]) == {"k": 1}


async def test_form_urlencoded(base_url: str, resources: ToolResources) -> None:
    result = await _run(resources, method="POST", url=f"{base_url}/echo", form={"a": 1})
    assert result.data["data"]["body"] == "a=1"


async def test_text_and_binary_bodies(base_url: str, resources: ToolResources) -> None:
    text = await _run(resources, url=f"{base_url}/text")
    assert text.data["data"] == "héllo"
    binary = await _run(resources, url=f"{base_url}/binary")
    assert binary.data["data"] == {"base64": base64.b64encode(PNG).decode(), "size": len(PNG)}
    forced = await _run(resources, url=f"{base_url}/echo", response_type="text")
    assert isinstance(forced.data["data"], str)
    assert json.loads(forced.data["data"])["method"] == "GET"


@pytest.mark.parametrize("code", [404, 500])
async def test_non_2xx_is_an_error_result_with_body(
    base_url: str, resources: ToolResources, code: int
) -> None:
    result = await _run(resources, url=f"{base_url}/status/{code}")
    assert result.status == "error"
    assert result.error == {404: "HTTP 404: Not Found", 500: "HTTP 500: Internal Server Error"}[code]
    assert result.data["status_code"] == code
    assert result.data["data"] == {"detail": "nope"}


async def test_total_deadline_stops_a_dribbling_response(base_url: str, resources: ToolResources) -> None:
    # Each byte arrives well within any per-read timeout; only a total deadline stops it.
    result = await _run(resources, url=f"{base_url}/slow", timeout_seconds=0.6)
    assert result.status == "timeout"
    assert "0.6 s" in (result.error or "")
    again = await _run(resources, url=f"{base_url}/text")  # the shared client still works
    assert again.status == "success"


async def test_redirects_followed_by_default_and_optionally_not(
    base_url: str, resources: ToolResources
) -> None:
    followed = await _run(resources, url=f"{base_url}/redirect")
    assert followed.data["url"] == f"{base_url}/echo"
    assert followed.data["status_code"] == 200
    kept = await _run(resources, url=f"{base_url}/redirect", follow_redirects=False)
    assert kept.data["status_code"] == 302
    assert kept.status == "error"


async def test_auth_headers(base_url: str, resources: ToolResources) -> None:
    ctx = make_ctx(resources, secrets={"api": "s3cret", "pw": "hunter2"})
    url = f"{base_url}/echo"
    configs: list[tuple[dict[str, Any], str, str]] = [
        ({"type": "bearer", "credential": "api"}, "authorization", "Bearer s3cret"),
        ({"type": "bearer", "token": "inline"}, "authorization", "Bearer inline"),
        ({"token": "implicit"}, "authorization", "Bearer implicit"),
        (
            {"type": "basic", "credential": "pw", "username": "ann"},
            "authorization",
            "Basic " + base64.b64encode(b"ann:hunter2").decode(),
        ),
        ({"type": "api_key", "credential": "api", "header": "X-Key"}, "x-key", "s3cret"),
        ({"type": "api_key", "credential": "api"}, "x-api-key", "s3cret"),
    ]
    for auth, header, expected in configs:
        with trio.fail_after(10):
            result = await http.run({"url": url, "auth": auth}, ctx)
        assert result.data["data"]["headers"][header] == expected, auth


async def test_auth_map_form_as_noetl_playbooks_write_it(base_url: str, resources: ToolResources) -> None:
    # What the worker hands the tool after resolving ``auth: {api: {type: bearer, key: <cred>}}``:
    # each entry carries its credential's fields.
    ctx = make_ctx(resources, secrets={"svc": "from-store"})
    url = f"{base_url}/echo"
    configs: list[tuple[dict[str, Any], str, str]] = [
        ({"api": {"type": "bearer", "token": "tok-1", "credential": "c1"}}, "authorization", "Bearer tok-1"),
        ({"api": {"type": "bearer", "credential": "svc"}}, "authorization", "Bearer from-store"),
        ({"k": {"type": "api_key", "header_name": "X-Svc", "value": "v-2"}}, "x-svc", "v-2"),
        (
            {"b": {"type": "basic", "username": "ann", "password": "pw"}},
            "authorization",
            "Basic " + base64.b64encode(b"ann:pw").decode(),
        ),
    ]
    for auth, header, expected in configs:
        with trio.fail_after(10):
            result = await http.run({"url": url, "auth": auth}, ctx)
        assert result.status == "success", result.error
        assert result.data["data"]["headers"][header] == expected, auth
    # Every entry applies; a map entry replaces a header the playbook set, as in noetl's worker.
    both = {
        "one": {"type": "api_key", "header_name": "X-One", "value": "1"},
        "two": {"type": "bearer", "token": "tok-2"},
    }
    with trio.fail_after(10):
        result = await http.run({"url": url, "auth": both, "headers": {"Authorization": "old"}}, ctx)
    headers = result.data["data"]["headers"]
    assert (headers["x-one"], headers["authorization"]) == ("1", "Bearer tok-2")


async def test_auth_map_entry_without_a_secret_names_the_entry(resources: ToolResources) -> None:
    with pytest.raises(ToolConfigError) as info:
        await http.run(
            {"url": "http://x", "auth": {"api": {"type": "bearer", "key": "cred"}}}, make_ctx(resources)
        )
    assert info.value.field == "auth.api"
    assert "key" in str(info.value)


async def test_rendering_applies_to_url_headers_params_and_body(
    base_url: str, resources: ToolResources
) -> None:
    values = {"{{ base }}": base_url, "{{ who }}": "ann"}

    def render(value: Any) -> Any:
        if isinstance(value, str):
            for key, replacement in values.items():
                value = value.replace(key, replacement)
            return value
        if isinstance(value, dict):
            return {k: render(v) for k, v in value.items()}
        return value

    ctx = make_ctx(resources, render=render)
    config = {
        "method": "POST",
        "endpoint": "{{ base }}/echo",
        "headers": {"X-Who": "{{ who }}"},
        "params": {"who": "{{ who }}"},
        "payload": {"who": "{{ who }}"},
    }
    with trio.fail_after(10):
        result = await http.run(config, ctx)
    echoed = result.data["data"]
    assert echoed["headers"]["x-who"] == "ann"
    assert echoed["query"] == [["who", "ann"]]
    assert json.loads(echoed["body"]) == {"who": "ann"}


async def test_transport_error_is_an_error_result(resources: ToolResources) -> None:
    with trio.socket.socket() as sock:  # a port nobody listens on
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await _run(resources, url=f"http://127.0.0.1:{port}/")
    assert result.status == "error"
    assert "ConnectError" in (result.error or "")


@pytest.mark.parametrize(
    ("config", "field", "accepted"),
    [
        ({}, "url", "http"),
        ({"url": "ftp://x"}, "url", "http(s)"),
        ({"url": "http://x", "method": "FETCH"}, "method", "GET, POST"),
        ({"url": "http://x", "response_type": "xml"}, "response_type", "json, text, binary"),
        ({"url": "http://x", "auth": {"type": "oauth"}}, "type", "bearer, basic"),
        ({"url": "http://x", "auth": {"type": "bearer", "credential": "gone"}}, "auth", "gone"),
        ({"url": "http://x", "timeout": -1}, "timeout", "seconds"),
    ],
)
async def test_config_errors_name_field_and_accepted_values(
    resources: ToolResources, config: dict[str, Any], field: str, accepted: str
) -> None:
    with pytest.raises(ToolConfigError) as info:
        await http.run(config, make_ctx(resources))
    assert info.value.field == field
    assert accepted in str(info.value)
