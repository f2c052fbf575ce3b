"""The A1111 edge: the only package that knows A1111's spellings.

Modules: `schemas` (pydantic request/response models), `names` (sampler/scheduler labels → internal ids),
`options` (A1111's option dict), `infotext` (writer, parser, png-info), `images` (base64 ↔ PIL),
`translate` (A1111 request ↔ GenerationRequest, result → response), `listings`, `progress`, `styles`.
`routes` wires them to FastAPI. Nothing here imports at package import time beyond this docstring.
"""
