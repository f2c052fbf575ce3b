"""Score the demo model's prompt adherence through the real A1111 API.

    python -m sdserver.demo.evaluate [--checkpoint PATH] [--n 200] [--steps 20] [--cfg 7] \\
        [--sampler "Euler a"] [--size 128] [--seed 0] [--strength 0.7] [--threads 2]

Generates fixed prompt sets (sdserver.demo.prompts) through POST /sdapi/v1/txt2img and /img2img of an
in-process server (`create_app` + TestClient, so the whole stack is exercised), reads each picture back with the
pixel classifier, and prints:
- adherence per attribute (colour, shape, background, size, position), each beside the classifier's own
  accuracy on ground-truth renders, clean and degraded;
- the negative-prompt effect: P(colour red) for prompts without a colour, without and with the negative "red";
- img2img recolouring: "a red circle" init, prompt "a blue circle": the fraction recoloured to blue and the
  shape-mask IoU with the init (layout kept), beside the IoU txt2img gets with no init (chance);
and finally the figures as one JSON line.

Metrics are pure functions over (expected attributes, Prediction) pairs; generation is injected as two
callables, so the whole evaluation runs in tests against fakes.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import math
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Protocol, Sequence

import numpy as np
from PIL import Image

from sdserver.demo.classifier import (
    ATTRIBUTES,
    CLEAN,
    DEGRADED,
    Prediction,
    classify,
    shape_mask,
    validate,
)
from sdserver.demo.dataset import Colour, coverage, render_layout
from sdserver.demo.prompts import Case, adherence_cases, colourless_cases, recolour_cases

# --- pure metrics -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rate:
    hits: int
    total: int

    @property
    def value(self) -> float | None:
        return self.hits / self.total if self.total else None

    def as_json(self) -> dict[str, Any]:
        return {"rate": None if self.value is None else round(self.value, 4), "n": self.total}


def adherence(results: Sequence[tuple[Mapping[str, str], Prediction]]) -> dict[str, Rate]:
    """Per attribute, how often the picture shows what the prompt named, over the prompts that name it.
    A picture with no shape fails every shape attribute it was asked for."""
    rates: dict[str, Rate] = {}
    for attribute in ATTRIBUTES:
        asked = [(expected[attribute], predicted) for expected, predicted in results if attribute in expected]
        hits = sum(predicted.attributes().get(attribute) == value for value, predicted in asked)
        rates[attribute] = Rate(hits, len(asked))
    return rates


def breakdown(results: Sequence[tuple[Mapping[str, str], Prediction]], attribute: str) -> dict[str, Rate]:
    """Adherence of `attribute` split by the value asked for (e.g. how well "star" is drawn)."""
    groups: dict[str, list[tuple[Mapping[str, str], Prediction]]] = {}
    for expected, predicted in results:
        if attribute in expected:
            groups.setdefault(expected[attribute], []).append((expected, predicted))
    return {value: adherence(group)[attribute] for value, group in sorted(groups.items())}


def colour_rate(predictions: Sequence[Prediction], colour: str) -> Rate:
    """How many of the pictures show a shape of `colour`."""
    return Rate(sum(p.colour == colour for p in predictions), len(predictions))


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; two empty masks agree perfectly."""
    union = int(np.logical_or(a, b).sum())
    return int(np.logical_and(a, b).sum()) / union if union else 1.0


@dataclass(frozen=True)
class RecolourSummary:
    recoloured: Rate  # pictures whose shape has the target colour
    mean_iou: float  # shape mask vs the init image's
    baseline_iou: float | None  # the same, for txt2img pictures of the same prompt: what chance gives

    def as_json(self) -> dict[str, Any]:
        return {
            "recoloured": self.recoloured.as_json(),
            "mask_iou": round(self.mean_iou, 4),
            "txt2img_mask_iou": None if self.baseline_iou is None else round(self.baseline_iou, 4),
        }


def recolour_summary(
    target: str, outcomes: Sequence[tuple[Prediction, float]], baseline_ious: Sequence[float] = ()
) -> RecolourSummary:
    """From (prediction, IoU with the init mask) per img2img picture."""
    return RecolourSummary(
        recoloured=colour_rate([p for p, _ in outcomes], target),
        mean_iou=float(np.mean([iou for _, iou in outcomes])) if outcomes else math.nan,
        baseline_iou=float(np.mean(baseline_ious)) if baseline_ious else None,
    )


# --- running ------------------------------------------------------------------------------------------


class Txt2Img(Protocol):
    def __call__(
        self, prompt: str, negative_prompt: str, seed: int, width: int, height: int, steps: int, cfg: float,
        sampler: str,
    ) -> Image.Image: ...


class Img2Img(Protocol):
    def __call__(
        self, init_image: Image.Image, prompt: str, negative_prompt: str, seed: int, width: int, height: int,
        steps: int, cfg: float, sampler: str, strength: float,
    ) -> Image.Image: ...


@dataclass(frozen=True)
class EvalConfig:
    n: int = 200
    steps: int = 20
    cfg: float = 7.0
    sampler: str = "Euler a"
    size: int = 128
    seed: int = 0
    strength: float = 0.7
    negative: str = "red"
    n_negative: int | None = None  # None: n // 2
    n_recolour: int | None = None  # None: max(10, n // 5)
    n_validate: int = 300  # ground-truth renders the classifier is checked on
    # Ground-truth renders sent through img2img at a strength so low (2 steps at the smallest noise levels)
    # that the result is essentially the model's VAE round trip: what its decoder lets it draw at best.
    n_roundtrip: int | None = None  # None: n_validate // 3
    roundtrip_strength: float = 0.05

    @property
    def negative_count(self) -> int:
        return self.n // 2 if self.n_negative is None else self.n_negative

    @property
    def roundtrip_count(self) -> int:
        return self.n_validate // 3 if self.n_roundtrip is None else self.n_roundtrip

    @property
    def recolour_count(self) -> int:
        return max(10, self.n // 5) if self.n_recolour is None else self.n_recolour


@dataclass(frozen=True)
class Report:
    config: EvalConfig
    adherence: dict[str, Rate]
    by_colour: dict[str, Rate]
    by_shape: dict[str, Rate]
    classifier_clean: dict[str, float]
    classifier_degraded: dict[str, float]
    classifier_roundtrip: dict[str, float] | None
    negative_without: Rate
    negative_with: Rate
    no_foreground: Rate  # adherence pictures with no shape in them (unreadable ones included)
    unreadable: Rate  # adherence pictures that are not a shape on a background at all
    recolour: RecolourSummary | None
    recolour_error: str | None = None
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        def rates(d: Mapping[str, Rate]) -> dict[str, Any]:
            return {k: v.as_json() for k, v in d.items()}

        return {
            "config": asdict(self.config),
            "adherence": rates(self.adherence),
            "by_colour": rates(self.by_colour),
            "by_shape": rates(self.by_shape),
            "classifier_clean": {k: round(v, 4) for k, v in self.classifier_clean.items()},
            "classifier_degraded": {k: round(v, 4) for k, v in self.classifier_degraded.items()},
            "classifier_roundtrip": None if self.classifier_roundtrip is None else {
                k: round(v, 4) for k, v in self.classifier_roundtrip.items()
            },
            "negative": {
                "colour": self.config.negative,
                "without": self.negative_without.as_json(),
                "with": self.negative_with.as_json(),
            },
            "no_foreground": self.no_foreground.as_json(),
            "unreadable": self.unreadable.as_json(),
            "img2img_recolour": self.recolour.as_json() if self.recolour else {"error": self.recolour_error},
            "seconds": round(self.seconds, 1),
        }


class GenerationFailed(RuntimeError):
    """The server answered a generation request with an error."""


def _settings(config: EvalConfig) -> dict[str, Any]:
    return {
        "width": config.size, "height": config.size, "steps": config.steps, "cfg": config.cfg,
        "sampler": config.sampler,
    }


ImageSink = Callable[[Case, Image.Image], None]


def _score(
    config: EvalConfig, generate: Txt2Img, cases: Sequence[Case], negative: str, log: Callable[[str], None],
    label: str, sink: ImageSink | None = None,
) -> list[Prediction]:
    predictions = []
    started = time.monotonic()
    for i, case in enumerate(cases):
        image = generate(prompt=case.prompt, negative_prompt=negative, seed=case.seed, **_settings(config))
        predictions.append(classify(image))
        if sink is not None:
            sink(case, image)
        if (i + 1) % 25 == 0 or i + 1 == len(cases):
            log(f"  {label}: {i + 1}/{len(cases)} ({time.monotonic() - started:.0f} s)")
    return predictions


def evaluate(
    config: EvalConfig,
    txt2img: Txt2Img,
    img2img: Img2Img | None,
    log: Callable[[str], None] = lambda _: None,
    sink: ImageSink | None = None,
) -> Report:
    """Run every prompt set through the generators and score the pictures. `sink` sees each adherence
    picture with its case (to save a sample grid, say)."""
    started = time.monotonic()
    log("classifier on ground truth")
    clean = validate(config.n_validate, config.size, config.seed, CLEAN)
    degraded = validate(config.n_validate, config.size, config.seed, DEGRADED)

    cases = adherence_cases(config.n, config.seed)
    predictions = _score(config, txt2img, cases, "", log, "adherence", sink)
    results = [(case.expected, prediction) for case, prediction in zip(cases, predictions)]

    colourless = colourless_cases(config.negative_count, config.seed, avoid=Colour(config.negative))
    without = _score(config, txt2img, colourless, "", log, "no negative")
    with_negative = _score(config, txt2img, colourless, config.negative, log, f"negative {config.negative!r}")

    recolour, recolour_error, roundtrip = None, "no img2img generator", None
    if img2img is not None:
        try:
            log("classifier on img2img round trips")
            roundtrip = _roundtrip(config, img2img)
            recolour, recolour_error = _recolour(config, txt2img, img2img, log), None
        except GenerationFailed as exc:
            recolour_error = str(exc)

    return Report(
        config=config,
        adherence=adherence(results),
        by_colour=breakdown(results, "colour"),
        by_shape=breakdown(results, "shape"),
        classifier_clean=clean,
        classifier_degraded=degraded,
        classifier_roundtrip=roundtrip,
        negative_without=colour_rate(without, config.negative),
        negative_with=colour_rate(with_negative, config.negative),
        no_foreground=Rate(sum(not p.has_foreground for p in predictions), len(predictions)),
        unreadable=Rate(sum(not p.readable for p in predictions), len(predictions)),
        recolour=recolour,
        recolour_error=recolour_error,
        seconds=time.monotonic() - started,
    )


def _roundtrip(config: EvalConfig, img2img: Img2Img) -> dict[str, float]:
    def through_model(image: np.ndarray) -> np.ndarray:
        out = img2img(init_image=Image.fromarray(image), prompt="", negative_prompt="", seed=config.seed,
                      strength=config.roundtrip_strength, **_settings(config))
        return np.asarray(out.convert("RGB"))

    return validate(config.roundtrip_count, config.size, config.seed, CLEAN, transform=through_model)


def _recolour(config: EvalConfig, txt2img: Txt2Img, img2img: Img2Img, log: Callable[[str], None]
              ) -> RecolourSummary:
    cases = recolour_cases(config.recolour_count, config.seed)
    outcomes: list[tuple[Prediction, float]] = []
    baseline: list[float] = []
    for i, case in enumerate(cases):
        init = Image.fromarray(render_layout(case.init, case.layout, config.size))
        init_mask = coverage(case.init.shape, case.layout, config.size) > 0.5
        out = img2img(init_image=init, prompt=case.prompt, negative_prompt="", seed=case.seed,
                      strength=config.strength, **_settings(config))
        outcomes.append((classify(out), mask_iou(shape_mask(out), init_mask)))
        plain = txt2img(prompt=case.prompt, negative_prompt="", seed=case.seed, **_settings(config))
        baseline.append(mask_iou(shape_mask(plain), init_mask))
        if (i + 1) % 10 == 0 or i + 1 == len(cases):
            log(f"  img2img: {i + 1}/{len(cases)}")
    return recolour_summary(str(cases[0].target) if cases else "", outcomes, baseline)


# --- printing -----------------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "  -  " if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


def format_report(report: Report) -> str:
    c = report.config
    lines = [
        f"demo model evaluation: {c.n} prompts, {c.size}x{c.size}, {c.steps} steps, cfg {c.cfg:g}, "
        f"{c.sampler}, seed {c.seed}",
        "",
        f"{'attribute':<11}{'prompts':>8}{'adherence':>11}   classifier on ground truth: "
        f"clean / degraded / model round trip",
    ]
    roundtrip = report.classifier_roundtrip or {}
    for attribute in ATTRIBUTES:
        rate = report.adherence[attribute]
        lines.append(
            f"{attribute:<11}{rate.total:>8}{_fmt(rate.value):>11}   "
            f"{_fmt(report.classifier_clean[attribute])} / {_fmt(report.classifier_degraded[attribute])} / "
            f"{_fmt(roundtrip.get(attribute))}"
        )
    lines.append("")
    lines.append("colour by value: " + ", ".join(f"{k} {_fmt(v.value)}" for k, v in report.by_colour.items()))
    lines.append("shape by value:  " + ", ".join(f"{k} {_fmt(v.value)}" for k, v in report.by_shape.items()))
    lines.append(
        f"no shape drawn: {_fmt(report.no_foreground.value)} of {report.no_foreground.total} "
        f"(not a shapes picture at all: {_fmt(report.unreadable.value)})"
    )
    lines.append("")
    lines.append(
        f"negative prompt {c.negative!r} on {report.negative_with.total} prompts without a colour: "
        f"P({c.negative}) {_fmt(report.negative_without.value)} without, {_fmt(report.negative_with.value)} with"
    )
    if report.recolour is not None:
        r = report.recolour
        lines.append(
            f"img2img 'a red circle' -> 'a blue circle' at strength {c.strength:g}, {r.recoloured.total} images: "
            f"recoloured {_fmt(r.recoloured.value)}, mask IoU with init {_fmt(r.mean_iou)} "
            f"(txt2img, no init: {_fmt(r.baseline_iou)})"
        )
    else:
        lines.append(f"img2img recolouring: not measured ({report.recolour_error})")
    lines.append(f"({report.seconds:.0f} s)")
    return "\n".join(lines)


def grid(images: Sequence[Image.Image], columns: int = 8) -> Image.Image:
    """Images of one size tiled row by row."""
    width, height = images[0].size
    rows = -(-len(images) // columns)
    sheet = Image.new("RGB", (width * min(columns, len(images)), height * rows), "white")
    for i, image in enumerate(images):
        sheet.paste(image.convert("RGB"), ((i % columns) * width, (i // columns) * height))
    return sheet


# --- the real server ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Generators:
    txt2img: Txt2Img
    img2img: Img2Img


def _encode_png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _decode_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


def _post(client: Any, route: str, body: dict[str, Any]) -> Image.Image:
    response = client.post(route, json=body)
    if response.status_code != 200:
        raise GenerationFailed(f"{route} answered {response.status_code}: {response.text[:300]}")
    return _decode_image(response.json()["images"][0])


@contextlib.contextmanager
def make_generators(checkpoint: str | None, threads: int) -> Iterator[Generators]:
    """txt2img and img2img callables that POST A1111 request bodies to an in-process sdserver (the real app,
    through fastapi's TestClient). A context manager: the server lives while the `with` block runs.

    With no checkpoint the server runs from an empty data folder, so it serves the shipped demo model.
    """
    import torch
    from fastapi.testclient import TestClient

    from sdserver.app import create_app
    from sdserver.settings import Settings

    torch.set_num_threads(threads)

    def body(prompt: str, negative_prompt: str, seed: int, width: int, height: int, steps: int, cfg: float,
             sampler: str) -> dict[str, Any]:
        return {
            "prompt": prompt, "negative_prompt": negative_prompt, "seed": seed, "width": width, "height": height,
            "steps": steps, "cfg_scale": cfg, "sampler_name": sampler, "batch_size": 1, "n_iter": 1,
        }

    with tempfile.TemporaryDirectory(prefix="sdserver-eval-") as data_dir:
        settings = Settings(
            data_dir=Path(data_dir), ckpt=Path(checkpoint).resolve() if checkpoint else None, webui=False
        )
        with TestClient(create_app(settings)) as client:

            def txt2img(prompt: str, negative_prompt: str, seed: int, width: int, height: int, steps: int,
                        cfg: float, sampler: str) -> Image.Image:
                request = body(prompt, negative_prompt, seed, width, height, steps, cfg, sampler)
                return _post(client, "/sdapi/v1/txt2img", request)

            def img2img(init_image: Image.Image, prompt: str, negative_prompt: str, seed: int, width: int,
                        height: int, steps: int, cfg: float, sampler: str, strength: float) -> Image.Image:
                request = body(prompt, negative_prompt, seed, width, height, steps, cfg, sampler)
                request.update(init_images=[_encode_png(init_image)], denoising_strength=strength)
                return _post(client, "/sdapi/v1/img2img", request)

            yield Generators(txt2img=txt2img, img2img=img2img)


def parse_args(argv: Sequence[str] | None) -> tuple[EvalConfig, str | None, int]:
    parser = argparse.ArgumentParser(prog="python -m sdserver.demo.evaluate", description=__doc__.split("\n")[0])
    defaults = EvalConfig()
    parser.add_argument("--checkpoint", default=None, help="a checkpoint file; default: the shipped demo model")
    parser.add_argument("--n", type=int, default=defaults.n, help="adherence prompts")
    parser.add_argument("--steps", type=int, default=defaults.steps)
    parser.add_argument("--cfg", type=float, default=defaults.cfg)
    parser.add_argument("--sampler", default=defaults.sampler, help="an A1111 sampler name")
    parser.add_argument("--size", type=int, default=defaults.size, help="width and height in pixels")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--strength", type=float, default=defaults.strength, help="img2img denoising strength")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--grid", default=None, help="save the first 32 adherence pictures (every colour x shape) "
                        "as one PNG here, with their prompts in a .txt beside it")
    args = parser.parse_args(argv)
    config = EvalConfig(
        n=args.n, steps=args.steps, cfg=args.cfg, sampler=args.sampler, size=args.size, seed=args.seed,
        strength=args.strength,
    )
    return config, args.checkpoint, args.threads, args.grid


_GRID_IMAGES = 32  # one run of adherence prompts: every colour x shape once


def main(argv: Sequence[str] | None = None) -> int:
    config, checkpoint, threads, grid_path = parse_args(argv)
    kept: list[tuple[Case, Image.Image]] = []

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def keep(case: Case, image: Image.Image) -> None:
        if grid_path and len(kept) < _GRID_IMAGES:
            kept.append((case, image))

    with make_generators(checkpoint, threads) as generators:
        report = evaluate(config, generators.txt2img, generators.img2img, log, keep)
    if grid_path and kept:
        grid([image for _, image in kept]).save(grid_path)
        Path(grid_path).with_suffix(".txt").write_text("\n".join(case.prompt for case, _ in kept) + "\n")
    print(format_report(report))
    print(json.dumps({"demo_eval": report.as_json()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
