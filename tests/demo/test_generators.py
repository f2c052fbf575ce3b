import pytest

from sdserver.demo.evaluate import GenerationFailed, make_generators


@pytest.mark.slow  # ~5 s, nearly all of it importing the server and torch
def test_make_generators_posts_through_the_real_api(tiny_checkpoint):
    # A random tiny checkpoint: the picture means nothing, but it went through the A1111 routes, the job
    # queue, the engine and the pipeline, at the size asked for.
    with make_generators(str(tiny_checkpoint), threads=1) as generators:
        image = generators.txt2img(prompt="a red circle", negative_prompt="", seed=1, width=64, height=64,
                                   steps=2, cfg=7.0, sampler="Euler a")
        assert image.size == (64, 64) and image.mode == "RGB"
        try:
            edited = generators.img2img(init_image=image, prompt="a blue circle", negative_prompt="", seed=1,
                                        width=64, height=64, steps=2, cfg=7.0, sampler="Euler a", strength=0.7)
        except GenerationFailed as exc:  # img2img may not have landed in the engine yet: it must say so
            assert "img2img" in str(exc)
        else:
            assert edited.size == (64, 64)
