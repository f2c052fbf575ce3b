"""Property-based fuzz over the OpenAPI spec: whatever JSON a client sends, nothing answers 5xx."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sdserver.settings import Limits

TINY_PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGNgYGAAAAAEAAH2FzhVAAAAAElFTkSuQmCC"
)
# Routes whose 5xx is their documented answer, not a fault.
_EXPECTED_5XX = {("POST", "/sdapi/v1/server-restart"): 501}

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(["", "-1", "Euler a", "DPM++ 2M Karras", "karras", "png", "data:image/png;base64,AAAA", "1e9"]),
)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)


def _resolve(spec, schema):
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[-1]
        schema = spec["components"]["schemas"][name]
    return schema


def operations(spec):
    ops = []
    for path, items in spec["paths"].items():
        for method, op in items.items():
            body = op.get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
            props = sorted(_resolve(spec, body).get("properties", {})) if body else []
            query = [p["name"] for p in op.get("parameters", []) if p["in"] == "query"]
            ops.append((method.upper(), path, props, query, body is not None))
    return ops


@pytest.fixture
def fuzz_client(make_client):
    # Tiny limits keep every accepted generation cheap.
    return make_client(limits=Limits(max_width=64, max_height=64, max_pixels=64 * 64, max_steps=3, max_batch=2),
                       api_server_stop=False)


_GENERATION = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img", "/sdserver/v1/jobs/txt2img", "/sdserver/v1/jobs/img2img")


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_no_route_answers_5xx_to_any_json(fuzz_client, data):
    fuzz_one(fuzz_client, data, operations(fuzz_client.app.openapi()))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_generation_routes_never_answer_5xx(fuzz_client, data):
    ops = [op for op in operations(fuzz_client.app.openapi()) if op[1] in _GENERATION]
    assert len(ops) == len(_GENERATION)
    fuzz_one(fuzz_client, data, ops)


def fuzz_one(fuzz_client, data, ops):
    method, path, props, query, has_body = data.draw(st.sampled_from(ops))
    concrete = re.sub(r"\{[^}]+\}", data.draw(st.text(alphabet="abc123()-", min_size=1, max_size=8)), path)
    params = {name: data.draw(st.sampled_from(["true", "false", "1", "x"])) for name in query}
    kwargs = {}
    if has_body:
        # A cheap valid generation with one field replaced: reaches deep into translate and the queue.
        base = {"steps": 1, "width": 16, "height": 16, "init_images": [TINY_PNG]}
        one_field = st.sampled_from(props or ["x"]).flatmap(
            lambda name: json_values.map(lambda value: {**base, name: value})
        )
        body = data.draw(
            st.one_of(
                one_field,  # listed three times: most draws should get past validation
                one_field,
                one_field,
                st.fixed_dictionaries({}, optional={name: json_values for name in props}),
                json_values,
            )
        )
        kwargs["json"] = body
    r = fuzz_client.request(method, concrete, params=params, **kwargs)
    expected = _EXPECTED_5XX.get((method, path))
    assert r.status_code < 500 or r.status_code == expected, (method, concrete, kwargs, r.status_code, r.text)
